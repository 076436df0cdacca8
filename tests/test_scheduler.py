"""The clusters a replay starts itself: what their worker processes run with."""

from __future__ import annotations

import os

import pytest

from replay.cluster.executor import executor
from replay.cluster.worker_env import QUIET_DASK, local_cluster


def _worker_view():
    import dask

    return {"trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            **{key: dask.config.get(key) for key in QUIET_DASK}}


def _extensions(dask_scheduler):
    return sorted(dask_scheduler.extensions)


@pytest.mark.parametrize("threads", [1, 2])
def test_local_workers_run_quiet_with_glibc_malloc_defaults(threads):
    with executor(f"local:{2 if threads == 1 else 1}", threads=threads) as (_, desc):
        from distributed import get_client

        client = get_client()
        views = client.run(_worker_view)
        assert "stealing" not in client.run_on_scheduler(_extensions)
    assert desc.startswith("LocalCluster (")
    for view in views.values():
        # Dask's nanny would export MALLOC_TRIM_THRESHOLD_=65536: torch at half speed
        assert view["trim"] is None and view["omp"] == str(threads)
        assert {k: view[k] for k in QUIET_DASK} == QUIET_DASK


def test_the_threads_scheduler_does_not_steal_either():
    with executor("threads:2") as (_, desc):
        from distributed import get_client

        assert "stealing" not in get_client().run_on_scheduler(_extensions)
    assert desc == "threads (2 in this process)"


def test_local_cluster_takes_overrides():
    with local_cluster(1, 1, silence_logs=50) as cluster:
        assert len(cluster.workers) == 1
