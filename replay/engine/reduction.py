"""Replayed steps reduced into the cube's arrays and the per-parameter sums (docs/design.md §8).

One step at a time (:func:`reduce_step`), or a group of pieces at once: a small model's steps
are reduced after the model passes of several pieces, not between them, where each small
operation runs several times slower and a kernel launch per step and dataset costs more than
the reduction itself. :class:`Group` holds each step's Δ and mean gradients,
reduces them in one launch (:meth:`replay.engine.kernel.Reducer.reduce_steps`) and fills in
its pieces' arrays; every number is the one a step-by-step reduction gives.
"""

from __future__ import annotations

import numpy as np
import torch

from replay.engine.flat_model import FlatModel
from replay.engine.kernel import Reducer

# A small model's pieces are reduced together up to this many bytes of held Δ and mean
# gradients, and for at most this long a stretch of compute, so that their results still reach
# the driver (progress, writes) within a moment.
GROUP_BYTES = 8 << 20
GROUP_SECONDS = 0.5


def reduce_step(out: dict, j: int, reducer: Reducer, gbar, delta, cum, residual_groups) -> None:
    """Step j's LCA per group and dataset into ``out`` (and Δ·ḡ into ``cum``), its residual."""
    delta_np = host(delta)
    for d in range(len(gbar)):
        lca, helped = reducer.reduce_flat(host(gbar[d]), delta_np, cum[d])
        out["lca"][j, :, d], out["helped"][j, :, d] = lca, helped
    residual(out, j, residual_groups)


def residual(out: dict, j: int, residual_groups) -> None:
    out["residual"][j] = (out["loss_next"][j] - out["loss"][j]) - \
        out["lca"][j, residual_groups, :].sum(axis=0)


class Unfinished(Exception):
    """Interval ``i`` (an index into the spec's steps) is the first whose LCA is not finite."""

    def __init__(self, i: int):
        super().__init__(i)
        self.i = i


class Group:
    """Pieces whose steps are reduced together after their model passes: each step's Δ and mean
    gradients are held until then, and the pieces' sums (``cums[p]``, one row per dataset) get
    the same additions in the same order as if reduced step by step."""

    def __init__(self, planned: list[tuple[int, int]], cums: np.ndarray, flat: FlatModel):
        self.planned, self.cums = planned, cums
        steps = sum(i1 - i0 for i0, i1 in planned)
        self.deltas = torch.empty((steps, flat.size), dtype=flat.dtype, device=flat.device)
        self.gbar: list[list[torch.Tensor]] = []
        self.thetas: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.where: list[tuple[int, int]] = []  # per held step: (its piece, its row there)
        self.pieces: list[dict] = []  # the cube arrays of the pieces begun

    def begin(self, out: dict) -> np.ndarray:
        """A piece's arrays, filled in by :meth:`reduce`; returns its sums."""
        self.pieces.append(out)
        return self.cums[len(self.pieces) - 1]

    def hold(self, j: int, theta1, theta0, gbar) -> None:
        """Step j of the piece begun last: its θ at both ends (Δ = θ1 − θ0 is formed by
        :meth:`reduce`; they are the walk's, valid until then) and its mean gradients."""
        self.thetas.append((theta1, theta0))
        self.gbar.append(gbar)
        self.where.append((len(self.pieces) - 1, j))

    def reduce(self, reducer: Reducer, residual_groups) -> int | None:
        """Reduce the steps held, in order; the first interval whose LCA is not finite, or None
        (the run stops there, so sums past it do not matter)."""
        gbar, where, self.gbar, self.where = self.gbar, self.where, [], []
        m = len(gbar)
        for k, (theta1, theta0) in enumerate(self.thetas):
            torch.sub(theta1, theta0, out=self.deltas[k])
        self.thetas = []
        sums = None
        if m and m * len(gbar[0]) * self.deltas.shape[1] * self.deltas.element_size() <= \
                GROUP_BYTES:
            # One kernel launch instead of one per step and dataset, whose fixed cost is most
            # of a small model's reduction; the stacked copy is small.
            sums = reducer.reduce_steps(
                host(torch.stack([torch.stack(g) for g in gbar])), host(self.deltas[:m]),
                self.cums, np.array([p for p, _ in where], dtype=np.int64))
        for k, (p, j) in enumerate(where):
            out = self.pieces[p]
            if sums is None:
                reduce_step(out, j, reducer, gbar[k], self.deltas[k], self.cums[p],
                            residual_groups)
            else:
                out["lca"][j], out["helped"][j] = sums[0][k].T, sums[1][k].T
                residual(out, j, residual_groups)
            if not np.isfinite(out["lca"][j]).all():
                return self.planned[p][0] + j
        return None


def host(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu").contiguous().numpy()
