"""Dask tasks of a replay: lanes of pieces, grouped once a lane's speed is known."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import xarray as xr

import replay
from replay.cluster import lanes
from tests.test_engine import ARGS, TASK, record


def test_lanes_are_contiguous_and_cover_the_pieces():
    pieces = [(i, i + 1) for i in range(7)]
    cut = lanes.split_lanes(pieces, 3)
    assert [len(lane) for lane in cut] == [2, 3, 2]
    assert sum(cut, []) == pieces
    assert lanes.split_lanes(pieces[:2], 4) == [[(0, 1)], [(1, 2)]]


def test_a_group_fills_the_task_seconds_once_the_rate_is_known():
    pieces = [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)]
    lane = deque(pieces)
    assert lanes.take_group(lane, None) == [(0, 3)]  # the lane's speed is not known yet
    # 0.1 s per step: 10 steps in a task's second, so 3 pieces of 3 steps, not a 4th.
    assert lanes.take_group(lane, 0.1) == [(3, 6), (6, 9), (9, 12)]
    # A piece longer than the budget still goes, alone.
    assert lanes.take_group(lane, 10.0) == [(12, 15)]
    assert not lane


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return record(str(tmp_path_factory.mktemp("lanes") / "traj"))


def test_fast_pieces_go_in_fewer_tasks_with_the_same_cube(store, tmp_path, monkeypatch):
    from distributed import Client, get_task_stream

    from replay.cluster.worker_env import local_cluster

    kw = dict(task=TASK, task_args=ARGS, precision="float64", progress=False, chunk_size=1,
              groups=["tensor"])
    base = replay.run(store, out=str(tmp_path / "sync.zarr"), scheduler="sync", **kw)
    # Whatever this machine's speed: every piece fits in a task once the lane's rate is known.
    monkeypatch.setattr(lanes, "TASK_SECONDS", 1e6)
    cluster = local_cluster(2, 1)
    try:
        with Client(cluster) as client:
            with get_task_stream(client) as stream:
                other = replay.run(store, out=str(tmp_path / "dask.zarr"), scheduler=client,
                                   **kw)
            tasks = [t for t in stream.data if "_run_group" in t["key"]]
    finally:
        cluster.close()
    # 12 one-step pieces in 2 lanes of 6: per lane two single pieces, then the rest together.
    assert len(tasks) == 6, [t["key"] for t in tasks]
    for var in ("lca", "helped", "loss", "loss_next", "residual", "splits", "done"):
        assert np.array_equal(base[var].values, other[var].values), var
    a, b = replay.load_param_lca(str(tmp_path / "sync.zarr")), replay.load_param_lca(
        str(tmp_path / "dask.zarr"))
    assert all(bool((a[d][k] == b[d][k]).all()) for d in a for k in a[d])
    assert xr.open_zarr(tmp_path / "dask.zarr")["done"].values.all()


def test_a_groups_results_travel_packed_and_come_back_the_same():
    from replay.cluster.executor import _pack, _unpack

    rng = np.random.default_rng(0)
    for parts in (True, False):
        results = [{"lca": rng.random((n, 3, 2)), "helped": np.ones((n, 3, 2), np.int64),
                    "loss": rng.random((n, 2)), "splits": np.arange(n), "i0": i0,
                    "i1": i0 + n, "evaluations": 2 * n, "forwards": 0, "seconds": 0.5 * n,
                    "parts": [rng.random(7), rng.random(7)] if parts else None}
                   for i0, n in ((0, 3), (3, 1), (4, 4))]
        packed = _pack(results)
        assert sum(isinstance(v, np.ndarray) for v in packed["steps"].values()) == 4
        for a, b in zip(results, _unpack(packed), strict=True):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if key == "parts":
                    assert (value is None and b[key] is None) or all(
                        np.array_equal(x, y) for x, y in zip(value, b[key], strict=True))
                elif isinstance(value, np.ndarray):
                    assert np.array_equal(value, b[key]) and value.dtype == b[key].dtype
                else:
                    assert value == b[key] and type(value) is type(b[key])
