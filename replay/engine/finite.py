"""Non-finite values in a replay (docs/design.md §5): the checked chord, the messages, and the
second look at a step that came out non-finite unchecked.

With ``nonfinite="skip"`` (and adaptive quadrature) every θ, Δ and gradient is checked before
its step is reduced. With ``"error"`` a step's LCA is tested instead, and only a step that
fails it is examined again here, in the checked order, so that the message is the same.
"""

from __future__ import annotations

import math

import torch

from replay.engine.flat_model import FlatModel
from replay.engine.gradients import LossOracle
from replay.engine.quadrature import Point, integrate
from replay.errors import ReplayError

_SKIP = "pass nonfinite='skip' (CLI --nonfinite skip) to mark such steps and continue"


class NonFinite(Exception):
    """A non-finite value in a step; its message names where (a ReplayError under "error")."""


def flatten_checked(flat: FlatModel, flats, layout, step: int) -> torch.Tensor:
    """θ of ``step`` from a walk's flat buffers (:meth:`FlatModel.flatten_flats`), checked."""
    vec = flat.flatten_flats(flats, layout)
    check_theta(flat, vec, step)
    return vec


def check_theta(flat: FlatModel, vec: torch.Tensor, step: int) -> None:
    name = flat.first_nonfinite(vec)
    if name is not None:
        raise NonFinite(f"checkpoint at step {step} has non-finite values in {name!r}; {_SKIP}")


def update_message(t: int, t1: int, tensor: str) -> str:
    return (f"the update from step {t} to step {t1} is not finite in {tensor!r} (step {t} has "
            f"non-finite values); {_SKIP}")


def diagnose(traj, flat: FlatModel, oracle: LossOracle, settings, t: int, t1: int,
             end_grad: bool):
    """Raise what the checked path would have named first for the step from ``t`` to ``t1``,
    whose loss or LCA came out non-finite unchecked: θ_{t+1}, Δ, then every loss and gradient
    in evaluation order (θ and the state read again from ``traj``, the step evaluated again)."""
    s = settings
    try:
        theta1 = flat.flatten(traj.params(t1))
        check_theta(flat, theta1, t1)
        theta0 = flat.flatten(traj.params(t))
        bad = flat.first_nonfinite(theta1 - theta0)
        if bad is not None:
            raise NonFinite(update_message(t, t1, bad))
        flat.load_state(traj.state(t))
        oracle.prepare(t)
        integrate(s.quadrature, Chord(flat, oracle, theta0, theta1, t), None, start=None,
                  end_grad=end_grad, keep_end=False, tolerance=s.tolerance,
                  max_splits=s.max_splits)
    except NonFinite as err:
        raise ReplayError(str(err)) from None
    raise ReplayError(
        f"the LCA of step {t} is not finite, yet evaluated again every loss and gradient of "
        "the step is finite: the model's results change between evaluations (a "
        "non-deterministic kernel?); replay with nonfinite='skip' (CLI --nonfinite skip)")


class Chord:
    """``evaluate(s, need_grad, take=None)`` for :func:`integrate`: the oracle at θ_t + sΔ,
    every loss checked finite, and every gradient too unless ``checked`` is False (their
    step's LCA then proves them finite)."""

    def __init__(self, flat: FlatModel, oracle: LossOracle, theta0, theta1, step: int,
                 checked: bool = True):
        self.flat, self.oracle, self.step = flat, oracle, step
        self.theta0, self.theta1, self.checked = theta0, theta1, checked

    def __call__(self, s: float, need_grad: bool, take=None) -> Point:
        flat = self.flat
        with torch.no_grad():
            if s == 0.0:
                flat.theta.copy_(self.theta0)
            elif s == 1.0:
                flat.theta.copy_(self.theta1)
            else:  # θ_t + sΔ with Δ = θ_{t+1} − θ_t formed in place: no buffer held for Δ
                torch.sub(self.theta1, self.theta0, out=flat.theta)
                torch.add(self.theta0, flat.theta, alpha=s, out=flat.theta)
        bad_grad: dict[int, str] = {}

        def checked(d: int, g: torch.Tensor):
            # Checked as it arrives: ``take`` may fold it away, or the next dataset reuse g.
            tensor = flat.first_nonfinite(g)
            if tensor is not None:
                bad_grad[d] = f"the gradient of {tensor!r}"
            return g.clone() if take is None else take(d, g)

        if self.checked:
            point = self.oracle.evaluate(need_grad, checked if need_grad else None)
        else:  # gradients are proven finite by the step's LCA (compute_piece)
            point = self.oracle.evaluate(need_grad, take if need_grad else None)
        for d, name in enumerate(self.oracle.names):
            bad = "the loss" if not math.isfinite(point.loss[d]) else bad_grad.get(d)
            if bad:
                raise NonFinite(f"{bad} is not finite on dataset {name!r} at step {self.step} "
                                f"(s={s:g} along the update); {_SKIP}")
        return point
