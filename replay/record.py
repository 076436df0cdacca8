"""The Recorder: saves a training trajectory θ_0, θ_k, θ_2k, … into a store (format v1).

The training thread only snapshots (copies every tensor off the training device) and enqueues;
a background writer thread computes deltas and corrections, hashes and writes the files, then
replaces manifest.json, so a crash leaves a store that is valid up to its last complete step.
Step t means "parameters after t optimizer updates".
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from replay.codec import to_safetensors
from replay.errors import RecorderError
from replay.snapshot import Flats, FlatLayout, manifest_spec, model_tensors, resolve
from replay.manifest import (
    FORMAT_VERSION, MANIFEST, ManifestWriter, file_name, is_remote, local_path, write_atomic,
)

__all__ = ["Recorder"]

Tensors = dict[str, torch.Tensor]


@dataclass
class _Snapshot:
    """What the training thread hands to the writer for one recorded step (CPU tensors)."""

    step: int
    params: Flats                   # dtype -> 1-D CPU buffer, see FlatLayout
    state: Flats
    loss: Any                       # float, 0-d CPU tensor or None
    lr: list[float] | None
    time: float
    interval_losses: list | None = field(default=None)   # every > 1: losses of (prev, step]


class Recorder:
    """Record a training run into the trajectory store at ``path`` (a new local directory).

    ``with Recorder(model, path) as rec:`` records θ_0; call ``rec.step(loss=...)`` after each
    optimizer step (or ``rec.attach(optimizer)`` once). Trainable parameters are recorded (tied
    ones once, aliases kept); frozen parameters and persistent buffers are saved as state.
    ``every=k`` records steps that are multiples of k (``close()`` adds the final step);
    ``keyframe_every`` bounds how far a reader walks; ``mode="full"`` stores θ at every step.
    """

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike, task: Any = None,
                 task_args: dict | None = None, keyframe_every: int = 100, every: int = 1,
                 mode: str = "delta", queue_size: int = 4):
        for key, value in (("keyframe_every", keyframe_every), ("every", every),
                           ("queue_size", queue_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecorderError(f"{key} must be a positive integer, got {value!r}")
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
        self._header = {
            "format_version": FORMAT_VERSION, "lca_replay_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": mode, "keyframe_every": keyframe_every, "every": every,
            "task": task, "task_args": task_args,
            "params": [manifest_spec(n, t) for n, _, t in self._params],
            "aliases": aliases,
            "state": [{**manifest_spec(n, t), "kind": kind} for n, _, t, kind in self._state],
        }
        self._queue: queue.Queue = queue.Queue(queue_size)
        self._writer: _Writer | None = None
        self._step = 0
        self._last_recorded = -1
        self._pending_losses: list = []
        self._next_loss: Any = None
        self._last_lr: list[float] | None = None
        self._last_loss: Any = None
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
        for sub in ("keyframes", "deltas", "state"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        writer = ManifestWriter(self._header)
        write_atomic(self.path, MANIFEST, writer.text().encode(), sync_dir=False)
        self._writer = _Writer(self.path, writer, self.mode, self.keyframe_every, self._queue,
                               self._param_layout, self._state_layout)
        self._writer.start()
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
             lr: float | list[float] | None = None) -> None:
        """One optimizer update happened: step += 1, recorded if it is a multiple of ``every``.

        ``loss`` (float or 0-d tensor, copied to the CPU without ``.item()``) is the training
        loss of that update; ``lr`` a float or one per parameter group. Re-raises a failure of
        the background writer as RecorderError.
        """
        self._check_running()
        value = _loss_value(loss) if loss is not None else self._next_loss
        self._next_loss = None
        self._step += 1
        self._last_lr = _lr_list(lr)
        if self.every > 1:
            self._pending_losses.append(value)
        if self._step % self.every == 0:
            self._submit(value, self._last_lr, self._take_interval())
        else:
            self._last_loss = value

    def close(self) -> None:
        """Record the final step if ``every`` skipped it, flush the writer, finalise the store."""
        self._finish(record_final=True, raise_error=True)

    @property
    def step_count(self) -> int:
        """Number of optimizer updates seen so far (the current step t)."""
        return self._step

    # ------------------------------------------------------------------ internals
    def _check_destination(self) -> None:
        if os.path.isdir(self.path) and os.listdir(self.path):
            what = ("already holds a trajectory" if os.path.exists(
                os.path.join(self.path, MANIFEST)) else "is not empty")
            raise RecorderError(f"{self.path} {what}; choose a new path or delete it "
                                "(the Recorder never overwrites data)")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RecorderError(f"{self.path} is a file; choose a new directory path")

    def _check_running(self) -> None:
        if self._writer is None:
            raise RecorderError("the Recorder has not started: use `with rec:` (or rec.start()) "
                                "before training so that θ_0 is recorded")
        if self._closed:
            raise RecorderError(f"the Recorder for {self.path} is closed")
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        err = self._writer.error if self._writer is not None else None
        if err is not None:
            self._error_raised = True
            raise RecorderError(
                f"background writer failed at step {self._writer.failed_step} "
                f"({type(err).__name__}: {err}); {self.path} is valid up to step "
                f"{self._writer.last_complete}; fix the cause and record into a new path") from err

    def _take_interval(self) -> list | None:
        if self.every == 1:
            return None
        losses, self._pending_losses = self._pending_losses, []
        return losses

    def _submit(self, loss: Any, lr: list[float] | None, interval: list | None) -> None:
        """Snapshot θ_step and state (the copy off the device happens here) and enqueue it."""
        params = self._param_layout.gather(
            {n: resolve(n, slot, spec, self._step) for n, slot, spec in self._params})
        state = self._state_layout.gather(
            {n: resolve(n, slot, spec, self._step) for n, slot, spec, _ in self._state})
        snap = _Snapshot(self._step, params, state, loss, lr, time.time(), interval)
        self._put(snap)
        self._last_recorded = self._step

    def _put(self, item: _Snapshot | None) -> None:
        # Blocks only while the queue is full; a dead writer must not hang training.
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._writer.is_alive():
                    self._raise_writer_error()
                    raise RecorderError(
                        f"the background writer of {self.path} stopped") from None

    def _finish(self, record_final: bool, raise_error: bool) -> None:
        if self._writer is None or self._closed:
            return
        try:
            if (record_final and self._writer.error is None
                    and self._step != self._last_recorded):
                self._submit(self._last_loss, self._last_lr,
                             self._take_interval())
        finally:
            self._closed = True
            for handle in self._hooks:
                handle.remove()
            if self._atexit is not None:
                atexit.unregister(self._atexit)
            if self._writer.is_alive():
                self._queue.put(None)        # the writer drains, so this cannot block forever
                self._writer.join()
        if raise_error and not self._error_raised:
            self._raise_writer_error()


class _Writer(threading.Thread):
    """Consumes snapshots: writes keyframe/delta/state files, then the manifest (atomically)."""

    def __init__(self, root: str, manifest: ManifestWriter, mode: str, keyframe_every: int,
                 q: queue.Queue, params: FlatLayout, state: FlatLayout):
        super().__init__(name="lca-recorder-writer", daemon=True)
        self.root, self.manifest, self.mode, self.keyframe_every, self.q = (
            root, manifest, mode, keyframe_every, q)
        self.params, self.state = params, state
        self.error: BaseException | None = None
        self.failed_step: int | None = None
        self.last_complete: int | None = None
        self._prev: _Snapshot | None = None
        self._last_key: int | None = None

    def run(self) -> None:
        item = None
        try:
            while (item := self.q.get()) is not None:
                self._record(item)
        except BaseException as err:  # surfaced in the training thread as RecorderError
            self.error, self.failed_step = err, item.step if item is not None else None
            while self.q.get() is not None:   # keep draining so producers never block
                pass

    def _write(self, role: str, step: int, tensors: Tensors, entry: dict, **meta) -> None:
        rel = file_name(role, step)
        data = to_safetensors(tensors, {"format": "lca-replay-1", "step": str(step),
                                        **{k: str(v) for k, v in meta.items()}})
        write_atomic(self.root, rel, data)
        entry["files"][role] = rel
        entry["sha256"][rel] = hashlib.sha256(data).hexdigest()
        entry["bytes"][rel] = len(data)

    def _record(self, snap: _Snapshot) -> None:
        t, prev = snap.step, self._prev
        keyframe = (self.mode == "full" or self._last_key is None
                    or t - self._last_key >= self.keyframe_every)
        if prev is not None and self.mode == "delta":
            # Also written when t gets a keyframe: `lca verify` then checks that the deltas
            # rebuild each keyframe bit for bit (costs 1/keyframe_every of the store).
            self._write("delta", prev.step, self.params.encode_delta(prev.params, snap.params),
                        self.manifest.entries[-1], next=t)
            self.manifest.refresh_last()
        entry = {"step": t, "files": {}, "sha256": {}, "bytes": {}}
        if keyframe:
            self._write("keyframe", t, self.params.split(snap.params), entry)
            state = self.state.split(snap.state)
        else:   # only the state tensors whose bytes changed since the previous recorded step
            state = self.state.split(snap.state, self.state.changed(prev.state, snap.state))
        if state:
            self._write("state", t, state, entry, full=int(keyframe))
        entry["loss"] = _finite(snap.loss)
        entry["lr"] = snap.lr
        entry["time"] = round(snap.time, 3)
        if snap.interval_losses is not None:
            entry["interval_losses"] = [_finite(v) for v in snap.interval_losses]
        self.manifest.append(entry)
        # No directory fsync for the manifest: if a power loss undoes this rename, the previous
        # manifest is still whole and consistent, only this step is lost.
        write_atomic(self.root, MANIFEST, self.manifest.text().encode(), sync_dir=False)
        self._prev, self.last_complete = snap, t
        if keyframe:
            self._last_key = t


# ---------------------------------------------------------------------- helpers

def _loss_value(loss: Any) -> Any:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise RecorderError(f"loss must be a float or a 1-element tensor, got shape "
                                f"{tuple(loss.shape)}")
        return loss.detach().to("cpu", copy=True)   # .item() happens in the writer
    return float(loss)


def _finite(value: Any) -> float | None:
    # Strict JSON has no NaN/inf: a non-finite loss is written as null.
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if value == value and abs(value) != float("inf") else None


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
