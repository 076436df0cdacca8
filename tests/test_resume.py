"""A replay killed with SIGKILL resumes to exactly the cube of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr

import replay
from tests.test_engine import ARGS, TASK, record


def lca_cli(*args):
    return [sys.executable, "-m", "replay.cli", *args]


def done_count(cube):
    try:
        return int(np.asarray(zarr.open_group(cube, mode="r", use_consolidated=False)["done"][:]).sum())
    except Exception:
        return 0


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    store = record(str(tmp_path / "traj"), steps=40)
    # Enough data that the replay takes several seconds of compute: the driver writes
    # finished pieces every few seconds (replay.cube.buffer), so the kill must land mid-way.
    common = ["--task", TASK, "--task-args", json.dumps({**ARGS, "train_size": 2000}),
              "--precision",
              "float64", "--scheduler", "sync", "--chunk-size", "2", "--quadrature", "adaptive",
              "--tolerance", "1e-12", "--max-splits", "16", "--no-progress"]
    cube = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen(lca_cli("replay", store, "--cube", cube, *common),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while done_count(cube) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "replay finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = done_count(cube)
    assert 0 < killed_at < 40
    with pytest.raises(replay.errors.CubeError, match="not complete"):
        replay.load_param_lca(cube)
    rerun = subprocess.run(lca_cli("replay", store, "--cube", cube, *common), capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr
    whole = str(tmp_path / "whole.zarr")
    subprocess.run(lca_cli("replay", store, "--cube", whole, *common), check=True,
                   capture_output=True)
    x, y = xr.open_zarr(cube), xr.open_zarr(whole)
    assert bool(x.done.all())
    for var in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
        assert np.array_equal(x[var].values, y[var].values), var
    p, q = replay.load_param_lca(cube), replay.load_param_lca(whole)
    for name in p["train"]:
        np.testing.assert_allclose(p["train"][name], q["train"][name], rtol=1e-12, atol=1e-15)
