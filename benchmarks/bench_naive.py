"""Benchmark: the engine vs the replay script a user would write (``naive_replay.py``).

Same trajectory (the demo model, ``--steps`` updates), same data (train and valid), same
rule (exact Simpson) and precision (float32). Interleaved in one run:

- naive: per-step checkpoint files, 3 gradient evaluations per step and dataset, a
  ``DataLoader`` collating at every evaluation, torch's default thread count;
- engine, default scheduler (``local``: one worker process per core, 1 torch thread each),
  including the start-up of its Dask cluster, as ``replay.run(...)`` does it;
- engine, the same on an already running cluster (a ``distributed.Client`` passed in:
  the steady state of an IPython session or a long replay);
- engine, ``scheduler="sync"`` (in-process, 1 torch thread);
- naive again at 1 torch thread, to compare with sync on equal resources (one core each).

Each ratio is the median of the rounds' own (``common.paired``); an engine's previous cube is
removed untimed. Checks first that the engine's per-tensor LCA equals the naive script's
(relative difference of the per-step, per-tensor values, normalised by the largest one).
Target: engine >= 2.5x faster. Usage::

    python benchmarks/bench_naive.py [--steps 10] [--repeats 3] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

import common
from bench_replay import DATASETS, GROUPS, engine_run
from naive_replay import naive_lca, save_checkpoints


def engine_tensor_lca(cube, names: list[str]) -> dict[str, np.ndarray]:
    """{dataset: (steps, tensors)} from the cube's ``tensor`` grouping, in ``names`` order."""
    out = {}
    for d in DATASETS:
        lca = cube["lca"].sel(dataset=d)
        out[d] = np.stack([lca.sel(group=f"tensor/{n}").values for n in names], axis=1)
    return out


def agreement(engine: dict[str, np.ndarray], naive: dict[str, np.ndarray]) -> float:
    """max |engine − naive| / max |naive| over steps, tensors and datasets."""
    return max(float(np.abs(engine[d] - naive[d]).max() / np.abs(naive[d]).max())
               for d in naive)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="recorded updates replayed (10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (3)")
    p.add_argument("--work", default=None, help="directory for trajectories (reused) and cubes")
    p.add_argument("--quick", action="store_true", help="6 steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 6), 1
    from distributed import Client

    from replay.cluster.worker_env import local_cluster

    work = args.work or tempfile.mkdtemp(prefix="bench-naive-")
    store = common.record_demo(os.path.join(work, f"demo-{args.steps}"), args.steps)
    ckpts = os.path.join(work, f"checkpoints-{args.steps}")
    steps = save_checkpoints(store, ckpts)
    task = common.demo_task()
    default_threads = torch.get_num_threads()
    kw = dict(quadrature="simpson", threads=1, datasets=DATASETS, groups=GROUPS)
    workers = max(1, os.cpu_count() or 1)  # what scheduler="local" starts at threads=1

    # Same numbers first.
    names, naive = naive_lca(task, ckpts, steps, DATASETS)
    evaluations, cube = engine_run(store, os.path.join(work, "naive-sync.zarr"),
                                   scheduler="sync", **kw)
    diff_sync = agreement(engine_tensor_lca(cube, names), naive)
    _, cube = engine_run(store, os.path.join(work, "naive-local.zarr"), scheduler="local", **kw)
    diff_local = agreement(engine_tensor_lca(cube, names), naive)
    common.log(f"per-tensor LCA, engine vs naive: max relative difference {diff_sync:.2e} "
               f"(sync), {diff_local:.2e} (local)")

    cluster = local_cluster(workers, 1)  # as scheduler="local" starts its workers
    client = Client(cluster)
    try:
        def naive_at(threads):
            def go():
                saved = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    naive_lca(task, ckpts, steps, DATASETS)
                finally:
                    torch.set_num_threads(saved)
            return go

        cubes = {name: os.path.join(work, f"naive-{name}.zarr")
                 for name in ("engine-local", "engine-warm", "engine-sync")}
        scheduler = {"engine-local": "local", "engine-warm": client, "engine-sync": "sync"}

        def engine_at(name):
            return lambda: engine_run(store, cubes[name], scheduler=scheduler[name],
                                      clean=False, **kw)

        cases = {"naive": naive_at(default_threads), "naive-1-thread": naive_at(1),
                 **{name: engine_at(name) for name in cubes}}
        warm = {"engine-warm": lambda: engine_run(store, cubes["engine-warm"],
                                                  scheduler=client, steps="0:2", **kw)}
        times = common.interleave(cases, args.repeats, warmup=warm,
                                  before={name: common.removal(cube) for name, cube in cubes.items()})
    finally:
        client.close()
        cluster.close()
    med = {k: common.median(v) for k, v in times.items()}
    common.log(f"demo ToyNMT, {args.steps} steps, exact Simpson on {'+'.join(DATASETS)}, "
               f"float32; naive at {default_threads} torch threads ({3 * args.steps} "
               f"evaluations), engine {evaluations} evaluations; median of {args.repeats} "
               "interleaved runs")
    for k, v in med.items():
        common.log(f"  {k:15s} {v:8.2f} s   naive / this = "
                   f"{common.paired(times, 'naive', k):5.2f}x (median of the rounds' ratios; "
                   f"of the medians {med['naive'] / v:.2f}x)")
    rows = []
    for key, label in (("engine-local", f"local:{workers}, incl. cluster start"),
                       ("engine-warm", f"local:{workers}, running cluster"),
                       ("engine-sync", "sync, 1 thread")):
        ratio = common.paired(times, "naive", key)
        rows.append(common.row(f"vs naive script ({default_threads} threads): engine {label}",
                               ratio, ">= 2.5x", ratio >= 2.5,
                               f"{med[key]:.1f} s vs {med['naive']:.1f} s", fmt="{:.2f}x"))
    same = common.paired(times, "naive-1-thread", "engine-sync")
    rows.append(common.row("vs naive script, both on 1 core: engine sync / naive 1 thread",
                           same, "report", None, f"{med['engine-sync']:.1f} s vs "
                           f"{med['naive-1-thread']:.1f} s: the work saved per step",
                           fmt="{:.2f}x"))
    worst = max(diff_sync, diff_local)
    rows.append(common.row("engine vs naive per-tensor LCA, max rel. difference", worst,
                           "<= 1e-5 (float32)", worst <= 1e-5, "normalised by the largest "
                           "per-step tensor LCA", fmt="{:.1e}"))
    common.emit("naive", rows)
    return med


if __name__ == "__main__":
    main()
