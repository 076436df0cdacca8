"""Pieces of intervals replayed on whatever worker runs them (a piece: a contiguous run of
intervals inside one cube chunk).

A call rebuilds θ at its first step from the nearest keyframe, walks forward, integrates each
interval, reduces LCA into groups, writes each piece's per-parameter partial sums into the cube
(or hands them back), and yields each piece's small per-step arrays for the driver to write.
Everything it needs is in a picklable :class:`Spec`; models and data are cached per worker
thread between calls.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from replay.cube.param_lca import write_param_part
from replay.engine.devices import task_device
from replay.engine.finite import Chord, NonFinite, diagnose, flatten_checked, update_message
from replay.engine.flat_model import FlatModel
from replay.engine.gradients import AHEAD_BYTES, LossOracle
from replay.engine.kernel import Reducer
from replay.engine.quadrature import Point, integrate
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


class _Runtime:
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
        self.carry: _Carry | None = None
        self.sums: list[np.ndarray] | None = None  # see _sums
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
class _Carry:
    """An end point θ_{t1} with its gradients, and what they were computed with."""

    theta: torch.Tensor  # (D,) θ_{t1}
    state: dict  # the frozen parameters and buffers loaded when it was evaluated
    threads: int
    point: Point

    def matches(self, theta: torch.Tensor, state: dict, threads: int) -> bool:
        # Same θ, state and thread count give bit-identical gradients (CPU kernels are
        # deterministic for a fixed thread count), so reuse cannot change any result.
        return (threads == self.threads and _same_state(state, self.state)
                and torch.equal(theta, self.theta))


_CACHE: dict[tuple[int, str], _Runtime] = {}


def release_buffers() -> None:
    """Drop what this process's runtimes keep for a next piece (the end point's θ and
    gradients, reused per-parameter sums): the run that owned them is over, and in-process
    (sync, threads) its finalisation needs the memory."""
    for rt in _CACHE.values():
        rt.carry = rt.sums = None


def _runtime(spec: Spec) -> _Runtime:
    # Keyed by thread too: under the threads scheduler two tasks must not share one model.
    key = (threading.get_ident(), spec.cache_key())
    if key not in _CACHE:
        # This thread's runtimes of an earlier recording at the same path are never used again.
        for old in [k for k, rt in _CACHE.items() if k[0] == key[0]
                    and rt.path == spec.trajectory and rt.manifest != spec.manifest]:
            del _CACHE[old]
        _CACHE[key] = _Runtime(spec)
    return _CACHE[key]


def compute_piece(spec: Spec, i0: int, i1: int) -> dict:
    """Replay intervals [i0, i1) of ``spec.steps``; returns the cube arrays for them."""
    (result,) = compute_pieces(spec, [(i0, i1)])
    return result


def compute_pieces(spec: Spec, pieces) -> Iterator[dict]:
    """Replay ``pieces`` (``(i0, i1)`` intervals of ``spec.steps``, in order), yielding each
    one's cube arrays as soon as it is done.

    Pieces that follow one another are one walk along the trajectory: a piece starts where the
    last one ended, with its end point (a worker's next task would reuse it the same way, see
    ``_Carry``), and the walk's set-up is paid once. Each piece keeps its own arrays and
    per-parameter sums, so no result depends on how pieces are grouped into calls.
    """
    run: list[tuple[int, int]] = []
    for i0, i1 in pieces:
        if run and run[-1][1] != i0:
            yield from _walk_run(spec, run)
            run = []
        run.append((int(i0), int(i1)))
    if run:
        yield from _walk_run(spec, run)


def _walk_run(spec: Spec, run: list[tuple[int, int]]) -> Iterator[dict]:
    """:func:`compute_pieces` for contiguous pieces."""
    began = time.perf_counter()
    s = spec.settings
    torch.set_num_threads(s.threads)
    rt = _runtime(spec)
    flat, oracle = rt.flat, rt.oracle
    reducer = rt.reducer(spec.groupings)
    residual_groups = slice(0, len(spec.groupings[0].labels))  # the first grouping
    nd, ng = len(spec.datasets), reducer.n_groups
    exact = s.gradient == "exact"
    start, stop = run[0][0], run[-1][1]
    t0 = int(spec.steps[start])
    layout = rt.traj.layout
    walk = rt.traj.walk_flat(t0, int(spec.step_ends[stop - 1]))
    try:
        first, params, state0 = next(walk)
        if first != t0:
            raise ReplayError(f"trajectory {spec.trajectory} has no recorded step {t0}")
        prev: Point | None = None
        try:
            theta0 = flatten_checked(flat, params, layout, t0)
        except NonFinite as err:
            if s.nonfinite != "skip":
                raise ReplayError(str(err)) from None
            theta0 = flat.flatten_flats(params, layout)
        carry, rt.carry = rt.carry, None
        if exact and carry is not None and carry.matches(theta0, state0, s.threads):
            prev = carry.point
        carry = None  # its θ and gradients must not outlive their use as this run's start
        # With nonfinite="error" a step's θ_{t+1}, Δ and gradients are not checked one by one:
        # a NaN or Inf in any of them makes the step's LCA non-finite (NaN·0 is NaN), and the
        # run stops, so one test of the LCA proves them all finite; only then is the step
        # re-checked in order, to name what went wrong (replay.engine.finite). "skip" must
        # check before the reduction adds the step into the per-parameter sums; adaptive,
        # before it splits on a NaN.
        eager = s.nonfinite == "skip" or s.quadrature == "adaptive"

        def fail(i: int):  # the unchecked step i came out non-finite: name why, and stop
            diagnose(rt.traj, flat, oracle, s, int(spec.steps[i]), int(spec.step_ends[i]),
                     exact and i != stop - 1)

        for i0, i1 in run:
            n = i1 - i0
            out = {
                "lca": np.full((n, ng, nd), np.nan), "helped": np.zeros((n, ng, nd), np.int64),
                "loss": np.full((n, nd), np.nan), "loss_next": np.full((n, nd), np.nan),
                "residual": np.full((n, nd), np.nan), "splits": np.zeros(n, np.int64),
            }
            cum = _sums(rt, spec, nd, flat.size)
            evaluations = forwards = 0
            points = walk
            if (n + 1) * flat.size * flat.theta.element_size() <= AHEAD_BYTES:
                # A small model's θ for the whole piece, decoded together (as the samples below)
                # rather than between its model passes (see LossOracle.prefetch).
                points = iter(list(itertools.islice(walk, n)))
            oracle.prefetch(spec.steps[i0:i1])
            # A small model's steps are reduced after the piece's model passes, not between
            # them (where each small operation runs several times slower): their Δ and mean
            # gradients are kept until then, in the same order of additions into ``cum``.
            held = _Held(n, flat) if not eager and (n * (nd + 1) * flat.size * flat.theta
                                                        .element_size() <= AHEAD_BYTES) else None

            for j in range(n):
                t, t1 = int(spec.steps[i0 + j]), int(spec.step_ends[i0 + j])
                t_next, params, state = next(points, (None, None, None))
                if t_next != t1:
                    raise ReplayError(f"trajectory {spec.trajectory}: expected recorded step "
                                      f"{t1} after {t}, found {t_next}; run `lca verify` on it")
                theta1 = None
                last = i0 + j == stop - 1
                try:
                    if eager:
                        theta1 = flatten_checked(flat, params, layout, t1)
                    else:
                        theta1 = flat.flatten_flats(params, layout)
                    params = None  # theta1 holds θ_{t1}: a converted copy need not live on
                    if eager:
                        # Δ goes in the model's θ buffer, free until a point is set: only θ_t
                        # and θ_{t+1} are held through the evaluations, Δ formed again, exactly,
                        # for the sums. [reliability] θ_t may be non-finite (skipped as the
                        # previous end point) while the loss there is finite (e.g. an Inf bias
                        # under tanh): Δ then carries it.
                        bad = flat.first_nonfinite(torch.sub(theta1, theta0, out=flat.theta))
                        if bad is not None:
                            raise NonFinite(update_message(t, t1, bad))
                    flat.load_state(state0)
                    oracle.prepare(t)
                    res = integrate(
                        s.quadrature, Chord(flat, oracle, theta0, theta1, t, checked=eager),
                        theta1 - theta0 if s.quadrature == "adaptive" else None,
                        start=prev if exact else None, end_grad=exact and not last,
                        keep_end=exact, tolerance=s.tolerance, max_splits=s.max_splits)
                    evaluations += res.evaluations
                    forwards += res.forwards
                    out["loss"][j], out["loss_next"][j] = res.start.loss, res.end.loss
                    out["splits"][j] = res.splits
                    if held is not None:
                        torch.sub(theta1, theta0, out=held.deltas[j])
                        theta0 = None
                        held.gbar.append(res.gbar)
                    else:
                        delta = torch.sub(theta1, theta0, out=flat.theta)
                        theta0 = None
                        _reduce(out, j, reducer, res.gbar, delta, cum, residual_groups)
                        if not eager and not np.isfinite(out["lca"][j]).all():
                            raise NonFinite("the LCA")
                    same_state = _same_state(state0, state)
                    prev = res.end if (exact and same_state and res.end.grads is not None) \
                        else None
                    if last and exact and res.end.grads is not None:
                        rt.carry = _Carry(theta1, state0, s.threads, res.end)
                    # Frees this step's mean gradients and Δ before the next step's are made.
                    res = delta = None
                except NonFinite as err:
                    if not eager:  # the first step whose LCA is not finite, this one if none
                        res = delta = prev = None
                        bad_j = held.reduce(out, reducer, cum, residual_groups) if held else None
                        fail(i0 + (j if bad_j is None else bad_j))
                    if s.nonfinite != "skip":
                        raise ReplayError(str(err)) from None
                    prev = None  # step stays NaN, splits 0: marked in the cube, done as others
                    res = None
                    if theta1 is None:
                        theta1 = flat.flatten_flats(params, layout)
                theta0, state0 = theta1, state
            if held is not None:
                bad_j = held.reduce(out, reducer, cum, residual_groups)
                if bad_j is not None:
                    fail(i0 + bad_j)
                held = None
            parts = None
            if s.param_lca and spec.inline_parts:
                parts = cum  # the driver writes them with the piece's other arrays
            elif s.param_lca:
                for d, name in enumerate(spec.datasets):
                    write_param_part(spec.cube, name, i0, i1, cum[d])
            out.update(i0=i0, i1=i1, evaluations=evaluations, forwards=forwards, parts=parts,
                       seconds=time.perf_counter() - began)
            yield out
            began = time.perf_counter()
    finally:
        walk.close()


def _sums(rt: _Runtime, spec: Spec, nd: int, size: int) -> list[np.ndarray]:
    """Per-parameter sums, one per dataset, zeroed; without param_lca a length-0 array tells
    the kernel to skip them. Sums the task writes itself are reused by its next piece: on a big
    model, first touching fresh pages of a new array costs as much as the reduction."""
    if not spec.settings.param_lca:
        return [np.zeros(0) for _ in range(nd)]
    if spec.inline_parts:  # handed to the driver with the result: a fresh array each piece
        return [np.zeros(size, dtype=np.float64) for _ in range(nd)]
    if rt.sums is None or len(rt.sums) != nd or rt.sums[0].size != size:
        rt.sums = [np.zeros(size, dtype=np.float64) for _ in range(nd)]
    else:
        for c in rt.sums:
            c.fill(0.0)
    return rt.sums


def _reduce(out: dict, j: int, reducer: Reducer, gbar, delta, cum, residual_groups) -> None:
    """Step j's LCA per group and dataset into ``out`` (and Δ·ḡ into ``cum``), its residual."""
    delta_np = _host(delta)
    for d in range(len(gbar)):
        lca, helped = reducer.reduce_flat(_host(gbar[d]), delta_np, cum[d])
        out["lca"][j, :, d], out["helped"][j, :, d] = lca, helped
    out["residual"][j] = (out["loss_next"][j] - out["loss"][j]) - \
        out["lca"][j, residual_groups, :].sum(axis=0)


class _Held:
    """The Δ and mean gradients of a piece's first steps, reduced together afterwards."""

    def __init__(self, n: int, flat: FlatModel):
        self.deltas = torch.empty((n, flat.size), dtype=flat.dtype, device=flat.device)
        self.gbar: list[list[torch.Tensor]] = []

    def reduce(self, out, reducer, cum, residual_groups) -> int | None:
        """Reduce the steps held, in order; the first whose LCA is not finite, or None."""
        gbar, self.gbar = self.gbar, []
        for j, g in enumerate(gbar):
            _reduce(out, j, reducer, g, self.deltas[j], cum, residual_groups)
            if not np.isfinite(out["lca"][j]).all():
                return j
        return None


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu").contiguous().numpy()


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a)
