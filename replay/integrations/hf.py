"""``LCACallback`` for the Hugging Face ``Trainer``: record a trajectory while it trains.

```python
from replay.integrations.hf import LCACallback

trainer = Trainer(model, args, train_dataset=train, data_collator=collate,
                  callbacks=[LCACallback("runs/x/trajectory",
                                         data={"train": "data/train", "valid": "data/valid"})])
trainer.train()          # then: lca replay runs/x/trajectory --trust-task
```

θ_0 is recorded when training begins, then θ after every optimizer step (``on_step_end``,
after the scheduler and ``zero_grad``): with ``gradient_accumulation_steps=k`` one trajectory
step per k micro-batches, exactly ``state.global_step`` steps. An update that the optimizer
was called for but did not apply (an fp16 step that the gradient scaler skipped on overflow:
seen as a torch optimizer that never ran, accelerate's ``step_was_skipped``, or a loss scale
that went down) is still a step, with Δ = 0 and ``"skipped": true`` in the manifest. Only the main process
(``state.is_world_process_zero``) records; the others do nothing. Models whose parameters are
sharded across processes (FSDP, DeepSpeed ZeRO-3) are refused.

``data`` maps split names to folders written by ``datasets.Dataset.save_to_disk`` (tokenized
columns as the model takes them). With ``data`` and no ``task`` the callback stores the
built-in task :class:`replay.tasks.hf.HFTask`, the model's config and class, its loss kind
(seq2seq / causal / masked LM) and the Trainer's ``label_smoothing_factor``, after checking
that the config rebuilds the trained model offline; ``task_args`` may then set HFTask's
``eval_batch_size`` or override ``loss`` and ``label_smoothing`` (a Trainer whose own
``compute_loss`` differs from the model's loss needs a Task of its own: pass ``task=``).

The training loss stored per step is the loss the model returned on this process, over the
step's micro-batches: summed when the Trainer normalised each one by the step's token count
(``num_items_in_batch``), else averaged; on one process that is the loss the Trainer logs.
It is None where the Trainer computes the loss outside the model (``label_smoothing_factor``,
``compute_loss_func``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as err:  # the extra is not installed
    raise ImportError(f"replay.integrations.hf needs transformers ({err}); install it with "
                      "pip install 'lca-replay[hf]'") from err

from replay.errors import RecorderError, TaskError
from replay.integrations.common import json_args, launch_rank, positive, refuse_sharded
from replay.record.recorder import Recorder, check_destination
from replay.store.manifest import local_path

__all__ = ["HF_TASK", "LCACallback", "hf_task_args", "loss_kind"]

HF_TASK = "replay.tasks.hf:HFTask"
_OVERRIDES = ("eval_batch_size", "loss", "label_smoothing")


class LCACallback(TrainerCallback):
    """Record the ``Trainer``'s run into a new trajectory store at ``path`` (see the module
    docstring). ``task``: a ``"package.module:Factory"`` reference or a Task class, stored
    with ``task_args`` for the replay; ``keyframe_every`` / ``every`` as for
    :class:`replay.Recorder`. One callback records one ``train()`` call."""

    def __init__(self, path: str | os.PathLike, *, data: Mapping[str, str] | None = None,
                 task: Any = None, task_args: Mapping[str, Any] | None = None,
                 keyframe_every: int = 100, every: int = 1):
        self.path = os.path.abspath(local_path(os.fspath(path)))
        self.keyframe_every = positive("keyframe_every", keyframe_every)
        self.every = positive("every", every)
        if data is not None and task is not None:
            raise TaskError("LCACallback takes data= (replayed by the built-in task "
                            f"{HF_TASK}) or task= (your own Task), not both")
        self.task = task
        self.task_args = json_args(task_args)
        self.data = None
        if data is not None:
            self.data = _check_data(data)
            unknown = sorted(set(self.task_args) - set(_OVERRIDES))
            if unknown:
                raise TaskError(f"with data=, task_args may only set {', '.join(_OVERRIDES)} of "
                                f"{HF_TASK}; unknown: {', '.join(unknown)}")
        if launch_rank() == 0:  # the others never write, and may start after rank 0 did
            check_destination(self.path)
        self._rec: Recorder | None = None
        self._hook = None
        self._step_hook = None
        self._losses: list[tuple[torch.Tensor, bool]] = []
        self._lr: list[float] | None = None
        self._applied = 0      # optimizer.step() calls that reached the torch optimizer
        self._seen = 0
        self._skipped = False
        self._scale = 1
        self._scale_before: float | None = None

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self._rec is not None:
            raise RecorderError(f"this LCACallback already recorded a run into {self.path}; "
                                "give each train() call a new LCACallback with a new path")
        refuse_sharded(model, _trainer_sharding(args))
        task, task_args = self.task, self.task_args
        if self.data is not None:
            task, task_args = HF_TASK, hf_task_args(model, args, self.data, self.task_args)
        self._scale = (args.world_size if getattr(args, "average_tokens_across_devices", False)
                       else 1)
        rec = Recorder(model, self.path, task=task, task_args=task_args,
                       keyframe_every=self.keyframe_every, every=self.every)
        self._hook = model.register_forward_hook(self._capture_loss, with_kwargs=True)
        inner = _torch_optimizer(optimizer)
        if inner is not None:
            self._step_hook = inner.register_step_post_hook(self._count_step)
        try:
            self._rec = rec.start()
        except BaseException:
            self._remove_hooks()
            raise

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rec is not None:
            self._scale_before = _loss_scale(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._rec is None:
            return
        # The learning rate the update used: the scheduler steps after this event.
        self._lr = [float(g["lr"]) for g in optimizer.param_groups] if optimizer else None
        # Skipped: the optimizer never ran, or the wrapper says so, or the loss scale went down
        # (an optimizer that takes the scaler's found_inf itself, such as fused AdamW, is
        # called and skips the update inside, so neither of the first two notices).
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        if self._step_hook is not None:
            skipped = skipped or self._applied == self._seen
        before, after = self._scale_before, _loss_scale(optimizer)
        skipped = skipped or (before is not None and after is not None and after < before)
        self._seen, self._scale_before = self._applied, None
        self._skipped = skipped

    def on_step_end(self, args, state, control, **kwargs):
        if self._rec is None:
            return
        losses, self._losses = self._losses, []
        self._rec.step(loss=_step_loss(losses, self._scale), lr=self._lr, skipped=self._skipped)
        self._lr, self._skipped = None, False

    def on_train_end(self, args, state, control, **kwargs):
        if self._rec is None:
            return
        try:
            self._rec.close()
        finally:
            self._remove_hooks()

    # ------------------------------------------------------------------ internals
    def _capture_loss(self, module, args, kwargs, output):
        if not module.training:
            return  # evaluation during training
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append((loss.detach(), "num_items_in_batch" in kwargs))

    def _count_step(self, optimizer, args, kwargs):
        self._applied += 1

    def _remove_hooks(self):
        for handle in (self._hook, self._step_hook):
            if handle is not None:
                handle.remove()
        self._hook = self._step_hook = None


def _check_data(data: Mapping[str, str]) -> dict[str, str]:
    """Split name -> absolute folder, each a saved ``datasets.Dataset`` (checked now)."""
    from replay.tasks.hf import load_split

    if not isinstance(data, Mapping) or not data:
        raise TaskError("LCACallback data= must map split names to datasets.Dataset.save_to_disk "
                        f"folders, e.g. {{'train': 'data/train'}}; got {data!r}")
    out = {}
    for name, path in data.items():
        if not isinstance(name, str) or not name or not isinstance(path, (str, os.PathLike)):
            raise TaskError(f"LCACallback data= maps split names to folders; got {name!r}: "
                            f"{path!r}")
        path = os.path.abspath(os.fspath(path))
        load_split(name, path)
        out[name] = path
    return out


def hf_task_args(model, args, data: Mapping[str, str], overrides: Mapping | None = None) -> dict:
    """The arguments of the built-in task :class:`replay.tasks.hf.HFTask` for ``model`` trained
    with TrainingArguments ``args`` on the splits ``data``, checked by rebuilding the model from
    them (offline, on the meta device) and loading the data: TaskError if either fails."""
    from replay.tasks.hf import HFTask, rebuild_config, resolve_model_class

    config = json.loads(model.config.to_json_string(use_diff=False))
    rebuild_config(config)
    resolve_model_class(type(model).__name__)
    task_args = {"config": config, "model_class": type(model).__name__, "data": dict(data),
                 "loss": (overrides or {}).get("loss") or loss_kind(model),
                 "label_smoothing": float(getattr(args, "label_smoothing_factor", 0.0) or 0.0),
                 "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    task_args.update(overrides or {})
    task = HFTask(**task_args)
    task.datasets()  # columns against the model's inputs and loss
    with torch.device("meta"):
        rebuilt = task.build_model()
    _check_same_tensors(model, rebuilt)
    return task_args


def loss_kind(model) -> str:
    """``seq2seq``, ``causal`` or ``masked``: which language-model loss ``model`` computes,
    from transformers' own tables of model classes; TaskError for any other model."""
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    for kind, table in (("seq2seq", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                        ("causal", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                        ("masked", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)):
        for value in table.values():
            if name == value or (isinstance(value, (list, tuple)) and name in value):
                return kind
    raise TaskError(f"LCACallback(data=...) replays transformers language models (seq2seq, "
                    f"causal or masked LM heads); {name} is none of them: pass task= with a Task "
                    "(see replay.Task), or task_args={'loss': 'seq2seq'|'causal'|'masked'}")


def _check_same_tensors(model, rebuilt) -> None:
    def tensors(m):
        out = {n: tuple(p.shape) for n, p in m.named_parameters(remove_duplicate=False)}
        out.update((n, tuple(b.shape)) for n, b in m.state_dict(keep_vars=True).items())
        return out

    have, got = tensors(model), tensors(rebuilt)
    for name, shape in have.items():
        if got.get(name) != shape:
            found = "is missing" if name not in got else f"has shape {got[name]}"
            raise TaskError(f"the model rebuilt from its stored config differs from the trained "
                            f"one: {name!r} {shape} {found}; pass task= with a Task that builds "
                            "the model (see replay.Task)")


def _trainer_sharding(args) -> str | None:
    if getattr(args, "fsdp", None):
        return f"FSDP (TrainingArguments.fsdp={args.fsdp!r})"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        return "FSDP (accelerate launch with an FSDP config)"
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return None
    return "DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else None


def _torch_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` of the Trainer's optimizer (accelerate wraps it in
    an Optimizer subclass whose ``step`` runs no step hooks), or None."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _loss_scale(optimizer) -> float | None:
    """The AMP loss scale of the Trainer's optimizer (accelerate keeps its GradScaler there)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not callable(getattr(scaler, "get_scale", None)):
        return None
    if callable(getattr(scaler, "is_enabled", None)) and not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _step_loss(losses: list[tuple[torch.Tensor, bool]], scale: int):
    if not losses:
        return None
    total = torch.stack([loss.float() for loss, _ in losses]).sum()
    if all(normalised for _, normalised in losses):
        return total * scale  # each was (its tokens' loss sum) / (the step's token count)
    return total / len(losses)
