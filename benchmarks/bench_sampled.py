"""Benchmark: sampled vs exact LCA on the demo — what the cheaper mode costs and what it keeps.

Both replays integrate with Simpson on train and valid, sync, 1 torch thread. Exact: the
whole split at every point (2 evaluations per step, the end gradient reused). Sampled: the
demo config's sample, ``Sampled(batches=4, batch_size=32, seed=0)`` — a fresh sample per step,
so no reuse (3 evaluations per step) but on 128 sentences instead of the split. Prints the
cost ratio sampled / exact (interleaved repeats) next to Kendall's τ between their module
rankings (``analysis.compare(sampled, exact).tau``, Zhu et al. report τ = 0.905), for the
``transformer`` grouping and for the ``tensor`` grouping. Usage::

    python benchmarks/bench_sampled.py [--steps 16] [--repeats 2] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common
from bench_replay import DATASETS, GROUPS, engine_run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16, help="recorded updates replayed (16)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (2)")
    p.add_argument("--batches", type=int, default=4, help="sampled: mini-batches per step (4)")
    p.add_argument("--batch-size", type=int, default=32, help="sampled: items per batch (32)")
    p.add_argument("--work", default=None, help="directory for trajectories (reused) and cubes")
    p.add_argument("--quick", action="store_true", help="8 steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 8), 1
    import analysis  # noqa: F401  (registers the accessor used by compare)
    import replay

    work = args.work or tempfile.mkdtemp(prefix="bench-sampled-")
    store = common.record_demo(os.path.join(work, f"demo-{args.steps}"), args.steps)
    sample = replay.Sampled(batches=args.batches, batch_size=args.batch_size, seed=0)
    kw = dict(quadrature="simpson", scheduler="sync", threads=1, datasets=DATASETS,
              groups=GROUPS)
    exact_out = os.path.join(work, "sampled-exact.zarr")
    sampled_out = os.path.join(work, "sampled-sampled.zarr")
    ev_exact, exact = engine_run(store, exact_out, **kw)
    ev_sampled, sampled = engine_run(store, sampled_out, gradient=sample, **kw)
    cmp = analysis.compare(sampled, exact)
    tau = {(str(g), str(d)): float(cmp.tau.sel(grouping_name=g, dataset=d))
           for g in cmp.grouping_name.values for d in cmp.dataset.values}
    times = common.interleave({
        "exact": lambda: engine_run(store, exact_out, **kw),
        "sampled": lambda: engine_run(store, sampled_out, gradient=sample, **kw),
    }, args.repeats)
    te, ts = common.median(times["exact"]), common.median(times["sampled"])
    ratio = ts / te
    common.log(f"demo ToyNMT, {args.steps} steps, Simpson, sync, 1 thread; sampled = "
               f"{args.batches} x {args.batch_size} items per step and dataset; median of "
               f"{args.repeats} interleaved runs")
    common.log(f"  exact    {te:7.2f} s  ({ev_exact} gradient evaluations on the whole splits)")
    common.log(f"  sampled  {ts:7.2f} s  ({ev_sampled} gradient evaluations on the samples)")
    common.log(f"  cost sampled / exact = {ratio:.3f}")
    for (g, d), value in sorted(tau.items()):
        common.log(f"  Kendall tau (sampled vs exact), grouping {g:13s} {d:6s} {value:6.3f}")
    t_tr = tau.get(("transformer", "train"), float("nan"))
    t_va = tau.get(("transformer", "valid"), float("nan"))
    t_te = tau.get(("tensor", "train"), float("nan"))
    rows = [
        common.row("sampled / exact replay cost", ratio, "report", None,
                   f"{ts:.1f} s vs {te:.1f} s, {args.steps} steps", fmt="{:.3f}"),
        common.row("Kendall tau sampled vs exact (transformer, train)", t_tr, "report", None,
                   f"valid {t_va:.3f}; tensor grouping, train {t_te:.3f}", fmt="{:.3f}"),
    ]
    common.emit("sampled", rows)
    return {"ratio": ratio, "tau": tau}


if __name__ == "__main__":
    main()
