"""The Hugging Face integration: LCACallback on real Trainer runs, and the built-in HFTask.

Everything runs offline on tiny models built from ``*Config(...)``; θ_t is checked bit for bit
against a second callback that copies the parameters, losses against the Trainer's own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
T = pytest.importorskip("transformers")
pytest.importorskip("datasets")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import analysis  # noqa: E402,F401  (the .lca accessor)
import replay  # noqa: E402
from replay.grouping.frequency import canonical_counts  # noqa: E402
from replay.errors import RecorderError, TaskError  # noqa: E402
from replay.integrations.hf import HF_TASK, LCACallback, hf_task_args  # noqa: E402
from replay.record.recorder import Recorder  # noqa: E402
from replay.store.trajectory import open_trajectory  # noqa: E402
from replay.tasks.hf import HFTask  # noqa: E402
from tests.helpers_trainers import (  # noqa: E402
    KIND, capture_callback, pad_collate, rows, save, tiny, training_args,
)

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path, arch, items, snaps, **kw):
    """A Trainer run of ``arch`` on ``items`` with an LCACallback(data=...) and a capture."""
    import datasets

    data = save(str(tmp_path / "data" / "train"), items)
    model = tiny(arch)
    trainer = T.Trainer(model=model, args=training_args(str(tmp_path / "out"), **kw),
                        train_dataset=datasets.load_from_disk(data), data_collator=pad_collate,
                        callbacks=[LCACallback(tmp_path / "traj", data={"train": data}),
                                   capture_callback(snaps)])
    trainer.train()
    return trainer, open_trajectory(tmp_path / "traj")


def _check_recorded(trainer, traj, snaps, losses=True):
    steps = trainer.state.global_step
    assert traj.steps == list(range(steps + 1)) and sorted(snaps) == traj.steps
    for t in traj.steps:
        theta = traj.params(t)
        assert all(torch.equal(theta[n], snaps[t][n]) for n in traj.names), t
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert [h["step"] for h in logged] == list(range(1, steps + 1))
    for h in logged:  # the manifest's loss and lr of step t are the ones the Trainer logs
        if losses:
            assert traj.losses()[h["step"]] == pytest.approx(h["loss"], rel=1e-6)
        else:  # computed by the Trainer outside the model: the callback never sees it
            assert traj.losses()[h["step"]] is None
        assert traj.lrs()[h["step"]] == [pytest.approx(h["learning_rate"])] * len(
            traj.lrs()[h["step"]])
    assert traj.skipped_steps() == []
    traj.verify()


def _reference_loss(trainer, arch, theta, items) -> float:
    """The Trainer's compute_loss on one batch of all ``items``, at parameters ``theta``."""
    model = tiny(arch)
    model.load_state_dict({**model.state_dict(), **theta})
    model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(model, pad_collate(items)))


