"""The demo model replayed on a real SLURM — through dask-jobqueue and as a job array — gives
the cube of a local replay bit for bit (float64); trajectories and cubes at fsspec URLs work."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

from replay.cli import main
from tests.slurm import job_states, slurm, wait_for_jobs  # noqa: F401  (slurm is a fixture)

VARS = ("lca", "helped", "loss", "loss_next", "residual", "splits", "done")
TOY = ("{seed: 1, vocab_size: 24, train_size: 48, valid_size: 16, test_size: 16, min_len: 3, "
       "max_len: 5, d_model: 16, heads: 2, ffn_dim: 16, encoder_layers: 2, decoder_layers: 2, "
       "eval_batch_size: 32}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small ToyNMT recorded for 9 steps: 9 intervals in chunks of 3, float64 replay."""
    root = tmp_path_factory.mktemp("cluster-replay")
    config = root / "demo.yaml"
    config.write_text(
        f"task: {{ref: 'replay.tasks.toy_nmt:ToyNMT', args: {TOY}}}\n"
        "train: {steps: 9, lr: 0.01, batch_size: 8}\n"
        f"record: {{path: {root}/trajectory, keyframe_every: 4}}\n"
        "replay: {chunk_size: 3, precision: float64, groups: [transformer, tensor], "
        "datasets: [train, valid]}\n")
    assert main(["train", str(config)]) == 0
    reference = str(root / "local.zarr")
    assert main(["replay", str(config), "--cube", reference, "--scheduler", "sync",
                 "--no-progress"]) == 0
    return config, xr.open_zarr(reference)


def assert_same(path, reference):
    got = xr.open_zarr(path)
    assert bool(got["done"].all())
    for name in VARS:
        np.testing.assert_array_equal(got[name].values, reference[name].values, err_msg=name)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("slurm")
def test_slurm_cluster_replay_equals_local(demo, tmp_path):
    config, reference = demo
    cube = str(tmp_path / "slurm.zarr")
    assert main(["replay", str(config), "--cube", cube, "--scheduler", "slurm", "--jobs", "2",
                 "--cores", "1", "--memory", "1GB", "--walltime", "00:10:00",
                 "--no-progress"]) == 0
    assert_same(cube, reference)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.usefixtures("slurm")
def test_sbatch_array_of_three_equals_local(demo, tmp_path, capsys):
    config, reference = demo
    cube = str(tmp_path / "array.zarr")
    assert main(["submit", str(config), "--cube", cube, "--array", "3", "--mem", "1G",
                 "--time", "10"]) == 0
    out = capsys.readouterr().out
    array_job = re.search(r"submitted array job (\d+) \(3 tasks: 0:3, 3:6, 6:9\)", out).group(1)
    finish_job = re.search(r"submitted finishing job (\d+)", out).group(1)
    wait_for_jobs([array_job, finish_job], timeout=400)
    assert job_states(array_job) == ["COMPLETED"] * 3
    assert job_states(finish_job) == ["COMPLETED"]
    assert main(["status", cube]) == 0
    assert "9/9 steps done" in capsys.readouterr().out
    assert_same(cube, reference)


def test_fsspec_urls_for_trajectory_and_cube(demo):
    import replay

    config, reference = demo
    store = str(config.parent / "trajectory")
    cube = replay.run(f"file://{store}", task="replay.tasks.toy_nmt:ToyNMT",
                      out="memory://lca-test/cube.zarr", scheduler="sync", chunk_size=3,
                      precision="float64", groups=["transformer", "tensor"],
                      datasets=["train", "valid"], progress=False)
    for name in VARS:
        np.testing.assert_array_equal(cube[name].values, reference[name].values, err_msg=name)
    params = replay.load_param_lca("memory://lca-test/cube.zarr")
    total = sum(float(t.sum()) for t in params["train"].values())
    by_group = float(cube["lca"].sel(dataset="train", group=cube.grouping == "tensor").sum())
    assert total == pytest.approx(by_group, rel=1e-9)
