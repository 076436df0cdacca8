"""Tiny Hugging Face models, saved token datasets and trainer runs for the integration tests.

Imported by the tests, and run as a script for what needs processes of its own:

- ``torchrun --nproc_per_node 2 tests/helpers_trainers.py ddp OUT``: a 2-process (gloo) HF
  ``Trainer`` run of GPT-2 on ``OUT/data/train`` with an ``LCACallback`` into ``OUT/traj``;
  each rank writes ``OUT/rankN.json`` (whether its callback recorded, its optimizer steps) and
  rank 0 ``OUT/theta.safetensors`` (θ after each step, captured by a separate callback).
- ``torchrun --nproc_per_node 2 tests/helpers_trainers.py lightning-ddp OUT``: the same with a
  Lightning ``Trainer(strategy="ddp")`` fit of the TinyMLP task's model.
- ``python tests/helpers_trainers.py fsdp OUT``: shards a model with FSDP2 in a 1-process gloo
  group and hands it to both callbacks; prints their errors and whether OUT/traj exists.

Models are built from ``*Config(...)`` (never downloaded); everything is seeded.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 40
PAD = 0


def tiny(arch: str):
    """A tiny randomly initialised model of ``arch`` (seeded), dropout off."""
    import transformers as T

    torch.manual_seed(0)
    seq2seq = dict(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                   decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD,
                   bos_token_id=1, eos_token_id=2, decoder_start_token_id=PAD)
    llama = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                 pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    if arch == "marian":
        return T.MarianMTModel(T.MarianConfig(**seq2seq))
    if arch == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(**seq2seq))
    if arch == "mbart":
        return T.MBartForConditionalGeneration(T.MBartConfig(**seq2seq))
    if arch == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
            num_heads=2, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=2,
            decoder_start_token_id=PAD))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**llama))
    if arch == "llama-tied":
        return T.LlamaForCausalLM(T.LlamaConfig(**llama, tie_word_embeddings=True))
    if arch == "bert":
        return T.BertForMaskedLM(T.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, pad_token_id=PAD))
    raise ValueError(arch)


KIND = {"marian": "seq2seq", "bart": "seq2seq", "mbart": "seq2seq", "t5": "seq2seq",
        "gpt2": "causal", "llama": "causal", "llama-tied": "causal", "bert": "masked"}


def rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` tokenized items of varied lengths for a ``kind`` LM (ids 3..VOCAB-1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src = torch.randint(3, VOCAB, (3 + i % 5,), generator=g).tolist()
        if kind == "seq2seq":
            out.append({"input_ids": src,
                        "labels": torch.randint(3, VOCAB, (2 + i % 4,), generator=g).tolist()})
        elif kind == "causal":
            out.append({"input_ids": src})
        else:  # masked: predict every other token
            out.append({"input_ids": src, "labels": [t if j % 2 == 0 else -100
                                                     for j, t in enumerate(src)]})
    return out


def save(path: str, items: list[dict]) -> str:
    import datasets

    datasets.Dataset.from_list(items).save_to_disk(path)
    return path


def pad_collate(items, model=None) -> dict[str, torch.Tensor]:
    """The tests' own collator (independent of the built-in task's): right padding,
    attention mask, labels padded with -100; causal items predict their input_ids. With a
    seq2seq ``model``, also its ``decoder_input_ids``, as ``DataCollatorForSeq2Seq`` makes them
    (the Trainer's label smoother calls the model without labels)."""
    from torch.nn.utils.rnn import pad_sequence

    def pad(key, value):
        return pad_sequence([torch.as_tensor(x[key]) for x in items], batch_first=True,
                            padding_value=value)

    batch = {"input_ids": pad("input_ids", PAD),
             "attention_mask": pad_sequence([torch.ones(len(x["input_ids"]), dtype=torch.int64)
                                             for x in items], batch_first=True)}
    batch["labels"] = pad("labels" if "labels" in items[0] else "input_ids", -100)
    if model is not None and model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(
            labels=batch["labels"])
    return batch


def capture_callback(store: dict):
    """A TrainerCallback that keeps θ (named_parameters, cloned) at train begin and after
    each optimizer step, keyed by the Trainer's global_step: the tests' own record."""
    import transformers as T

    class Capture(T.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            store[state.global_step] = _params(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            store[state.global_step] = _params(model)

    return Capture()


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def training_args(out: str, **kw):
    import transformers as T

    base = dict(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                num_train_epochs=1, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return T.TrainingArguments(**{**base, **kw})


# ------------------------------------------------------------------ scripts

def _ddp(out: str) -> None:
    import datasets
    import safetensors.torch
    import transformers as T

    from replay.integrations.hf import LCACallback

    rank = int(os.environ["RANK"])
    data = os.path.join(out, "data", "train")  # saved by the test (causal rows)
    snaps: dict = {}
    cb = LCACallback(os.path.join(out, "traj"), data={"train": data})
    trainer = T.Trainer(model=tiny("gpt2"), args=training_args(os.path.join(out, f"o{rank}")),
                        train_dataset=datasets.load_from_disk(data), data_collator=pad_collate,
                        callbacks=[cb, capture_callback(snaps)])
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"recorded": cb._rec is not None, "steps": trainer.state.global_step,
                   "world_size": trainer.args.world_size,
                   "backend": torch.distributed.get_backend()}, f)
    if rank == 0:
        safetensors.torch.save_file({f"{t}/{n}": v for t, ps in snaps.items()
                                     for n, v in ps.items()},
                                    os.path.join(out, "theta.safetensors"))


def _lightning_ddp(out: str) -> None:
    import lightning.pytorch as pl
    import safetensors.torch
    import torch.nn.functional as F

    from replay.integrations.lightning import LCACallback
    from replay.tasks.tiny_mlp import TinyMLP

    args = {"train_size": 32, "test_size": 8}
    task = TinyMLP(**args)
    snaps: dict = {}

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = task.build_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def on_train_start(self):
            snaps[0] = _params(self.model)

        def optimizer_step(self, *a, **kw):
            super().optimizer_step(*a, **kw)
            snaps[self.trainer.global_step + 1] = _params(self.model)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    cb = LCACallback(os.path.join(out, "traj"), task="replay.tasks.tiny_mlp:TinyMLP",
                     task_args=args, module="model")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                         accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=[cb])
    loader = torch.utils.data.DataLoader(task.datasets()["train"], batch_size=4,
                                         collate_fn=task.collate)
    trainer.fit(Lit(), loader)
    rank = trainer.global_rank
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"recorded": cb._rec is not None, "steps": trainer.global_step,
                   "world_size": trainer.world_size,
                   "backend": torch.distributed.get_backend()}, f)
    if rank == 0:
        safetensors.torch.save_file({f"{t}/{n}": v for t, ps in snaps.items()
                                     for n, v in ps.items()},
                                    os.path.join(out, "theta.safetensors"))


def _fsdp(out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29561"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import lightning.pytorch as pl
    import torch.distributed as dist
    import transformers as T
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from replay.errors import RecorderError
    from replay.integrations import hf, lightning

    dist.init_process_group("gloo")
    model = tiny("gpt2")
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    path = os.path.join(out, "traj")
    errors = []
    try:
        hf.LCACallback(path).on_train_begin(training_args(os.path.join(out, "o")),
                                            T.TrainerState(), T.TrainerControl(), model=model)
    except RecorderError as err:
        errors.append(str(err))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

    try:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False)
        lightning.LCACallback(path, task="x:Y", module="model").on_train_start(trainer, Module())
    except RecorderError as err:
        errors.append(str(err))
    dist.destroy_process_group()
    print(json.dumps({"errors": errors, "written": os.path.exists(path)}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    {"ddp": _ddp, "lightning-ddp": _lightning_ddp, "fsdp": _fsdp}[sys.argv[1]](sys.argv[2])