def _replay_and_check(tmp_path, trainer, arch, snaps, items, cli=False):
    if cli:  # lca replay TRAJ --trust-task, in a process of its own
        run = subprocess.run([sys.executable, "-m", "replay.cli", "replay", str(tmp_path / "traj"),
                              "--trust-task", "--scheduler", "sync", "--groups", "transformer",
                              "--cube", str(tmp_path / "cube"), "--no-progress"],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        import xarray as xr

        cube = xr.open_zarr(str(tmp_path / "cube"))
    else:
        cube = replay.run(tmp_path / "traj", trust_task=True, scheduler="sync",
                          groups="transformer", out=str(tmp_path / "cube"), progress=False)
    loss = cube["loss"].sel(dataset="train").values
    assert np.isfinite(cube["lca"].values).all()
    # Telescoping: the loss at the end of interval t is the loss at the start of t + 1.
    np.testing.assert_allclose(cube["loss_next"].sel(dataset="train").values[:-1], loss[1:],
                               rtol=1e-6)
    for t in (0, len(loss) - 1):
        assert loss[t] == pytest.approx(_reference_loss(trainer, arch, snaps[t], items), rel=2e-5)
    return cube


# ---------------------------------------------------------------- Trainer runs


@pytest.mark.slow
def test_trainer_seq2seq_records_every_optimizer_step_and_replays_without_a_task(tmp_path):
    snaps: dict = {}
    items = rows("seq2seq", 8)
    trainer, traj = _train(tmp_path, "marian", items, snaps, num_train_epochs=2)
    assert trainer.state.global_step == 4  # 8 items, batches of 2, 2 batches per step, 2 epochs
    _check_recorded(trainer, traj, snaps)
    assert traj.aliases == {"model.encoder.embed_tokens.weight": "model.shared.weight",
                            "model.decoder.embed_tokens.weight": "model.shared.weight",
                            "lm_head.weight": "model.shared.weight"}
    assert traj.task == HF_TASK
    assert traj.task_args["model_class"] == "MarianMTModel"
    assert traj.task_args["loss"] == "seq2seq" and traj.task_args["label_smoothing"] == 0.0
    assert traj.task_args["config"]["model_type"] == "marian"
    cube = _replay_and_check(tmp_path, trainer, "marian", snaps, items)
    assert "transformer/de_emb" in cube["group"].values
    # Split by use (the default): the encoder's, the decoder's and the softmax's use of the
    # tied model.shared.weight each get their own LCA, and they add up to the joint LCA.
    kw = dict(trust_task=True, scheduler="sync", precision="float64", progress=False)
    split = replay.run(tmp_path / "traj", groups=["tensor", "transformer"],
                       out=str(tmp_path / "split"), **kw)
    joint = replay.run(tmp_path / "traj", groups=["tensor", "transformer"], tied="joint",
                       out=str(tmp_path / "joint"), **kw)
    uses = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
            "lm_head.weight"]
    labels = [str(g) for g in split["group"].values]
    assert "tensor/model.shared.weight" not in labels  # never used by the forward pass
    per_use = split["lca"].sel(group=[f"tensor/{u}" for u in uses]).sum("group")
    np.testing.assert_allclose(per_use.values, joint["lca"].sel(
        group="tensor/model.shared.weight").values, rtol=0, atol=1e-10)
    t = split.lca.grouping("transformer")
    sizes = dict(zip(map(str, t["group"].values), t["group_size"].values.tolist()))
    rows_ = int(split["group_size"].sel(group=f"tensor/{uses[0]}").values)
    assert sizes["en_emb"] >= rows_ and sizes["de_softmax"] == rows_
    np.testing.assert_allclose(t["lca"].sum("group").values,
                               joint.lca.grouping("transformer")["lca"].sum("group").values,
                               rtol=0, atol=1e-10)


@pytest.mark.slow
def test_trainer_causal_lm_with_label_smoothing_and_a_short_last_accumulation(tmp_path):
    snaps: dict = {}
    items = rows("causal", 10)
    # 5 batches of 2 per epoch, 2 per optimizer step: steps of 2, 2 and 1 batches.
    trainer, traj = _train(tmp_path, "gpt2", items, snaps, label_smoothing_factor=0.1)
    assert trainer.state.global_step == 3
    _check_recorded(trainer, traj, snaps, losses=False)
    assert traj.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert traj.task_args["loss"] == "causal" and traj.task_args["label_smoothing"] == 0.1
    _replay_and_check(tmp_path, trainer, "gpt2", snaps, items, cli=True)


@pytest.mark.slow
def test_a_step_the_gradient_scaler_skips_is_a_step_with_zero_delta(tmp_path):
    """accelerate enables fp16 loss scaling on accelerators only; on CPU the test gives the
    Trainer's accelerator a real ``torch.amp.GradScaler("cpu")`` and puts an Inf into one
    gradient before optimizer step 2, so that the scaler skips that update as it does on a
    GPU overflow."""
    import datasets

    class Overflow(T.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:  # the update into step 2
                with torch.no_grad():
                    next(model.parameters()).grad.view(-1)[0] = float("inf")

    snaps: dict = {}
    data = save(str(tmp_path / "data"), rows("causal", 8))
    trainer = T.Trainer(model=tiny("gpt2"), args=training_args(str(tmp_path / "out"),
                                                               max_grad_norm=0.0, num_train_epochs=2),
                        train_dataset=datasets.load_from_disk(data), data_collator=pad_collate,
                        callbacks=[Overflow(), LCACallback(tmp_path / "traj", data={"train": data}),
                                   capture_callback(snaps)])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.train()
    traj = open_trajectory(tmp_path / "traj")
    assert trainer.state.global_step == 4 and traj.steps == [0, 1, 2, 3, 4]
    assert traj.skipped_steps() == [2]
    assert [e.get("skipped", False) for e in traj.manifest["steps"]] == [False, False, True,
                                                                        False, False]
    for t in traj.steps:
        assert all(torch.equal(traj.params(t)[n], snaps[t][n]) for n in traj.names)
    assert all(float(d.abs().max()) == 0.0 for d in traj.delta(1).values())
    assert any(float(d.abs().max()) > 0.0 for d in traj.delta(2).values())


@pytest.mark.slow
def test_two_processes_record_one_trajectory_on_rank_zero(tmp_path):
    import safetensors.torch

    save(str(tmp_path / "data" / "train"), rows("causal", 16))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29400 + os.getpid() % 500), str(ROOT / "tests" / "helpers_trainers.py"),
         "ddp", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["recorded"] for r in ranks] == [True, False]
    assert {r["world_size"] for r in ranks} == {2} and ranks[0]["backend"] == "gloo"
    # 16 items over 2 processes, batches of 2, 2 batches per step: 2 steps
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == list(range(ranks[0]["steps"] + 1)) and ranks[0]["steps"] == 2
    theta = safetensors.torch.load_file(str(tmp_path / "theta.safetensors"))
    for t in traj.steps:
        assert all(torch.equal(v, theta[f"{t}/{n}"]) for n, v in traj.params(t).items())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and
                  (p / "manifest.json").exists()) == ["traj"]


