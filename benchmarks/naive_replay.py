"""The baseline: the LCA replay script a user would write without lca-replay.

Training saved a full checkpoint of the model every step; this script walks them:

- loads θ_t and θ_{t+1} from per-step checkpoint files (safetensors ``load_file``: the
  stand-in for ``torch.load``, which this project never calls because it unpickles; it is
  the faster of the two, so the baseline is if anything flattered);
- evaluates the gradient at the three Simpson points θ_t, θ_t + ½Δ, θ_{t+1} of every step
  (no reuse of the end gradient), for each dataset, through a ``DataLoader`` that collates
  the items again at every evaluation;
- forms LCA per tensor with a Python loop over ``named_parameters``.

Torch runs with its default thread count. :func:`naive_lca` returns, per dataset, a
(steps, tensors) float64 array of per-tensor LCA, so the benchmark can check that the engine
gives the same numbers. :func:`save_checkpoints` writes the per-step files from a trajectory
store (the training side; not timed).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

SIMPSON = ((0.0, 1 / 6), (0.5, 4 / 6), (1.0, 1 / 6))


def save_checkpoints(store: str, directory: str) -> list[int]:
    """One ``step-T.safetensors`` full checkpoint per recorded step of ``store``."""
    import replay

    traj = replay.open_trajectory(store)
    os.makedirs(directory, exist_ok=True)
    for t, params, _ in traj.walk():
        save_file({k: v.contiguous() for k, v in params.items()},
                  os.path.join(directory, f"step-{t}.safetensors"))
    return list(traj.steps)


def gradient(task, model, items, batch_size: int) -> tuple[dict[str, torch.Tensor], float]:
    """∇L and L on the whole dataset: summed per-batch losses, divided by the total count."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for batch in DataLoader(items, batch_size=batch_size, shuffle=False,
                            collate_fn=task.collate):
        loss_sum, n = task.loss(model, batch)
        loss_sum.backward()
        total += loss_sum.item()
        count += int(n)
    grads = {name: p.grad.detach() / count for name, p in model.named_parameters()}
    return grads, total / count


def naive_lca(task, directory: str, steps: list[int], datasets: list[str],
              dtype: torch.dtype = torch.float32) -> tuple[list[str], dict[str, np.ndarray]]:
    """Per-tensor Simpson LCA for every interval: (names, {dataset: (T, n_tensors)})."""
    model = task.build_model().to(dtype).eval()
    names = [name for name, _ in model.named_parameters()]
    items = task.datasets()
    batch_size = getattr(task, "eval_batch_size", 256)
    out = {d: np.zeros((len(steps) - 1, len(names))) for d in datasets}
    for i, (t0, t1) in enumerate(zip(steps, steps[1:])):
        a = load_file(os.path.join(directory, f"step-{t0}.safetensors"))
        b = load_file(os.path.join(directory, f"step-{t1}.safetensors"))
        a = {k: v.to(dtype) for k, v in a.items()}
        b = {k: v.to(dtype) for k, v in b.items()}
        delta = {k: b[k] - a[k] for k in a}
        for d in datasets:
            gbar = {k: torch.zeros_like(v) for k, v in a.items()}
            for s, w in SIMPSON:
                theta = a if s == 0.0 else b if s == 1.0 else \
                    {k: a[k] + s * delta[k] for k in a}
                model.load_state_dict(theta, strict=False)
                grads, _ = gradient(task, model, items[d], batch_size)
                for k in gbar:
                    gbar[k] += w * grads[k]
            for j, name in enumerate(names):
                out[d][i, j] = float((delta[name] * gbar[name]).sum())
    return names, out
