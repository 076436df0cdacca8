"""A tiny deterministic training run for the store/recorder tests.

Imported by the tests (``make_model``, ``train``) and run as a script by the SIGKILL test:
``python tests/helpers_record.py STORE STEPS`` records STEPS AdamW updates into STORE, printing
``writer PID`` first and ``step N`` as it goes, so that the parent can kill it mid-run and
rebuild the same run in-process.
"""

from __future__ import annotations

import sys

import torch

# Weights at the 1e-6 scale while AdamW moves them by ~1e-3 per step: θ_t + fl(θ_{t+1} − θ_t)
# then sometimes misses θ_{t+1} in float32, so the delta corrections are exercised. (The decay
# matters: an update that is one rounded add, θ_{t+1} = fl(θ_t + u) as in plain Adam or SGD,
# always satisfies θ_t + fl(θ_{t+1} − θ_t) == θ_{t+1}; AdamW's decay adds a second rounding.)
WEIGHT_SCALE = 1e-6


def make_model(seed: int = 0, width: int = 16, dtype: torch.dtype = torch.float32,
               scale: float = WEIGHT_SCALE) -> torch.nn.Module:
    """Linear(8, width) -> tanh -> Linear(width, 4), weights ~N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.to(dtype)


def train(model: torch.nn.Module, steps: int, recorders=(), seed: int = 1, lr: float = 1e-3,
          snapshots: dict | None = None, on_step=None) -> dict:
    """``steps`` AdamW updates on random regression data; each recorder gets ``step(loss=...)``.

    ``snapshots`` (if given) receives {t: {name: tensor}} of θ_t for t = 0..steps.
    """
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)

    def keep(t):
        if snapshots is not None:
            snapshots[t] = {n: p.detach().clone() for n, p in model.named_parameters()}

    keep(0)
    for t in range(1, steps + 1):
        x = torch.randn(16, 8, generator=g).to(dtype)
        y = torch.randn(16, 4, generator=g).to(dtype)
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for rec in recorders:
            rec.step(loss=loss.item())
        keep(t)
        if on_step is not None:
            on_step(t)
    return snapshots if snapshots is not None else {}


def main(argv: list[str]) -> None:
    from replay.record.recorder import Recorder

    torch.set_num_threads(1)     # bit-identical to the parent's in-process rerun
    path, steps = argv[0], int(argv[1])
    model = make_model(width=64)
    with Recorder(model, path, keyframe_every=5, queue_size=2) as rec:
        print(f"writer {rec._writer.proc.pid}", flush=True)
        train(model, steps, [rec], on_step=lambda t: print(f"step {t}", flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
