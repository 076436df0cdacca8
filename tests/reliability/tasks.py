"""Tasks for the reliability tests: TinyMLP variants that give a test time to act mid-replay,
or poison one gradient. Importable as ``tests.reliability.tasks:...`` from the repository root
(the CLI subprocesses run there)."""

from __future__ import annotations

import os
import time

import torch

from replay.tasks.tiny_mlp import TinyMLP


class SlowMLP(TinyMLP):
    """TinyMLP whose ``loss`` first sleeps ``$LCA_TEST_DELAY`` seconds (default 0), and waits
    as long as the file ``$LCA_TEST_HOLD`` exists (a test holds a replay mid-run with it).

    The numbers are those of TinyMLP; delay and hold are environment variables, not arguments,
    so that they are not part of the cube's settings and a slow run can be resumed by a fast one.
    """

    def loss(self, model, batch):
        delay = float(os.environ.get("LCA_TEST_DELAY") or 0)
        if delay:
            time.sleep(delay)
        hold = os.environ.get("LCA_TEST_HOLD")
        while hold and os.path.exists(hold):
            time.sleep(0.05)
        return super().loss(model, batch)


class _NaNGradient(torch.autograd.Function):
    """Adds 0 to the loss and NaN to the gradient of its input."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"), dtype=grad.dtype, device=grad.device)


class PoisonMLP(TinyMLP):
    """TinyMLP with a finite loss but a NaN gradient of ``0.bias`` wherever
    ``0.bias[index] > above``."""

    def __init__(self, above: float = float("inf"), index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.above, self.index = above, index

    def loss(self, model, batch):
        total, n = super().loss(model, batch)
        bias = model[0].bias
        if float(bias[self.index].detach()) > self.above:
            total = total + _NaNGradient.apply(bias)
        return total, n


class FlakyMLP(TinyMLP):
    """TinyMLP whose gradient of ``0.bias`` is NaN in the ``nan_call``-th call of ``loss`` on
    this instance only, and whose loss is NaN in the ``nan_loss_call``-th: a model whose
    results change between evaluations."""

    def __init__(self, nan_call: int = 1, nan_loss_call: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.nan_call, self.nan_loss_call, self.calls = nan_call, nan_loss_call, 0

    def loss(self, model, batch):
        total, n = super().loss(model, batch)
        self.calls += 1
        if self.calls == self.nan_call:
            total = total + _NaNGradient.apply(model[0].bias)
        if self.calls == self.nan_loss_call:
            total = total * float("nan")
        return total, n
