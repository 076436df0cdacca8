"""The whole pipeline through its public API: record → replay.run → analysis.open_cube →
write_report, so that the engine's cube and the analysis's reading of it cannot drift apart."""

from __future__ import annotations

import json

import numpy as np
import torch

import analysis
import replay
from replay.cube import schema
from replay.tasks.tiny_mlp import TinyMLP

TASK = "replay.tasks.tiny_mlp:TinyMLP"
ARGS = {"seed": 1, "train_size": 64, "test_size": 32}


def test_record_replay_open_report(tmp_path):
    task = TinyMLP(**ARGS)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = task.datasets()["train"]
    store = str(tmp_path / "traj")
    with replay.Recorder(model, store, task=TASK, task_args=ARGS, keyframe_every=4) as rec:
        for step in range(8):
            loss, n = task.loss(model, task.collate(data[(step * 8) % 64:][:8]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss.item() / n)
    out = str(tmp_path / "lca.zarr")
    replay.run(store, task=TASK, out=out, scheduler="sync", quadrature="simpson",
               datasets=["train", "test"], progress=False)

    cube = analysis.open_cube(out)          # checks the schema the engine wrote
    schema.check(cube, out)
    assert set(schema.VARIABLES) <= set(cube.data_vars)
    assert sorted(cube.attrs) == sorted(schema.ATTRS)
    assert cube.lca.groupings == ["tensor", "layer"]  # the default: layer groups weight + bias
    settings = json.loads(cube.attrs["settings"])
    assert settings["groupings"] == ["tensor", "layer"] and settings["datasets"] == ["train", "test"]
    # every grouping partitions the parameters: the same total per grouping, and the total is
    # the measured loss change up to the quadrature residual
    totals = [float(cube.lca.grouping(g).lca.total().sel(dataset="train").sum())
              for g in cube.lca.groupings]
    assert np.isclose(totals[0], totals[1], rtol=1e-12)
    change = float((cube["loss_next"] - cube["loss"]).sel(dataset="train").sum())
    residual = float(cube["residual"].sel(dataset="train").sum())
    assert np.isclose(totals[0] + residual, change, rtol=1e-9, atol=1e-12)

    index = analysis.write_report(cube, tmp_path / "report", cube_path=out)
    assert index.exists() and (tmp_path / "report" / "summary.md").exists()
    figures = sorted(p.name for p in (tmp_path / "report").glob("fig-*.png"))
    assert figures and all((tmp_path / "report" / f).stat().st_size > 0 for f in figures)
    html = index.read_text()
    assert all(f'src="{name}"' in html for name in figures)
