"""Where replay tasks run (docs/design.md §8): in-process, a Dask LocalCluster, an existing Dask
scheduler, or a dask-jobqueue cluster on a batch system.

``executor(...)`` is a context manager yielding ``(run, description)``: ``run(fn, spec, pieces)``
returns an iterator of the pieces' results in completion order, where ``fn(spec, pieces)``
yields the results of pieces it is given in order (:func:`replay.engine.piece.compute_pieces`):
in-process all of them in one call, on Dask a task's group. Every worker runs torch with
``threads`` intra-op threads, because float results depend on the thread count and a replay
must give the same numbers for any scheduler.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

from replay.cluster.lanes import run_lanes
from replay.cluster.worker_env import (QUIET_DASK, local_cluster, main_stays_home,
                                       restore_malloc_thresholds)
from replay.errors import ConfigError, ReplayError

JOBQUEUE = ("slurm", "pbs", "lsf", "sge", "oar", "htcondor", "moab")
SCHEDULERS = "sync, threads[:N], local[:N], tcp://HOST:PORT, a scheduler file (.json), " + \
    ", ".join(JOBQUEUE)


def _why(err: BaseException) -> str:
    """The root cause of a Dask start-up failure as ``Type: first line of its message``."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    for e in reversed(seen):  # the innermost exception that says something
        text = str(e).strip().splitlines()
        if text:
            return f"{type(e).__name__}: {text[0]}"
    return type(seen[-1]).__name__


def _count(spec: str, name: str) -> int | None:
    if spec == name:
        return None
    try:
        value = int(spec.split(":", 1)[1])
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"scheduler {spec!r}: the worker count after ':' must be a positive integer")
    return value


