"""The Recorder: saves a training trajectory θ_0, θ_k, θ_2k, … into a store (format 2).

The training thread only snapshots (copies every tensor off the training device into a shared
memory buffer) and sends a line to the writer process (:mod:`replay.record.writer`), which
computes deltas and corrections, hashes and writes the files, then commits them to
manifest.json (at most every ``commit_interval`` seconds), so a crash leaves a store that is
valid up to its last commit. Step t means "parameters after t optimizer updates".
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import time
import weakref
from datetime import datetime, timezone
from typing import Any

import torch

from replay.errors import RecorderError
from replay.record.snapshot import Snapshotter, manifest_spec, model_tensors
from replay.store.flat_layout import FlatLayout
from replay.record.channel import WriterProcess
from replay.store.manifest import (
    FORMAT_VERSION, MANIFEST, ManifestWriter, is_remote, local_path, write_atomic,
)

__all__ = ["Recorder", "check_destination"]

class Recorder:
    """Record a training run into the trajectory store at ``path`` (a new local directory).

    ``with Recorder(model, path) as rec:`` records θ_0; call ``rec.step(loss=...)`` after each
    optimizer step (or ``rec.attach(optimizer)`` once). Trainable parameters are recorded (tied
    ones once, aliases kept); frozen parameters and persistent buffers are saved as state.
    ``every=k`` records steps that are multiples of k (``close()`` adds the final step);
    ``keyframe_every`` bounds how far a reader walks; ``mode="full"`` stores θ at every step.
    ``queue_size`` steps may wait for the writer process; the shared memory holds up to
    ``queue_size + 2`` snapshots (each the size of the recorded tensors) and keeps what it
    once used, so lower it for a model whose parameters fill a large part of host memory.
    A step counts once the writer commits it to the manifest, at most every
    ``commit_interval`` seconds (0: after every step) and when training pauses: a crash of the
    machine or of the writer loses at most that many seconds of steps. If the training process
    dies, the writer still writes and commits every step it was handed.
    """

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike, task: Any = None,
                 task_args: dict | None = None, keyframe_every: int = 100, every: int = 1,
                 mode: str = "delta", queue_size: int = 4, commit_interval: float = 1.0):
        for key, value in (("keyframe_every", keyframe_every), ("every", every),
                           ("queue_size", queue_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecorderError(f"{key} must be a positive integer, got {value!r}")
        if (not isinstance(commit_interval, (int, float)) or isinstance(commit_interval, bool)
                or not 0 <= commit_interval < float("inf")):
            raise RecorderError(f"commit_interval must be a number of seconds >= 0, got "
                                f"{commit_interval!r}")
        if mode not in ("delta", "full"):
            raise RecorderError(f"mode must be 'delta' or 'full', got {mode!r}")
        if is_remote(os.fspath(path)):
            raise RecorderError(f"cannot record to {os.fspath(path)!r}: the Recorder writes a "
                                "local directory; copy it to remote storage afterwards")
        if task is not None and not isinstance(task, str):
            task = f"{task.__module__}:{task.__qualname__}"
        try:
            task_args = json.loads(json.dumps(dict(task_args or {})))
        except (TypeError, ValueError) as err:
            raise RecorderError(f"task_args must be JSON-serialisable: {err}") from None
        self.model, self.path = model, local_path(path)
        self.every, self.keyframe_every, self.mode = every, keyframe_every, mode
        self._check_destination()
        self._params, self._state, aliases = model_tensors(model)
        if not self._params:
            raise RecorderError("the model has no trainable parameter (requires_grad=True) to "
                                "record; unfreeze at least one")
        self._param_layout = FlatLayout([(n, *spec) for n, _, spec in self._params])
        self._state_layout = FlatLayout([(n, *spec) for n, _, spec, _ in self._state])
        self._param_copy = Snapshotter(self._params, self._param_layout)
        self._state_copy = Snapshotter(self._state, self._state_layout)
        self._queue_size, self._commit_interval = queue_size, float(commit_interval)
        self._header = {
            "format_version": FORMAT_VERSION, "lca_replay_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": mode, "keyframe_every": keyframe_every, "every": every,
            "task": task, "task_args": task_args,
            "params": [manifest_spec(n, t) for n, _, t in self._params],
            "aliases": aliases,
            "state": [{**manifest_spec(n, t), "kind": kind} for n, _, t, kind in self._state],
        }
        self._writer: WriterProcess | None = None
        self._step = 0
        self._last_recorded = -1
        self._pending_losses: list = []
        self._pending_skipped: list[int] = []
        self._next_loss: Any = None
        self._last_lr: list[float] | None = None
        self._last_loss: Any = None
        self._last_skipped = False
        self._closed = False
        self._error_raised = False
        self._hooks: list = []
        self._atexit = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        # After an exception the step counter may lag the model (update applied, step() not
        # called), so no final step is recorded: the store keeps what was completed.
        self._finish(record_final=exc_type is None, raise_error=exc_type is None)

    def start(self) -> Recorder:
        """Create the store and record θ_0 (what ``with rec:`` does)."""
        if self._writer is not None:
            raise RecorderError(f"this Recorder already started recording into {self.path}")
        self._check_destination()
        # The writer process first: if it cannot start, nothing has been created on disk.
        writer = WriterProcess(self.path, self._header, self.mode, self.keyframe_every,
                                self._queue_size + 2, self._param_layout, self._state_layout,
                                self._commit_interval)
        try:
            for sub in ("keyframes", "deltas", "state"):
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            write_atomic(self.path, MANIFEST, ManifestWriter(self._header).chunks())
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        # Flush queued steps if the program ends without close(); weakref: no leak.
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)
        self._submit(loss=None, lr=None, interval=None)
        return self

    def attach(self, optimizer: torch.optim.Optimizer) -> Recorder:
        """Call :meth:`step` after every ``optimizer.step()``; lr read from its param_groups.

        The hook has no loss: report it with :meth:`set_loss` before ``optimizer.step()``.
        """
        def hook(opt, args, kwargs):
            self.step(lr=[_float(g["lr"]) for g in opt.param_groups])

        self._hooks.append(optimizer.register_step_post_hook(hook))
        return self

    def set_loss(self, loss: float | torch.Tensor | None) -> None:
        """Training loss of the update about to be applied (for use with :meth:`attach`)."""
        self._next_loss = _loss_value(loss)

    def step(self, loss: float | torch.Tensor | None = None,
             lr: float | list[float] | None = None, skipped: bool = False) -> None:
        """One optimizer update happened: step += 1, recorded if it is a multiple of ``every``.

        ``loss`` (float or 0-d tensor, read when the step is recorded) is the training loss
        of that update; ``lr`` a float or one per parameter group. ``skipped=True``: the
        optimizer was called but left the parameters alone (an AMP step that the gradient
        scaler skipped on overflow); it still counts as a step of the trajectory (its Δ is 0,
        as recorded) and the manifest marks it (``"skipped": true``, with ``every > 1`` the
        interval's skipped steps in ``"interval_skipped"``). Re-raises a failure of the
        background writer as RecorderError.
        """
        self._check_running()
        value = _loss_value(loss) if loss is not None else self._next_loss
        self._next_loss = None
        self._step += 1
        self._last_lr = _lr_list(lr)
        if self.every > 1:
            self._pending_losses.append(value)
            if skipped:
                self._pending_skipped.append(self._step)
        if self._step % self.every == 0:
            self._submit(value, self._last_lr, self._take_interval(), skipped=bool(skipped))
        else:
            self._last_loss = value
            self._last_skipped = bool(skipped)

    def close(self) -> None:
        """Record the final step if ``every`` skipped it, flush the writer, finalise the store."""
        self._finish(record_final=True, raise_error=True)

    @property
    def step_count(self) -> int:
        """Number of optimizer updates seen so far (the current step t)."""
        return self._step

    # ------------------------------------------------------------------ internals
    def _check_destination(self) -> None:
        check_destination(self.path)

    def _check_running(self) -> None:
        if self._writer is None:
            raise RecorderError("the Recorder has not started: use `with rec:` (or rec.start()) "
                                "before training so that θ_0 is recorded")
        if self._closed:
            raise RecorderError(f"the Recorder for {self.path} is closed")
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        w = self._writer
        if w is None:
            return
        w.check()         # a writer that died unannounced shows at the next send (broken pipe)
        if w.error is not None:
            self._error_raised = True
            raise RecorderError(
                f"background writer failed at step {w.failed_step} ({w.error}); {self.path} is "
                f"valid up to step {w.last_complete}; fix the cause and record into a new path")
        if w.ended and not w.closing:
            self._error_raised = True
            raise RecorderError(
                f"the background writer of {self.path} stopped (exit status "
                f"{w.proc.poll()}); {self.path} is valid up to step {w.last_complete}; "
                "record into a new path")

    def _take_interval(self) -> tuple[list, list[int]] | None:
        """(losses, skipped steps) of the updates since the last recorded step (``every > 1``)."""
        if self.every == 1:
            return None
        losses, self._pending_losses = self._pending_losses, []
        skipped, self._pending_skipped = self._pending_skipped, []
        return losses, skipped

    def _submit(self, loss: Any, lr: list[float] | None, interval: tuple | None,
                skipped: bool = False) -> None:
        """Snapshot θ_step and state into a free shared buffer and hand it to the writer."""
        w = self._writer
        slot = w.take_slot(self._raise_writer_error)
        params, state = w.buffers[slot]
        try:
            self._param_copy.copy(self._step, params)
            self._state_copy.copy(self._step, state)
        except BaseException:      # e.g. a changed shape: the buffer was not handed over
            w.free.append(slot)
            raise
        # Formatted by hand: json.dumps of this dict is slow right after a training step (cold
        # caches), and this runs on the training thread.
        message = (f'{{"op":"step","slot":{slot},"step":{self._step},"loss":'
                   f'{_json_number(_finite(loss))},"time":{time.time():.3f}')
        if lr is not None:
            message += f',"lr":[{",".join(map(_json_number, lr))}]'
        if skipped:
            message += ',"skipped":true'
        if interval is not None:
            losses, skipped_steps = interval
            message += f',"interval":[{",".join(_json_number(_finite(v)) for v in losses)}]'
            if skipped_steps:
                message += f',"interval_skipped":[{",".join(map(str, skipped_steps))}]'
        w.send(message + "}", slot, self._raise_writer_error)
        self._last_recorded = self._step

    def _finish(self, record_final: bool, raise_error: bool) -> None:
        if self._writer is None or self._closed:
            return
        try:
            if (record_final and self._writer.error is None and not self._error_raised
                    and self._step != self._last_recorded):
                self._submit(self._last_loss, self._last_lr,
                             self._take_interval(), skipped=self._last_skipped)
        finally:
            self._closed = True
            for handle in self._hooks:
                handle.remove()
            if self._atexit is not None:
                atexit.unregister(self._atexit)
            self._writer.close()
        if raise_error and not self._error_raised:
            self._raise_writer_error()


# ---------------------------------------------------------------------- helpers

def check_destination(path: str) -> None:
    """RecorderError unless ``path`` is free for a new store (absent, or an empty directory)."""
    if os.path.isdir(path) and os.listdir(path):
        what = ("already holds a trajectory" if os.path.exists(
            os.path.join(path, MANIFEST)) else "is not empty")
        raise RecorderError(f"{path} {what}; choose a new path or delete it "
                            "(the Recorder never overwrites data)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise RecorderError(f"{path} is a file; choose a new directory path")


def _loss_value(loss: Any) -> Any:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise RecorderError(f"loss must be a float or a 1-element tensor, got shape "
                                f"{tuple(loss.shape)}")
        if loss.device.type == "cpu":
            return float(loss.item())
        # On an accelerator .item() would wait for the device: read it when the step is recorded
        return loss.detach().to("cpu", copy=True)
    return float(loss)


def _finite(value: Any) -> float | None:
    # Strict JSON has no NaN/inf: a non-finite loss is written as null.
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if value == value and abs(value) != float("inf") else None


def _json_number(value: float | None) -> str:
    # repr of a finite float is valid JSON; strict JSON has no NaN/inf: those become null.
    return "null" if value is None or value != value or abs(value) == float("inf") else repr(
        float(value))


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _lr_list(lr: Any) -> list[float] | None:
    if lr is None:
        return None
    if isinstance(lr, (list, tuple)):
        return [_float(v) for v in lr]
    return [_float(lr)]


def _version() -> str:
    from replay import __version__

    return __version__


def _close_at_exit(ref: weakref.ref) -> None:
    rec = ref()
    if rec is not None:
        rec._finish(record_final=False, raise_error=False)
