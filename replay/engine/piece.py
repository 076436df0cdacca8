"""Pieces of intervals replayed on whatever worker runs them (a piece: a contiguous run of
intervals inside one cube chunk).

A call rebuilds θ at its first step from the nearest keyframe, walks forward, integrates each
interval, reduces LCA into groups, writes each piece's per-parameter partial sums into the cube
(or hands them back), and yields each piece's small per-step arrays for the driver to write.
Everything it needs is in a picklable :class:`~replay.engine.runtime.Spec`; models and data
are kept per worker thread between calls (:mod:`replay.engine.runtime`).
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterator

import numpy as np
import torch

from replay.cube.param_lca import write_param_part
from replay.engine.finite import Chord, NonFinite, diagnose, flatten_checked, update_message
from replay.engine import reduction
from replay.engine.gradients import AHEAD_BYTES
from replay.engine.reduction import Group, Unfinished, reduce_step
from replay.engine.kernel import Reducer
from replay.engine.quadrature import integrate
from replay.engine.runtime import Carry, Runtime, Spec, release_buffers, runtime, same_state
from replay.errors import ReplayError

__all__ = ["Spec", "compute_piece", "compute_pieces", "release_buffers"]


def compute_piece(spec: Spec, i0: int, i1: int) -> dict:
    """Replay intervals [i0, i1) of ``spec.steps``; returns the cube arrays for them."""
    (result,) = compute_pieces(spec, [(i0, i1)])
    return result


def compute_pieces(spec: Spec, pieces) -> Iterator[dict]:
    """Replay ``pieces`` (``(i0, i1)`` intervals of ``spec.steps``, in order), yielding each
    one's cube arrays as soon as it is done.

    Pieces that follow one another are one walk along the trajectory: a piece starts where the
    last one ended, with its end point (a worker's next task would reuse it the same way, see
    :class:`~replay.engine.runtime.Carry`), and the walk's set-up is paid once. Each piece
    keeps its own arrays and per-parameter sums, so no result depends on how pieces are
    grouped into calls.
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
    walk = _Walk(spec, run)
    try:
        walk.start()
        yield from walk.pieces(run)
    finally:
        walk.points.close()


