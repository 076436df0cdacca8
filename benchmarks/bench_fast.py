"""Benchmark: replay efficiency on a fast model, where the engine's own costs show.

``replay.tasks.tiny_cnn:TinyCNN`` (two convolutions on 8×8 images, 1,562 parameters), whose
gradient evaluation of its train and test splits together takes milliseconds, trained with
Adam (batch 32) and recorded for ``--steps`` updates. An exact Simpson replay (``replay.run``
end to end, datasets train and test, ``groups="tensor"``, 1 torch thread), with
``scheduler="sync"`` and on a running 1-worker LocalCluster (the ``local`` scheduler's worker
process, started once outside the timing; a run that starts its own cluster is shown apart),
against a plain torch loop in this process doing the engine's own number of gradient
evaluations at the same points over the same batches at 1 thread (``bench_replay.PlainLoop``).
Efficiency = loop time / engine time (target >= 0.9), for each replay length: the median of
the ratios within each round of interleaved runs (``common.paired``), three times as many
rounds for a replay of at most 100 steps; the ratio of the medians is printed beside it. The
cube a run leaves is removed before the next, untimed. Usage::

    python benchmarks/bench_fast.py [--steps 40,400] [--repeats 5] [--train-size 256]
                                    [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

import common
from bench_replay import PlainLoop, engine_run, simpson_points

TASK = "replay.tasks.tiny_cnn:TinyCNN"
DATASETS = ["train", "test"]


def task_args(args) -> dict:
    return {"seed": 0, "size": 8, "channels": 8, "classes": 10,
            "train_size": args.train_size, "test_size": args.train_size // 4}


def record_cnn(path: str, steps: int, targs: dict, batch_size: int = 32) -> str:
    """Adam steps of TinyCNN (batches of ``batch_size`` from train), each one recorded."""
    import replay
    from replay.task import load_task

    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    task = load_task(TASK, targs)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = task.datasets()["train"]
    with replay.Recorder(model, path, task=TASK, task_args=targs) as rec:
        for step in range(steps):
            start = (step * batch_size) % len(data)
            items = (data + data)[start:start + batch_size]
            loss, n = task.loss(model, task.collate(items))
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec.step(loss=float(loss.detach()) / n)
    return path


def measure(args, steps: int, targs: dict, work: str, loop, client) -> list[dict]:
    """The rows of one replay length: sync and local efficiency against the plain loop."""
    kw = dict(task_args=targs, datasets=DATASETS, quadrature="simpson", threads=1,
              groups="tensor")
    out = os.path.join(work, "fast.zarr")
    store = record_cnn(os.path.join(work, f"cnn-{args.train_size}-{steps}"), steps, targs)
    evaluations, _ = engine_run(store, out, task=TASK, scheduler="sync", **kw)
    engine_run(store, out, task=TASK, scheduler=client, **kw)      # the worker warms up
    points = simpson_points(store, evaluations)
    # A short replay's runs are ten times shorter, and noisier: more of them, in the same time.
    repeats = args.repeats * (3 if steps <= 100 and not args.quick else 1)
    times = common.interleave({
        "sync": lambda: engine_run(store, out, task=TASK, scheduler="sync", clean=False, **kw),
        "local": lambda: engine_run(store, out, task=TASK, scheduler=client, clean=False, **kw),
        "bound": lambda: loop.run(points),
    }, repeats, warmup={"bound": lambda: loop.run(points[:3])},
        before={"sync": common.removal(out), "local": common.removal(out)})
    t0 = time.perf_counter()
    engine_run(store, out, task=TASK, scheduler="local:1", **kw)
    cold = time.perf_counter() - t0
    med = {k: common.median(v) for k, v in times.items()}
    per_eval = med["bound"] / evaluations * 1e3
    common.log(f"TinyCNN, {steps} steps, exact Simpson on train ({args.train_size}) + test "
               f"({args.train_size // 4}), {evaluations} gradient evaluations of "
               f"{per_eval:.1f} ms each (plain loop), 1 thread; median of {repeats} "
               "interleaved runs")
    for name in ("sync", "local", "bound"):
        common.log(f"  {name:6s} {med[name]:7.3f} s  (runs "
                   f"{', '.join(f'{x:.3f}' for x in times[name])})")
    common.log(f"  local:1 starting its own cluster: {cold:.2f} s")
    rows = []
    for name in ("sync", "local"):
        eff = common.paired(times, "bound", name)
        common.log(f"  efficiency {name} = {eff:.3f} (target >= 0.9; median of the rounds' "
                   f"ratios; ratio of the medians {med['bound'] / med[name]:.3f})")
        rows.append(common.row(
            f"fast-model replay efficiency, {steps} steps, {name}", eff, ">= 0.9", eff >= 0.9,
            f"{med[name]:.2f} s vs {med['bound']:.2f} s, {evaluations} evaluations of "
            f"{per_eval:.1f} ms" + ("; 1 worker, running cluster" if name == "local" else ""),
            fmt="{:.3f}"))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="40,400", help="replay lengths, comma-separated (40,400)")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved repeats (5; three times as many for <= 100 steps)")
    p.add_argument("--train-size", type=int, default=256, help="train split size; test 1/4")
    p.add_argument("--work", default=None, help="directory for trajectories (reused) and cubes")
    p.add_argument("--quick", action="store_true", help="40 steps only, 1 repeat")
    args = p.parse_args(argv)
    lengths = [int(s) for s in args.steps.split(",")]
    if args.quick:
        lengths, args.repeats = [min(lengths)], 1
    from distributed import Client

    from replay.cluster.worker_env import local_cluster
    from replay.task import load_task

    targs = task_args(args)
    owned = args.work is None
    work = args.work or tempfile.mkdtemp(prefix="bench-fast-")
    task = load_task(TASK, targs)
    loop = PlainLoop(task, DATASETS, task.eval_batch_size)
    rows = []
    cluster = local_cluster(1, 1)
    client = Client(cluster)
    try:
        for steps in lengths:
            rows += measure(args, steps, targs, work, loop, client)
    finally:
        client.close()
        cluster.close()
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    common.emit("fast", rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
