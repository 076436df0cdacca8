"""Quadrature of the path integral LCA_t[i] = Δ_i · ∫₀¹ ∂_i L(θ_t + sΔ) ds (docs/design.md §5).

The integrator only sees an ``evaluate(s, need_grad)`` callable returning the loss and the flat
gradient per dataset at θ_t + sΔ, so the same code serves exact and sampled gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


# (nodes, weights) of the fixed rules; adaptive starts from Simpson.
_FIXED = {
    "first-order": ((0.0,), (1.0,)),
    "trapezoid": ((0.0, 1.0), (0.5, 0.5)),
    "simpson": ((0.0, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6)),
}


@dataclass
class Point:
    """The loss and gradient at one point of the path, one entry per dataset.

    ``loss``: float64 array (n_datasets,). ``grads``: list of flat tensors (D,) or None when the
    point was evaluated without a backward pass.
    """

    loss: np.ndarray
    grads: list[torch.Tensor] | None


@dataclass
class StepIntegral:
    """The result of integrating one interval.

    ``gbar[d]`` (D,) is the quadrature-weighted mean gradient along the chord, so that
    LCA_i = Δ_i · gbar_i; ``start``/``end`` are the path's end points (``end`` may carry
    gradients for reuse as the next interval's start).
    """

    gbar: list[torch.Tensor]
    start: Point
    end: Point
    splits: int
    evaluations: int  # points evaluated with a backward pass
    forwards: int  # points evaluated without one


def integrate(
    name: str,
    evaluate: Callable[..., Point],
    delta: torch.Tensor | None,
    *,
    start: Point | None = None,
    end_grad: bool = True,
    keep_end: bool = True,
    tolerance: float = 1e-3,
    max_splits: int = 32,
) -> StepIntegral:
    """Integrate the gradient along θ_t → θ_t + Δ with the named rule.

    ``evaluate(s, need_grad, take=None)`` is a :meth:`LossOracle.evaluate` at θ_t + sΔ: with
    ``take``, each dataset's gradient is handed to it in a scratch buffer instead of kept.
    ``delta`` (Δ) serves adaptive's residual test only; the fixed rules take None.

    ``start`` is reused when given (the previous interval's end, same data and state); its
    gradient buffers then become this interval's mean gradients (they serve nothing else).
    The end point is always evaluated (its loss is ``loss_next``); ``end_grad=False`` lets
    first-order skip the backward pass there, and ``keep_end=False`` lets the other rules fold
    the end gradients into the mean without keeping them (``end.grads`` is then None).
    """
    evaluations = forwards = 0

    def point(s: float, need_grad: bool, take=None) -> Point:
        nonlocal evaluations, forwards
        p = evaluate(s, need_grad) if take is None else evaluate(s, need_grad, take)
        if need_grad:
            evaluations += 1
        else:
            forwards += 1
        return p

    if start is None or start.grads is None:
        start = point(0.0, True)
    if name == "first-order":
        end = point(1.0, end_grad)
        # The start gradients themselves: nothing writes into a mean gradient.
        return StepIntegral(list(start.grads), start, end, 1, evaluations, forwards)
    if name == "adaptive":
        gbar, end, n = _adaptive(point, start, delta, tolerance, max_splits)
        return StepIntegral(gbar, start, end, n, evaluations, forwards)

    # The mean is built in the start gradients' buffers as each gradient arrives, so a
    # worker's peak is 2 gradients per dataset (this sum and the kept end), not 3 or 4.
    # Each in-place step rounds as the expression it replaces: addition commutes, and the
    # products by 4 (Simpson's midpoint weight) are exact.
    sums = start.grads

    def add_end(d: int, g: torch.Tensor) -> torch.Tensor | None:
        kept = g.clone() if keep_end else None
        sums[d].add_(g)  # a + b
        return kept

    end = point(1.0, True, add_end)
    if name == "trapezoid":
        gbar = [g.mul_(0.5) for g in sums]  # (a + b)·0.5
        return StepIntegral(gbar, start, end, 1, evaluations, forwards)

    def add_mid(d: int, g: torch.Tensor) -> None:
        sums[d].add_(g.mul_(4.0))  # 4·m + (a + b)

    point(0.5, True, add_mid)
    gbar = [g.add_(0.0).div_(6.0) for g in sums]  # as _simpson_into with no even terms, n = 2
    return StepIntegral(gbar, start, end, 2, evaluations, forwards)


def _adaptive(point, start: Point, delta: torch.Tensor, tolerance: float, max_splits: int):
    """Composite Simpson, doubled until the worst residual is within ``tolerance``:
    ``(gbar, end, n)``."""
    end = point(1.0, True)
    mid = point(0.5, True)
    # Composite Simpson with n sub-intervals: (1/3n)[g0 + gn + 4·Σ odd + 2·Σ even interior].
    n = 2
    ends = [a + b for a, b in zip(start.grads, end.grads)]
    odd, even = list(mid.grads), None
    gbar = [_simpson_into(torch.empty_like(e), e, o, None, n) for e, o in zip(ends, odd)]
    while n < max_splits and _worst_residual(start, end, gbar, delta) > tolerance:
        if even is None:
            even = [torch.zeros_like(o) for o in odd]
        for e, o in zip(even, odd):
            e += o
        n *= 2
        odd = [torch.zeros_like(g) for g in ends]
        for j in range(1, n, 2):
            p = point(j / n, True)
            for acc, g in zip(odd, p.grads):
                acc += g
        for out, e, o, v in zip(gbar, ends, odd, even):
            _simpson_into(out, e, o, v, n)
    return gbar, end, n


def _simpson_into(out: torch.Tensor, ends: torch.Tensor, odd: torch.Tensor,
                  even: torch.Tensor | None, n: int) -> torch.Tensor:
    """``out = (ends + 4·odd + 2·even) / (3n)`` in place (``out`` may be ``odd``), rounded
    exactly as that expression: the products by 4 and 2 are exact, addition commutes, and
    an absent ``even`` (n = 2: zero) still adds +0.0, as the expression would."""
    if out is odd:
        out.mul_(4.0)
    else:
        torch.mul(odd, 4.0, out=out)
    out.add_(ends)
    if even is None:
        out.add_(0.0)
    else:
        out.add_(even * 2.0)
    return out.div_(3.0 * n)


def _worst_residual(start: Point, end: Point, gbar: list[torch.Tensor], delta: torch.Tensor):
    d = delta.double()
    total = np.array([float(torch.dot(d, g.double())) for g in gbar])
    return float(np.max(np.abs((end.loss - start.loss) - total)))