@contextlib.contextmanager
def executor(scheduler, *, threads: int = 1, device: str = "cpu",
             cluster_options: dict | None = None):
    """Yield ``(run, description)`` for the named scheduler (or a ``distributed.Client``)."""
    if scheduler == "sync":
        def run_sync(fn, spec, pieces):
            import numba
            import torch

            saved = torch.get_num_threads(), numba.get_num_threads()
            try:
                yield from _with_threads(fn, spec, pieces, threads)
            finally:  # the caller's process (often IPython) keeps its own settings
                torch.set_num_threads(saved[0])
                numba.set_num_threads(saved[1])
        yield run_sync, "sync (in-process, one task at a time)"
        return

    import dask
    from distributed import Client, LocalCluster

    owned = contextlib.ExitStack()  # closed in reverse: client, cluster, then main_stays_home
    try:
        if isinstance(scheduler, Client):
            client, desc = scheduler, f"client {scheduler.scheduler.address}"
        elif not isinstance(scheduler, str):
            raise ConfigError(f"unknown scheduler {scheduler!r}; valid: {SCHEDULERS}")
        elif scheduler == "threads" or scheduler.startswith("threads:"):
            n = _count(scheduler, "threads") or max(1, (os.cpu_count() or 1) // threads)
            with dask.config.set(QUIET_DASK):
                cluster = LocalCluster(n_workers=1, threads_per_worker=n, processes=False,
                                       dashboard_address=":0")
            owned.callback(cluster.close)
            client, desc = Client(cluster), f"threads ({n} in this process)"
        elif scheduler == "local" or scheduler.startswith("local:"):
            n = _count(scheduler, "local") or max(1, (os.cpu_count() or 1) // threads)
            owned.enter_context(main_stays_home())
            try:
                cluster = local_cluster(n, threads)
            except Exception as err:
                raise ReplayError(
                    f"the Dask LocalCluster of scheduler {scheduler!r} did not start its {n} "
                    f"worker process(es) ({_why(err)}); run in this process with "
                    "scheduler='sync' (CLI: --scheduler sync) or 'threads', or fix the Dask "
                    "configuration that the error names") from None
            owned.callback(cluster.close)
            client, desc = Client(cluster), f"LocalCluster ({n} worker processes)"
        elif scheduler.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
            client, desc = _connect(scheduler, address=scheduler), f"scheduler {scheduler}"
        elif scheduler.endswith(".json"):
            if not os.path.exists(scheduler):
                raise ConfigError(f"scheduler file {scheduler} does not exist; start a scheduler "
                                  f"with `dask scheduler --scheduler-file {scheduler}`")
            client = _connect(f"the scheduler of file {scheduler}", scheduler_file=scheduler)
            desc = f"scheduler file {scheduler}"
        elif scheduler in JOBQUEUE:
            from replay.cluster.jobqueue import make_jobqueue_cluster

            opts = dict(cluster_options or {})
            cluster = make_jobqueue_cluster(scheduler, threads=threads, device=device, **opts)
            owned.callback(cluster.close)
            client = Client(cluster)
            desc = f"{scheduler} cluster ({opts.get('jobs') or 'default number of'} jobs)"
        else:
            raise ConfigError(f"unknown scheduler {scheduler!r}; valid: {SCHEDULERS}")
        if client is not scheduler:
            owned.callback(client.close)  # before the cluster it talks to

        def run_dask(fn, spec, pieces) -> Iterator[dict]:
            from distributed import as_completed

            try:  # task slots now; a batch-system cluster may still be starting (none)
                slots = [addr for addr, n in sorted(client.nthreads().items())
                         for _ in range(n)]
            except Exception:  # an unreachable scheduler fails just below, with its own error
                slots = []
            if slots:
                yield from run_lanes(client, _run_group, (fn, spec, threads), pieces, slots,
                                     unpack=_unpack)
                return
            # No worker yet: every piece its own task, placed by Dask as workers arrive.
            futures = [client.submit(_run_group, fn, spec, threads, [piece], pure=False,
                                     priority=len(pieces) - k)
                       for k, piece in enumerate(pieces)]
            try:
                for future in as_completed(futures):
                    yield from _unpack(future.result())
            finally:
                for f in futures:
                    f.cancel()

        yield run_dask, desc
    finally:
        with contextlib.suppress(Exception):
            owned.close()


def _connect(what: str, **where):
    """A ``distributed.Client`` of an existing scheduler, or a one-line ReplayError."""
    from distributed import Client

    try:
        return Client(**where)
    except Exception as err:
        raise ReplayError(f"could not connect to {what} ({_why(err)}); check that the scheduler "
                          "runs (`dask scheduler`) and is reachable from here, or run with "
                          "scheduler='local'") from None


def _run_group(fn, spec, threads, group) -> dict:
    """The pieces of one Dask task (:mod:`replay.cluster.lanes`), run in order; their results
    packed (:func:`_pack`)."""
    return _pack(list(_with_threads(fn, spec, group, threads)))


def _pack(results: list[dict]) -> dict:
    """Piece results as a few arrays: each per-step array of the pieces joined along steps,
    their partial sums stacked per dataset, each number in one array. Dask frames every array
    of a result on its own, which for a group of dozens of pieces costs the client milliseconds
    per task; :func:`_unpack` gives back the same results."""
    first = results[0]
    return {
        "steps": {k: np.concatenate([r[k] for r in results])
                  for k, v in first.items() if isinstance(v, np.ndarray)},
        "numbers": {k: np.array([r[k] for r in results])
                    for k, v in first.items() if k != "parts" and not isinstance(v, np.ndarray)},
        "parts": None if first["parts"] is None else
        [np.stack([r["parts"][d] for r in results]) for d in range(len(first["parts"]))],
    }


def _unpack(packed: dict) -> list[dict]:
    """The piece results of :func:`_pack`, each per-step array a view of the joined one."""
    numbers, parts = packed["numbers"], packed["parts"]
    out, a = [], 0
    for k in range(len(numbers["i0"])):
        b = a + int(numbers["i1"][k] - numbers["i0"][k])
        result = {key: v[k].item() for key, v in numbers.items()}
        result.update({key: v[a:b] for key, v in packed["steps"].items()})
        result["parts"] = None if parts is None else [rows[k] for rows in parts]
        out.append(result)
        a = b
    return out


def _with_threads(fn, spec, pieces, threads):
    import numba

    restore_malloc_thresholds()

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return fn(spec, pieces)
