"""Benchmark: Dask scaling, 2 workers vs 1, and a cost model for N workers.

Two LocalClusters run side by side (1 and 2 single-threaded worker processes, ``threads=1``
per task, started as ``scheduler="local"`` starts them); the same exact Simpson replay of the
demo model (``--steps`` updates in ``--chunks`` pieces) alternates between them, and the
speed-up is the ratio of the median wall times (target >= 1.7 on 2 cores). Cluster start-up
is excluded (timed once and shown).

Two references put the speed-up in context: the machine's ceiling (the plain gradient loop
in both workers at once vs in one: what two single-threaded processes get from these cores,
whatever the software) and the evaluation count (each worker's first piece cannot reuse an
end gradient). From the 1-worker runs' Dask task stream come the costs of the model:

- ``e``: one gradient evaluation (the plain loop in a worker, alone);
- ``o``: engine work per piece beyond its evaluations (reading deltas, the reduction, the
  partial write, task overhead), = (task time − evaluations · e) / pieces;
- ``D``: the driver's serial time (planning, cube writes, final sums, dispatch) = wall time −
  task time;

and the expected wall time of T steps in P pieces on N workers (a lane of pieces per
worker, one extra evaluation per lane)::

    T(N) = D + e + ceil(P / N) · (o + 2e · T / P)

Usage::

    python benchmarks/bench_scaling.py [--steps 24] [--chunks 4] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import common
from bench_replay import DATASETS, GROUPS, engine_run


def _plain_evaluations(bench_dir: str, store: str, n: int) -> float:
    """In a worker: seconds for ``n`` plain gradient evaluations of the demo (1 thread)."""
    import sys

    sys.path.insert(0, bench_dir)
    import common
    from bench_replay import DATASETS, PlainLoop, simpson_points

    task = common.demo_task()
    loop = PlainLoop(task, DATASETS, task.eval_batch_size)
    points = simpson_points(store, n)
    loop.run(points[:1])
    began = time.perf_counter()
    loop.run(points)
    return time.perf_counter() - began


def machine_ceiling(client, store: str, n: int, repeats: int) -> tuple[float, float]:
    """(throughput of the plain loop in both workers at once over one worker alone, seconds
    per evaluation alone): what two single-threaded processes get from this machine."""
    here = os.path.dirname(os.path.abspath(__file__))
    workers = sorted(client.nthreads())
    alone, pair = [], []
    for _ in range(repeats + 1):
        alone.append(client.submit(_plain_evaluations, here, store, n, workers=workers[:1],
                                   pure=False).result())
        futures = [client.submit(_plain_evaluations, here, store, n, workers=[w], pure=False)
                   for w in workers[:2]]
        pair.append(max(f.result() for f in futures))
    # The first round loads the task in each worker: not part of the throughput.
    return 2 * common.median(alone[1:]) / common.median(pair[1:]), common.median(alone[1:]) / n


def predict(steps: int, pieces: int, workers: int, e: float, o: float, d: float) -> float:
    """Expected wall time: pieces dealt to workers in lanes, one cold start per lane."""
    pieces = min(pieces, steps)
    return d + e + math.ceil(pieces / min(workers, pieces)) * (o + 2 * e * steps / pieces)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=24, help="recorded updates replayed (24)")
    p.add_argument("--chunks", type=int, default=4, help="pieces (Dask tasks) (4)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (3)")
    p.add_argument("--work", default=None, help="directory for trajectories (reused) and cubes")
    p.add_argument("--quick", action="store_true", help="12 steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 12), 1
    from distributed import Client, get_task_stream

    from replay.cluster.worker_env import local_cluster

    work = args.work or tempfile.mkdtemp(prefix="bench-scaling-")
    store = common.record_demo(os.path.join(work, f"demo-{args.steps}"), args.steps)
    chunk = math.ceil(args.steps / args.chunks)
    pieces = math.ceil(args.steps / chunk)
    kw = dict(quadrature="simpson", threads=1, datasets=DATASETS, groups=GROUPS,
              chunk_size=chunk)
    clusters, clients, start = {}, {}, {}
    evals, busy = {}, []
    try:
        for n in (1, 2):
            began = time.perf_counter()
            clusters[n] = local_cluster(n, 1)  # as scheduler="local" starts its workers
            clients[n] = Client(clusters[n])
            start[n] = time.perf_counter() - began

        def case(n):
            def go():
                with get_task_stream(client=clients[n]) as stream:
                    evals[n], _ = engine_run(store, os.path.join(work, f"scaling-{n}.zarr"),
                                             scheduler=clients[n], **kw)
                if n == 1:  # the worker's busy time: the replay tasks, end to end
                    busy.append(sum(s["stop"] - s["start"] for task in stream.data
                                    for s in task["startstops"] if s["action"] == "compute"))
            return go

        warm = {n: (lambda n=n: engine_run(store, os.path.join(work, f"scaling-{n}.zarr"),
                                           scheduler=clients[n], steps="0:2", **kw))
                for n in (1, 2)}
        times = common.interleave({n: case(n) for n in (1, 2)}, args.repeats, warmup=warm)
        ceiling, e = machine_ceiling(clients[2], store, 6, max(1, args.repeats - 1))
    finally:
        for n in clients:
            clients[n].close()
            clusters[n].close()
    t1, t2 = common.median(times[1]), common.median(times[2])
    speedup = t1 / t2
    task_time = common.median(busy)
    d = max(0.0, t1 - task_time)
    o_raw = (task_time - evals[1] * e) / pieces  # may come out < 0: within e's noise
    o = max(0.0, o_raw)
    by_evals = evals[1] / (evals[2] / 2)
    common.log(f"demo ToyNMT, {args.steps} steps in {pieces} pieces of {chunk}, exact Simpson, "
               f"1 torch thread per worker; median of {args.repeats} interleaved runs "
               f"(cluster start-up, excluded: {start[1]:.1f} s / {start[2]:.1f} s)")
    common.log(f"  1 worker   {t1:7.2f} s  ({evals[1]} evaluations)")
    common.log(f"  2 workers  {t2:7.2f} s  ({evals[2]} evaluations)  speed-up "
               f"{speedup:.2f}x (target >= 1.7)")
    common.log(f"  machine ceiling: 2 plain-loop processes at once do {ceiling:.2f}x the work "
               f"of one; the evaluation counts allow {by_evals:.2f}x; the engine reaches "
               f"{speedup / min(ceiling, by_evals):.0%} of the lower")
    common.log(f"costs: evaluation e = {e * 1e3:.0f} ms; engine work per piece beyond its "
               f"evaluations o = {o_raw * 1e3:.0f} ms ({o_raw / (2 * e * chunk):+.1%} of a "
               f"piece's gradient work); driver serial D = {d:.2f} s per run ({d / t1:.1%} of the "
               f"1-worker time)")
    common.log(f"model check: predicted {predict(args.steps, pieces, 1, e, o, d):.2f} s / "
               f"{predict(args.steps, pieces, 2, e, o, d):.2f} s for 1 / 2 workers with ideal "
               f"cores; {predict(args.steps, pieces, 2, e * 2 / ceiling, o * 2 / ceiling, d):.2f}"
               " s for 2 workers at this machine's ceiling")
    lines = []
    for steps, per_worker in ((300, None), (3000, 4)):
        out = []
        for n in (1, 2, 4, 8, 16, 32, 64):
            pcs = 16 if per_worker is None else per_worker * n  # 16: engine default
            t_1 = predict(steps, pcs if per_worker is None else per_worker, 1, e, o, d)
            out.append(f"N={n}: {t_1 / predict(steps, pcs, n, e, o, d):.1f}x")
        label = ("demo (300 steps, default 16 pieces)" if per_worker is None
                 else "3000 steps, 4 pieces per worker")
        lines.append(f"expected speed-up, {label}: " + ", ".join(out))
        common.log(lines[-1])
    rows = [common.row("Dask scaling, 2 workers vs 1 (2 cores)", speedup, ">= 1.7x",
                       speedup >= 1.7, f"{t1:.1f} s vs {t2:.1f} s, {pieces} pieces; machine "
                       f"ceiling {ceiling:.2f}x (2 plain loops at once); serial "
                       f"{d / t1:.1%}", fmt="{:.2f}x")]
    common.emit("scaling", rows, e=e, o=o, d=d, ceiling=ceiling, expected=lines)
    return {"speedup": speedup, "ceiling": ceiling, "e": e, "o": o, "d": d}


if __name__ == "__main__":
    main()
