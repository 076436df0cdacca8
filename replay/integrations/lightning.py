"""``LCACallback`` for ``lightning.pytorch.Trainer``: record a trajectory while it fits.

```python
from replay.integrations.lightning import LCACallback

trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2,
                    callbacks=[LCACallback("runs/x/trajectory", task="mypkg.tasks:MyTask",
                                           module="model")])
trainer.fit(lit_module, loader)   # then: lca replay runs/x/trajectory --trust-task
```

Lightning has no hook after ``optimizer.step()``: ``on_before_zero_grad`` runs inside the next
step's closure (after its forward), and ``on_train_batch_end`` after every micro-batch. So
the callback records at ``on_train_batch_end`` when ``trainer.global_step`` (Lightning's count
of optimizer steps) has moved on: with ``accumulate_grad_batches=k``, once per k batches.
A step hook on each optimizer and the loss scale of 16-mixed precision tell which of those
steps the optimizer skipped (an fp16 step whose gradients overflowed): it is recorded with
Δ = 0 and ``"skipped": true``. Only the global-zero process records; FSDP, DeepSpeed ZeRO-3 and model
parallel strategies (sharded parameters) are refused.

``module`` is the dotted name of the submodule to record (``"model"`` for
``self.model = AutoModel…``), the one the task's ``build_model()`` rebuilds; by default the
LightningModule itself. ``task`` (a ``"package.module:Factory"`` reference or a Task class) and
``task_args`` are stored for the replay. The training loss stored per step is the mean over
the step's batches of the loss ``training_step`` returned (Lightning hands the callback each
divided by ``accumulate_grad_batches``, also in a shorter last window of an epoch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ImportError as err:  # the extra is not installed
    raise ImportError(f"replay.integrations.lightning needs lightning ({err}); install it with "
                      "pip install 'lca-replay[lightning]'") from err

from replay.errors import RecorderError
from replay.integrations.common import json_args, launch_rank, positive, refuse_sharded
from replay.record.recorder import Recorder, check_destination
from replay.store.manifest import local_path

__all__ = ["LCACallback"]


class LCACallback(Callback):
    """Record the fit of a LightningModule (or its submodule ``module``) into a new trajectory
    store at ``path``; ``keyframe_every`` / ``every`` as for :class:`replay.Recorder`. One
    callback records one ``fit()`` call."""

    def __init__(self, path: str | os.PathLike, *, task: Any,
                 task_args: Mapping[str, Any] | None = None, module: str | None = None,
                 keyframe_every: int = 100, every: int = 1):
        if task is None or not (isinstance(task, str) or callable(task)):
            raise RecorderError("LCACallback needs task= ('package.module:Factory' or a Task "
                                "class) so that the trajectory can be replayed")
        if module is not None and (not isinstance(module, str) or not module):
            raise RecorderError(f"module must be the dotted name of a submodule, got {module!r}")
        self.path = os.path.abspath(local_path(os.fspath(path)))
        self.task, self.task_args, self.module = task, json_args(task_args), module
        self.keyframe_every = positive("keyframe_every", keyframe_every)
        self.every = positive("every", every)
        if launch_rank() == 0:  # the other processes never write
            check_destination(self.path)
        self._rec: Recorder | None = None
        self._hooks: list = []
        self._global = 0     # trainer.global_step at the last record
        self._applied = 0    # optimizer steps that ran since the last record
        self._lr: list[float] | None = None
        self._losses: list[torch.Tensor] = []
        self._scale_before: float | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if self._rec is not None:
            raise RecorderError(f"this LCACallback already recorded a fit into {self.path}; give "
                                "each fit() a new LCACallback with a new path")
        target = self._target(pl_module)
        refuse_sharded(target, _strategy_sharding(trainer.strategy))
        rec = Recorder(target, self.path, task=self.task, task_args=self.task_args,
                       keyframe_every=self.keyframe_every, every=self.every)
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(self._count_step))
        self._global, self._applied = trainer.global_step, 0
        try:
            self._rec = rec.start()
        except BaseException:
            self._remove_hooks()
            raise

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._rec is not None and self._scale_before is None:
            self._scale_before = _loss_scale(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._rec is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())
        advanced = trainer.global_step - self._global
        if advanced <= 0:
            return  # accumulating gradients
        if advanced > 1 or self._applied > 1:
            raise RecorderError(
                f"{max(advanced, self._applied)} optimizer steps in one batch (step "
                f"{trainer.global_step}); LCACallback records one optimizer step per batch: "
                "record each optimizer with replay.Recorder.attach instead")
        losses, self._losses = self._losses, []
        mean = None
        if losses:  # automatic optimization returns each loss / accumulate_grad_batches
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            mean = torch.stack([v.float() for v in losses]).sum() * (scale / len(losses))
        lr = self._lr or [float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        # Skipped: the optimizer never ran, or the loss scale went down (an optimizer that
        # takes the scaler's found_inf itself, such as fused Adam, runs and skips inside).
        before, after = self._scale_before, _loss_scale(trainer)
        skipped = self._applied == 0 or (before is not None and after is not None
                                         and after < before)
        self._rec.step(loss=mean, lr=lr, skipped=skipped)
        self._global, self._applied, self._lr = trainer.global_step, 0, None
        self._scale_before = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._rec is None:
            return
        try:
            self._rec.close()
        finally:
            self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._rec is None:
            return
        try:  # the store keeps the completed steps, as after an exception inside `with rec:`
            self._rec.__exit__(type(exception), exception, exception.__traceback__)
        finally:
            self._remove_hooks()

    # ------------------------------------------------------------------ internals
    def _target(self, pl_module) -> torch.nn.Module:
        if self.module is None:
            return pl_module
        try:
            target = pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise RecorderError(f"module={self.module!r}: {type(pl_module).__name__} has no such "
                                f"submodule (its children: {children})") from None
        return target

    def _count_step(self, optimizer, args, kwargs) -> None:
        self._applied += 1
        self._lr = [float(g["lr"]) for g in optimizer.param_groups]

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def _loss_scale(trainer) -> float | None:
    """The AMP loss scale of the trainer's precision plugin (16-mixed keeps a GradScaler)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not callable(getattr(scaler, "get_scale", None)):
        return None
    if callable(getattr(scaler, "is_enabled", None)) and not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _strategy_sharding(strategy) -> str | None:
    name = type(strategy).__name__
    if name in ("FSDPStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"):
        return f"the {name}"
    if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        return "DeepSpeed ZeRO-3 (DeepSpeedStrategy)"
    return None
