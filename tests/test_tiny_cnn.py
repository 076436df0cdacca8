"""replay.tasks.tiny_cnn: a real Task (sum-reduced loss, seeded data) that a replay accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import replay
from replay.task import load_task

TASK = "replay.tasks.tiny_cnn:TinyCNN"
ARGS = {"seed": 3, "size": 8, "channels": 4, "train_size": 40, "test_size": 12}


def test_the_loss_is_a_sum_over_items_and_the_data_a_function_of_the_seed():
    task = load_task(TASK, ARGS)
    again = load_task(TASK, ARGS)
    items = task.datasets()["train"]
    assert len(items) == 40 and len(task.datasets()["test"]) == 12
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1]
               for a, b in zip(items, again.datasets()["train"]))
    model = task.build_model()
    with torch.no_grad():
        whole, n = task.loss(model, task.collate(items[:6]))
        parts = sum(float(task.loss(model, task.collate([it]))[0]) for it in items[:6])
    assert n == 6 and abs(float(whole) - parts) < 1e-4 * max(1.0, abs(parts))
    first = [p.detach().clone() for p in task.build_model().parameters()]
    assert all(torch.equal(a, b.detach()) for a, b in zip(first, model.parameters()))


@pytest.mark.slow
def test_a_replay_of_it_telescopes(tmp_path):
    task = load_task(TASK, ARGS)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = task.datasets()["train"]
    with replay.Recorder(model, tmp_path / "traj", task=TASK, task_args=ARGS) as rec:
        for step in range(3):
            loss, n = task.loss(model, task.collate(data[step * 8:step * 8 + 8]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=float(loss.detach()) / n)
    cube = replay.run(str(tmp_path / "traj"), task=TASK, task_args=ARGS, datasets=["test"],
                      groups="tensor",
                      quadrature="adaptive", tolerance=1e-7, precision="float64",
                      out=str(tmp_path / "c.zarr"), scheduler="sync", progress=False)
    change = cube["loss_next"].values - cube["loss"].values
    total = cube["lca"].sum("group").values       # one grouping: every tensor once
    # ReLU and max-pooling make the loss piecewise smooth along an update: the quadrature
    # error is small, not zero, and the residual accounts for it.
    assert np.allclose(total, change, rtol=1e-2, atol=1e-7)
    assert np.allclose(total + cube["residual"].values, change, rtol=1e-9, atol=1e-12)