@pytest.mark.slow
def test_sharded_parameters_are_refused_with_what_is_supported(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers_trainers.py"), "fsdp",
                          str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "PORT": str(29000 + os.getpid() % 300)})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    expected = ("LCACallback cannot record a model sharded by FSDP2 / DTensor (parameter "
                "'transformer.wte.weight' is a DTensor): a trajectory needs every parameter whole "
                "in the recording process; supported: one process, DDP (torchrun / accelerate "
                "launch) or DeepSpeed ZeRO stage 1-2, where every process holds every parameter "
                "whole")
    assert out["errors"] == [expected, expected] and not out["written"]
    with pytest.raises(RecorderError, match=re.escape("sharded by FSDP (TrainingArguments.fsdp=")):
        LCACallback(tmp_path / "t2").on_train_begin(
            training_args(str(tmp_path / "o"), fsdp="full_shard"), T.TrainerState(),
            T.TrainerControl(), model=tiny("gpt2"))
    assert not (tmp_path / "t2").exists()


# ---------------------------------------------------------------- the built-in task


@pytest.mark.parametrize("arch,smoothing", [
    ("marian", 0.0), ("bart", 0.1), ("t5", 0.0), ("gpt2", 0.0), ("llama", 0.1), ("bert", 0.0)])
def test_task_mean_loss_is_the_trainers_loss_on_the_same_batch(tmp_path, arch, smoothing):
    items = rows(KIND[arch], 6, seed=3)
    data = save(str(tmp_path / "train"), items)
    model = tiny(arch).eval()
    trainer = T.Trainer(model=model, args=training_args(str(tmp_path / "o"),
                                                        label_smoothing_factor=smoothing))
    args = hf_task_args(model, trainer.args, {"train": data})
    assert args["loss"] == KIND[arch] and args["label_smoothing"] == smoothing
    task = HFTask(**json.loads(json.dumps(args)))  # as the replay gets them from the manifest
    rebuilt = task.build_model()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    split = task.datasets()["train"]
    with torch.no_grad():
        expected = float(trainer.compute_loss(model, pad_collate(items, model)))
        total, count = task.loss(rebuilt, task.collate([split[i] for i in range(6)]))
        halves = [task.loss(rebuilt, task.collate([split[i] for i in part]))
                  for part in ((0, 1, 2), (3, 4, 5))]
    labels = pad_collate(items)["labels"]
    assert count == int((labels[:, 1:] if KIND[arch] == "causal" else labels).ne(-100).sum())
    assert float(total) / count == pytest.approx(expected, rel=1e-6)
    assert sum(float(s) for s, _ in halves) / sum(c for _, c in halves) == pytest.approx(
        expected, rel=1e-6)