class _Walk:
    """A walk along contiguous pieces, and what it carries from one interval to the next: θ_t,
    the frozen state loaded with it, and (exact mode) the end point reused as the next start."""

    def __init__(self, spec: Spec, run: list[tuple[int, int]]):
        s = self.s = spec.settings
        torch.set_num_threads(s.threads)
        self.spec, self.rt = spec, runtime(spec)
        self.flat, self.oracle = self.rt.flat, self.rt.oracle
        self.reducer: Reducer = self.rt.reducer(spec.groupings)
        self.residual_groups = slice(0, len(spec.groupings[0].labels))  # the first grouping
        self.nd = len(spec.datasets)
        self.exact = s.gradient == "exact"
        # With nonfinite="error" a step's θ_{t+1}, Δ and gradients are not checked one by one:
        # a NaN or Inf in any of them makes the step's LCA non-finite (NaN·0 is NaN), and the
        # run stops, so one test of the LCA proves them all finite; only then is the step
        # re-checked in order, to name what went wrong (replay.engine.finite). "skip" must
        # check before the reduction adds the step into the per-parameter sums; adaptive,
        # before it splits on a NaN.
        self.eager = s.nonfinite == "skip" or s.quadrature == "adaptive"
        self.start_step, self.stop = int(spec.steps[run[0][0]]), run[-1][1]
        self.layout = self.rt.traj.layout
        self.points = self.rt.traj.walk_flat(self.start_step,
                                             int(spec.step_ends[self.stop - 1]))
        self.decoded: collections.deque = collections.deque()  # points taken from it ahead
        self.undecodable: Exception | None = None  # why the walk could not decode further
        self.theta0 = self.state0 = self.prev = None

    def start(self) -> None:
        """θ at the first step, and the end point of this worker's last piece if it is here."""
        s, t0 = self.s, self.start_step
        first, params, self.state0 = next(self.points)
        if first != t0:
            raise ReplayError(f"trajectory {self.spec.trajectory} has no recorded step {t0}")
        try:
            self.theta0 = flatten_checked(self.flat, params, self.layout, t0)
        except NonFinite as err:
            if s.nonfinite != "skip":
                raise ReplayError(str(err)) from None
            self.theta0 = self.flat.flatten_flats(params, self.layout)
        carry, self.rt.carry = self.rt.carry, None
        if self.exact and carry is not None and \
                carry.matches(self.theta0, self.state0, s.threads):
            self.prev = carry.point
        # The carry's θ and gradients must not outlive their use as this run's start.

    def pieces(self, run: list[tuple[int, int]]) -> Iterator[dict]:
        """Each piece's cube arrays and per-parameter sums, in order. A small model's steps are
        reduced after their model passes, not between them (where each small operation runs
        several times slower), and a few pieces at a time (:class:`Group`)."""
        k = 0
        while k < len(run):
            group = self._group(run[k:])
            if group is None:
                try:
                    yield self._finish(self._timed(*run[k], None))
                except Unfinished as stop:
                    self._fail(stop.i)
                k += 1
                continue
            began, bad = time.perf_counter(), None
            # The group's θ and samples, decoded and drawn before its model passes.
            self._decode(group.planned[-1][1] - group.planned[0][0])
            self.oracle.prefetch(self.spec.steps[group.planned[0][0]:group.planned[-1][1]])
            try:
                for i0, i1 in group.planned:
                    self._timed(i0, i1, group)
                    if time.perf_counter() - began >= reduction.GROUP_SECONDS:
                        break
                t = time.perf_counter()
                bad = group.reduce(self.reducer, self.residual_groups)
                group.pieces[-1]["seconds"] += time.perf_counter() - t
            except Unfinished as stop:
                bad = stop.i
            except Exception:
                # The pieces finished before the error are kept: the driver writes them.
                try:
                    kept = group.reduce(self.reducer, self.residual_groups)
                except Exception:
                    kept = -1
                yield from self._finished(group, kept)
                raise
            yield from self._finished(group, bad)
            if bad is not None:
                self._fail(bad)
            k += len(group.pieces)

    def _timed(self, i0: int, i1: int, group: Group | None) -> dict:
        t = time.perf_counter()
        out = self._piece(i0, i1, group)
        out["seconds"] = time.perf_counter() - t
        return out

    def _finished(self, group: Group, bad: int | None) -> Iterator[dict]:
        """The results of the group's pieces computed in full and before interval ``bad``."""
        for out in group.pieces:
            if "i1" in out and (bad is None or out["i1"] <= bad):
                yield self._finish(out)

    def _group(self, run: list[tuple[int, int]]) -> Group | None:
        """The next pieces of ``run`` to reduce together, or None if the first piece's steps
        are reduced as they come (a big model, or steps checked one by one)."""
        flat, nd = self.flat, self.nd
        step_bytes = (nd + 1) * flat.size * flat.theta.element_size()
        n = run[0][1] - run[0][0]
        if self.eager or n * step_bytes > AHEAD_BYTES:
            return None
        if self.s.param_lca and not self.spec.inline_parts:  # its sums are this worker's own
            return Group(run[:1], _sums(self.rt, self.spec, nd, flat.size)[None], flat)
        planned, steps = run[:1], n
        for i0, i1 in run[1:]:
            if (steps + i1 - i0) * step_bytes > reduction.GROUP_BYTES:
                break
            planned.append((i0, i1))
            steps += i1 - i0
        cums = np.zeros((len(planned), nd, flat.size if self.s.param_lca else 0))
        return Group(planned, cums, flat)

    def _piece(self, i0: int, i1: int, group: Group | None) -> dict:
        """Intervals [i0, i1): the piece's cube arrays, its per-parameter sums in ``cum``
        (reduced once ``group`` is, if given)."""
        n, nd, ng, flat = i1 - i0, self.nd, self.reducer.n_groups, self.flat
        out = {
            "lca": np.full((n, ng, nd), np.nan), "helped": np.zeros((n, ng, nd), np.int64),
            "loss": np.full((n, nd), np.nan), "loss_next": np.full((n, nd), np.nan),
            "residual": np.full((n, nd), np.nan), "splits": np.zeros(n, np.int64),
        }
        cum = group.begin(out) if group is not None else _sums(self.rt, self.spec, nd,
                                                                   flat.size)
        if group is None:
            if (n + 1) * flat.size * flat.theta.element_size() <= AHEAD_BYTES:
                # A small model's θ for the whole piece, decoded together (as the samples
                # below) rather than between its model passes (see LossOracle.prefetch).
                self._decode(n)
            self.oracle.prefetch(self.spec.steps[i0:i1])
        counts = [0, 0]  # evaluations, forward-only evaluations
        for j in range(n):
            self._step(out, cum, i0, j, group, counts)
        out.update(i0=i0, i1=i1, evaluations=counts[0], forwards=counts[1], cum=cum)
        return out

    def _finish(self, out: dict) -> dict:
        """A reduced piece's result: its sums handed to the driver, or written here."""
        cum, parts = out.pop("cum"), None
        if self.s.param_lca and self.spec.inline_parts:
            parts = list(cum)  # the driver writes them with the piece's other arrays
        elif self.s.param_lca:
            for d, name in enumerate(self.spec.datasets):
                write_param_part(self.spec.cube, name, out["i0"], out["i1"], cum[d])
        out["parts"] = parts
        return out

    def _decode(self, n: int) -> None:
        """The walk's next ``n`` points decoded now (those decoded already count). A file that
        fails to decode fails the step that needs it, as if read then: the steps before it
        are still computed (and kept)."""
        if self.undecodable is None:
            try:
                self.decoded.extend(itertools.islice(self.points, max(0, n - len(self.decoded))))
            except Exception as err:
                self.undecodable = err

    def _next_point(self):
        if self.decoded:
            return self.decoded.popleft()
        if self.undecodable is not None:
            raise self.undecodable
        return next(self.points, (None, None, None))

    def _step(self, out: dict, cum, i0: int, j: int, held, counts: list) -> None:
        """Interval i0 + j: integrated, and reduced now or held for the piece's end."""
        s, spec, flat, exact = self.s, self.spec, self.flat, self.exact
        i = i0 + j
        t, t1 = int(spec.steps[i]), int(spec.step_ends[i])
        t_next, params, state = self._next_point()
        if t_next != t1:
            raise ReplayError(f"trajectory {spec.trajectory}: expected recorded step "
                              f"{t1} after {t}, found {t_next}; run `lca verify` on it")
        theta1 = None
        last = i == self.stop - 1
        try:
            if self.eager:
                theta1 = flatten_checked(flat, params, self.layout, t1)
            else:
                theta1 = flat.flatten_flats(params, self.layout)
            params = None  # theta1 holds θ_{t1}: a converted copy need not live on
            if self.eager:
                # Δ goes in the model's θ buffer, free until a point is set: only θ_t and
                # θ_{t+1} are held through the evaluations, Δ formed again, exactly, for the
                # sums. [reliability] θ_t may be non-finite (skipped as the previous end point)
                # while the loss there is finite (e.g. an Inf bias under tanh): Δ carries it.
                bad = flat.first_nonfinite(torch.sub(theta1, self.theta0, out=flat.theta))
                if bad is not None:
                    raise NonFinite(update_message(t, t1, bad))
            flat.load_state(self.state0)
            self.oracle.prepare(t)
            res = integrate(
                s.quadrature, Chord(flat, self.oracle, self.theta0, theta1, t,
                                    checked=self.eager),
                theta1 - self.theta0 if s.quadrature == "adaptive" else None,
                start=self.prev if exact else None, end_grad=exact and not last,
                keep_end=exact, tolerance=s.tolerance, max_splits=s.max_splits)
            counts[0] += res.evaluations
            counts[1] += res.forwards
            out["loss"][j], out["loss_next"][j] = res.start.loss, res.end.loss
            out["splits"][j] = res.splits
            if held is not None:
                held.hold(j, theta1, self.theta0, res.gbar)
                self.theta0 = None
            else:
                delta = torch.sub(theta1, self.theta0, out=flat.theta)
                self.theta0 = None  # not held through the reduction: a big model's θ
                reduce_step(out, j, self.reducer, res.gbar, delta, cum,
                            self.residual_groups)
                if not self.eager and not np.isfinite(out["lca"][j]).all():
                    raise NonFinite("the LCA")
            self.prev = res.end if (exact and same_state(self.state0, state)
                                    and res.end.grads is not None) else None
            if last and exact and res.end.grads is not None:
                self.rt.carry = Carry(theta1, self.state0, s.threads, res.end)
        except NonFinite as err:
            if not self.eager:  # the first step whose LCA is not finite, this one if none
                res = delta = self.prev = None
                bad = held.reduce(self.reducer, self.residual_groups) if held else None
                raise Unfinished(i if bad is None else bad) from None
            if s.nonfinite != "skip":
                raise ReplayError(str(err)) from None
            self.prev = None  # step stays NaN, splits 0: marked in the cube, done as others
            if theta1 is None:
                theta1 = flat.flatten_flats(params, self.layout)
        self.theta0, self.state0 = theta1, state

    def _fail(self, i: int) -> None:
        """The unchecked interval i came out non-finite: name why, and stop."""
        diagnose(self.rt.traj, self.flat, self.oracle, self.s, int(self.spec.steps[i]),
                 int(self.spec.step_ends[i]), self.exact and i != self.stop - 1)


def _sums(rt: Runtime, spec: Spec, nd: int, size: int) -> np.ndarray:
    """Per-parameter sums, a zeroed row per dataset; without param_lca rows of length 0 tell
    the kernel to skip them. Sums the task writes itself are reused by its next piece: on a big
    model, first touching fresh pages of a new array costs as much as the reduction."""
    if not spec.settings.param_lca:
        return np.zeros((nd, 0))
    if spec.inline_parts:  # handed to the driver with the result: a fresh array each piece
        return np.zeros((nd, size), dtype=np.float64)
    if rt.sums is None or rt.sums.shape != (nd, size):
        rt.sums = np.zeros((nd, size), dtype=np.float64)
    else:
        rt.sums.fill(0.0)
    return rt.sums
