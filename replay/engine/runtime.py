"""What a replay worker keeps between its calls (docs/design.md §8): the :class:`Spec` a task is
planned with, and per process and thread a :class:`Runtime` — the task's model flattened, its
data, the open trajectory, the reduction's plan and the last piece's end point — so that the
next piece of the same replay starts without building them again.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from replay.engine.devices import task_device
from replay.engine.flat_model import FlatModel
from replay.engine.gradients import LossOracle
from replay.engine.kernel import Reducer
from replay.engine.quadrature import Point
from replay.engine.tied import untie
from replay.errors import ReplayError
from replay.settings import ReplaySettings

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Spec:
    """Everything a replay task needs, picklable: the settings as workers see them and what
    the driver resolved from them."""

    settings: ReplaySettings
    trajectory: str
    task_ref: str | None
    task_args: dict
    datasets: tuple[str, ...]
    groupings: list
    uses: dict[str, str]  # parameter name -> recorded name (replay.engine.tied)
    batch_size: int  # of the data loop, resolved from the settings and the task
    cube: str
    steps: np.ndarray  # interval starts (n,)
    step_ends: np.ndarray  # interval ends (n,)
    task_obj: Any = field(default=None, repr=False)  # a Task instance passed from Python
    inline_parts: bool = False  # per-parameter partial sums go back with the result
    # The manifest's sha256 when the replay was planned: a trajectory recorded again at the
    # same path (a notebook's next run) must not be read through a runtime opened on the old one.
    manifest: str = ""

    def cache_key(self) -> str:
        s = self.settings
        return json.dumps([self.trajectory, self.manifest, self.task_ref, self.task_args,
                           s.precision, s.device, s.tied, self.datasets, self.batch_size,
                           id(self.task_obj) if self.task_obj is not None else None,
                           repr(s.mode)], sort_keys=True, default=str)


class Runtime:
    def __init__(self, spec: Spec):
        from replay.store.trajectory import open_trajectory
        from replay.task import load_task

        self.path, self.manifest = spec.trajectory, spec.manifest
        self.traj = open_trajectory(spec.trajectory)
        if spec.manifest and self.traj.manifest_sha256 != spec.manifest:
            raise ReplayError(f"trajectory {spec.trajectory} changed after this replay was "
                              "planned (recorded again?); run the replay again")
        task = spec.task_obj if spec.task_obj is not None else load_task(spec.task_ref,
                                                                          spec.task_args)
        where = f"task {spec.task_ref!r}" if spec.task_ref else "the task"
        model = task.build_model()
        untie(model, spec.uses)
        shapes = {use: self.traj.shapes[name] for use, name in spec.uses.items()}
        self.flat = FlatModel(model, list(spec.uses), shapes, DTYPES[spec.settings.precision],
                              task_device(spec.settings.device), where=where, source=spec.uses)
        self.oracle = LossOracle(task, self.flat, spec.datasets, spec.settings.mode,
                                 spec.batch_size)
        # The last piece's end point (exact mode): when this worker next runs the piece that
        # starts there, its first gradient evaluation is reused instead of recomputed.
        self.carry: Carry | None = None
        self.sums: np.ndarray | None = None  # see replay.engine.piece._sums
        self._reducer: tuple[list, Reducer] | None = None

    def reducer(self, groupings: list) -> Reducer:
        """The Reducer of ``groupings``, kept while the pieces come with the same list: a
        sync replay's pieces and a Dask task's group share one Spec, and building the
        reduction's plan costs as much as reducing a small model's piece."""
        if self._reducer is None or self._reducer[0] is not groupings:
            flat = self.flat
            self._reducer = (groupings, Reducer(groupings, {name: flat.shapes[name]
                                                            for name in flat.names}))
        return self._reducer[1]


@dataclass
class Carry:
    """An end point θ_{t1} with its gradients, and what they were computed with."""

    theta: torch.Tensor  # (D,) θ_{t1}
    state: dict  # the frozen parameters and buffers loaded when it was evaluated
    threads: int
    point: Point

    def matches(self, theta: torch.Tensor, state: dict, threads: int) -> bool:
        # Same θ, state and thread count give bit-identical gradients (CPU kernels are
        # deterministic for a fixed thread count), so reuse cannot change any result.
        return (threads == self.threads and same_state(state, self.state)
                and torch.equal(theta, self.theta))


_CACHE: dict[tuple[int, str], Runtime] = {}


def release_buffers() -> None:
    """Drop what this process's runtimes keep for a next piece (the end point's θ and
    gradients, reused per-parameter sums): the run that owned them is over, and in-process
    (sync, threads) its finalisation needs the memory."""
    for rt in _CACHE.values():
        rt.carry = rt.sums = None


def runtime(spec: Spec) -> Runtime:
    # Keyed by thread too: under the threads scheduler two tasks must not share one model.
    key = (threading.get_ident(), spec.cache_key())
    if key not in _CACHE:
        # This thread's runtimes of an earlier recording at the same path are never used again.
        for old in [k for k, rt in _CACHE.items() if k[0] == key[0]
                    and rt.path == spec.trajectory and rt.manifest != spec.manifest]:
            del _CACHE[old]
        _CACHE[key] = Runtime(spec)
    return _CACHE[key]


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a)
