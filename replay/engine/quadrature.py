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
    evaluate: Callable[[float, bool], Point],
    delta: torch.Tensor,
    *,
    start: Point | None = None,
    end_grad: bool = True,
    tolerance: float = 1e-3,
    max_splits: int = 32,
) -> StepIntegral:
    """Integrate the gradient along θ_t → θ_t + Δ with the named rule.

    ``start`` is reused when given (the previous interval's end, same data and state). The
    end point is always evaluated (its loss is ``loss_next``); ``end_grad=False`` lets a rule
    that does not need the end gradient skip the backward pass there.
    """
    evaluations = forwards = 0

    def point(s: float, need_grad: bool) -> Point:
        nonlocal evaluations, forwards
        p = evaluate(s, need_grad)
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

    end = point(1.0, True)
    if name == "trapezoid":
        gbar = [(a + b).mul_(0.5) for a, b in zip(start.grads, end.grads)]
        return StepIntegral(gbar, start, end, 1, evaluations, forwards)

    mid = point(0.5, True)
    # Composite Simpson with n sub-intervals: (1/3n)[g0 + gn + 4·Σ odd + 2·Σ even interior].
    n = 2
    if name == "simpson":
        # The midpoint's gradients serve only here, so the mean is built in their buffers,
        # one dataset at a time: a worker's peak is 3 gradients per dataset (start, end, mid).
        gbar = [_simpson_into(m, a + b, m, None, n)
                for a, b, m in zip(start.grads, end.grads, mid.grads)]
        return StepIntegral(gbar, start, end, n, evaluations, forwards)
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
    return StepIntegral(gbar, start, end, n, evaluations, forwards)


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