def test_task_token_counts_per_use_and_for_the_tied_tensor(tmp_path):
    items = rows("seq2seq", 5)
    data = save(str(tmp_path / "train"), items)
    model = tiny("marian")
    task = HFTask(**hf_task_args(model, training_args(str(tmp_path / "o")), {"train": data}))
    uses = task.token_counts()
    src = np.bincount([t for x in items for t in x["input_ids"]], minlength=40)
    tgt = np.bincount([t for x in items for t in x["labels"]], minlength=40)
    dec = np.bincount([t for x in items for t in [0] + x["labels"][:-1]], minlength=40)
    assert list(uses) == ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                          "lm_head.weight"]
    np.testing.assert_array_equal(uses["model.encoder.embed_tokens.weight"].numpy(), src)
    np.testing.assert_array_equal(uses["model.decoder.embed_tokens.weight"].numpy(), dec)
    np.testing.assert_array_equal(uses["lm_head.weight"].numpy(), tgt)
    # joint LCA: the tied tensor's rows take the counts of all its uses
    names = ["model.shared.weight"]
    aliases = dict.fromkeys(uses, "model.shared.weight")
    joint = canonical_counts(uses, names, aliases, "here")
    np.testing.assert_array_equal(joint["model.shared.weight"], src + dec + tgt)
    assert task.item_size(task.datasets()["train"][2]) == len(items[2]["input_ids"]) + len(
        items[2]["labels"])
    gpt2 = HFTask(**hf_task_args(tiny("gpt2"), training_args(str(tmp_path / "o")),
                                 {"train": save(str(tmp_path / "c"), rows("causal", 4))}))
    assert list(gpt2.token_counts()) == ["transformer.wte.weight", "lm_head.weight"]


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_one_line_errors_and_nothing_is_written(tmp_path):
    data = save(str(tmp_path / "train"), rows("causal", 4))
    existing = tmp_path / "existing"
    with Recorder(torch.nn.Linear(2, 2), existing):
        pass
    before = (existing / "manifest.json").read_bytes()
    with pytest.raises(RecorderError, match=re.escape(f"{existing} already holds a trajectory; "
                                                      "choose a new path or delete it")):
        LCACallback(existing, data={"train": data})
    assert (existing / "manifest.json").read_bytes() == before

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    junk = str(tmp_path / "junk")
    with pytest.raises(TaskError, match=re.escape(
            f"data['train'] = {junk!r} is not a dataset saved with datasets.Dataset.save_to_disk; "
            "save each split with datasets.Dataset.save_to_disk(path) and pass that folder")):
        LCACallback(tmp_path / "t", data={"train": junk})
    import datasets

    both = str(tmp_path / "both")
    datasets.DatasetDict({"train": datasets.load_from_disk(data)}).save_to_disk(both)
    with pytest.raises(TaskError, match=re.escape(
            f"data['train'] = {both!r} holds a DatasetDict (splits train), not one split; pass "
            f"one folder per split, e.g. {{'train': '{both}/train'}}")):
        LCACallback(tmp_path / "t", data={"train": both})
    with pytest.raises(TaskError, match=re.escape("data['valid'] = ")):
        LCACallback(tmp_path / "t", data={"train": data, "valid": str(tmp_path / "none")})
    with pytest.raises(TaskError, match="takes data= .* or task= .*, not both"):
        LCACallback(tmp_path / "t", data={"train": data}, task="pkg.mod:Task")
    with pytest.raises(TaskError, match="task_args may only set eval_batch_size, loss, "
                                        "label_smoothing of replay.tasks.hf:HFTask; unknown: lr"):
        LCACallback(tmp_path / "t", data={"train": data}, task_args={"lr": 1})
    with pytest.raises(RecorderError, match="every must be a positive integer, got 0"):
        LCACallback(tmp_path / "t", every=0)
    assert not (tmp_path / "t").exists()


class _CustomConfig(T.PretrainedConfig):
    model_type = "lca-test-custom"

    def __init__(self, vocab_size=40, hidden=8, **kw):
        self.vocab_size, self.hidden = vocab_size, hidden
        super().__init__(**kw)


class _CustomLM(T.PreTrainedModel):
    """A causal LM defined outside transformers: its config has no class transformers knows."""

    config_class = _CustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.out = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        logits = self.out(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1))
        return T.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def test_a_config_that_cannot_be_rebuilt_offline_stops_training_before_anything_is_written(
        tmp_path):
    import datasets

    data = save(str(tmp_path / "train"), rows("causal", 4))
    trainer = T.Trainer(model=_CustomLM(_CustomConfig()), args=training_args(str(tmp_path / "o")),
                        train_dataset=datasets.load_from_disk(data), data_collator=pad_collate,
                        callbacks=[LCACallback(tmp_path / "traj", data={"train": data})])
    with pytest.raises(TaskError, match=re.escape(
            "the model's config has model_type 'lca-test-custom', which transformers does not "
            "know, so it cannot be rebuilt offline; pass task= with a Task that builds the model")):
        trainer.train()
    assert not (tmp_path / "traj").exists() and trainer.state.global_step == 0
