"""What every Dask worker of a replay runs with: its thread counts, glibc's malloc defaults and
Dask's background work turned down, and no copy of the user's ``__main__``; and the LocalCluster
of ``scheduler="local"``.

Shared by the in-process executors (:mod:`replay.cluster.executor`) and the batch-system
clusters (:mod:`replay.cluster.jobqueue`), which export the same settings to their jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.spawn
import os
import sys
import threading


def thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "NUMBA_NUM_THREADS": n}


# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to
# the OS). Setting it switches off glibc's adaptive mmap threshold, so every tensor above
# 128 KiB is mmapped and unmapped again, page faults and all: a torch forward + backward runs
# much slower than in a plain process. Replay workers start without it.
_DASK_TRIM = "MALLOC_TRIM_THRESHOLD_"


@contextlib.contextmanager
def glibc_default_malloc():
    """Start Dask worker processes with glibc's default (adaptive) malloc settings."""
    import dask

    # An earlier nanny in this process may have exported Dask's value into os.environ, which
    # spawned workers inherit; leave a value the user set to something else alone.
    default = str(dask.config.get(f"distributed.nanny.pre-spawn-environ.{_DASK_TRIM}", ""))
    saved = os.environ.get(_DASK_TRIM)
    if saved is not None and saved == default:
        del os.environ[_DASK_TRIM]
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{_DASK_TRIM}": None}):
            yield
    finally:
        if saved is not None:
            os.environ[_DASK_TRIM] = saved


# Dask's own background work, turned down in the clusters a replay starts: idle, two
# workers with Dask's defaults take a noticeable share of a core between them and their driver,
# taken from the gradient evaluations on a small machine (docs/benchmarks.md has the figures).
QUIET_DASK = {
    "distributed.worker.profile.enabled": False,  # samples every worker thread each 10 ms (GIL)
    "distributed.admin.tick.interval": "1s",  # event-loop watchdog in every process (20 ms)
    "distributed.admin.system-monitor.interval": "5s",  # CPU/memory history for dashboards
    "distributed.worker.memory.monitor-interval": "500ms",  # nanny and worker memory checks
    # The pinned lanes of run_dask are balanced already; a stolen piece runs where its first
    # gradient is not held: one more evaluation (seen about once in 20 fresh clusters, when
    # one worker's first task started late).
    "distributed.scheduler.work-stealing": False,
}


_SPAWN_LOCK = threading.Lock()
_SPAWN_USERS = 0
_SPAWN_ORIGINAL = multiprocessing.spawn.get_preparation_data


def _preparation_without_main(name):
    data = _SPAWN_ORIGINAL(name)
    data.pop("init_main_from_path", None)
    data.pop("init_main_from_name", None)
    return data


@contextlib.contextmanager
def main_stays_home():
    """Processes that multiprocessing spawns meanwhile do not re-run the user's ``__main__``.

    The "spawn" start method (Dask's default) prepares each child by running the parent's main
    script or ``-m`` module again as ``__mp_main__``. A script without an
    ``if __name__ == "__main__":`` guard would then repeat, in every Dask worker, its training
    and its ``replay.run`` (whose own cluster start fails: Dask's "Nanny failed to start").
    Workers need nothing from it: Dask pickles objects defined in ``__main__`` by value
    (cloudpickle). Held for the cluster's whole life, so a worker the nanny restarts is
    spared too; the patch is undone when the last holder leaves.
    """
    global _SPAWN_USERS
    with _SPAWN_LOCK:
        _SPAWN_USERS += 1
        multiprocessing.spawn.get_preparation_data = _preparation_without_main
    try:
        yield
    finally:
        with _SPAWN_LOCK:
            _SPAWN_USERS -= 1
            if _SPAWN_USERS == 0:
                multiprocessing.spawn.get_preparation_data = _SPAWN_ORIGINAL


def local_cluster(n_workers: int, threads: int = 1, **kwargs):
    """The LocalCluster of ``scheduler="local"``: ``n_workers`` processes of one task slot each,
    torch and numba at ``threads`` threads, glibc's malloc defaults, Dask's background work
    turned down (:data:`QUIET_DASK`). ``kwargs`` go to ``LocalCluster``. Hold
    :func:`main_stays_home` while it lives, or its workers re-run the user's main script."""
    import dask
    from distributed import LocalCluster

    with glibc_default_malloc(), dask.config.set(QUIET_DASK):
        return LocalCluster(**{"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                               "dashboard_address": ":0", "env": thread_env(threads),
                               "silence_logs": 40, **kwargs})


_MALLOC_CHECKED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def restore_malloc_thresholds() -> None:
    """In a worker that a Dask nanny started with its trim setting (batch-system and
    ``dask worker`` clusters, where :func:`glibc_default_malloc` cannot reach): set the
    thresholds glibc's adaptive default settles at (mmap above 32 MiB, trim above 64 MiB), so
    tensors are reused from the heap again. Once per process; memory policy only."""
    global _MALLOC_CHECKED
    if _MALLOC_CHECKED:
        return
    _MALLOC_CHECKED = True
    if not sys.platform.startswith("linux") or _DASK_TRIM not in os.environ:
        return
    try:
        import dask
        from distributed import get_worker

        get_worker()  # not under Dask (sync): the user's process keeps its own settings
        if os.environ[_DASK_TRIM] != str(
                dask.config.get(f"distributed.nanny.pre-spawn-environ.{_DASK_TRIM}", "")):
            return  # someone chose another value on purpose
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (ImportError, ValueError, OSError, AttributeError):
        pass  # not glibc, or not in a Dask worker: nothing to restore
