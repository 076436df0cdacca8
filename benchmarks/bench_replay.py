"""Benchmark: replay efficiency — the engine's wall time vs the raw gradient work it needs.

An exact Simpson replay of the demo model (``configs/demo.yaml``'s ToyNMT, datasets train and
valid, ``--steps`` recorded updates) with ``scheduler="sync"`` and 1 torch thread, against a
plain torch loop in the same process that performs the same number of gradient evaluations
(the engine's own count: 2 per step + 1 to start, the end gradient of a step being the next
step's start) at the same parameters, over the same data already collated into the same
batches (``replay.engine.gradients.plan_batches``: sorted by the task's ``item_size``), at 1 torch
thread: nothing but ``loss.backward()`` per batch. That loop is the physical bound of any
replay; efficiency = bound time / engine time (target >= 0.9).

The engine's time is ``replay.run`` end to end: task and cube set-up, reading the trajectory,
integration, the numba reduction into 4 groupings (transformer, sparse-dense, frequency,
tensor), the zarr writes and the final per-parameter sums. Usage::

    python benchmarks/bench_replay.py [--steps 12] [--repeats 3] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import tempfile

import torch

import common

GROUPS = ["transformer", "sparse-dense", "frequency", "tensor"]
DATASETS = ["train", "valid"]


def engine_run(store: str, out: str, task=common.TASK, clean: bool = True,
               **kw) -> tuple[int, object]:
    """``replay.run`` on a fresh cube; returns (gradient evaluations, cube). ``clean=False``:
    the caller has removed ``out`` already (outside its timing: the plain loop it is compared
    with removes nothing either)."""
    import replay

    if clean:
        shutil.rmtree(out, ignore_errors=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the summary line carries the evaluation count
        cube = replay.run(store, task=task, out=out, progress=True, **kw)
    found = re.search(r"\((\d+) gradient evaluations", err.getvalue())
    return (int(found.group(1)) if found else -1), cube


class PlainLoop:
    """The bound: forward + backward over pre-collated batches at given parameter vectors."""

    def __init__(self, task, datasets, batch_size: int):
        from replay.engine.gradients import plan_batches

        self.task = task
        self.model = task.build_model().eval()
        self.params = dict(self.model.named_parameters())
        items = task.datasets()
        # The engine's own batches (sorted by item_size where the task has it): the bound
        # must do the same arithmetic, only without the engine around it.
        self.batches = {d: [task.collate([items[d][i] for i in idx])
                            for idx in plan_batches(task, d, items[d], batch_size)]
                        for d in datasets}

    def evaluate(self, theta: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in theta.items():
                self.params[name].copy_(value)
        for batches in self.batches.values():
            for p in self.params.values():
                p.grad = None
            for batch in batches:
                loss_sum, _ = self.task.loss(self.model, batch)
                loss_sum.backward()

    def run(self, points: list[dict[str, torch.Tensor]]) -> None:
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for theta in points:
                self.evaluate(theta)
        finally:
            torch.set_num_threads(saved)


def simpson_points(store: str, evaluations: int) -> list[dict[str, torch.Tensor]]:
    """θ_0, then per step θ_t + ½Δ and θ_{t+1}: the points of a Simpson replay with reuse;
    the first ``evaluations`` of them cycled (the engine's count may add chunk starts)."""
    import replay

    traj = replay.open_trajectory(store)
    thetas = [traj.params(t) for t in traj.steps]
    points = [thetas[0]]
    for a, b in zip(thetas, thetas[1:]):
        points.append({k: a[k] + 0.5 * (b[k] - a[k]) for k in a})
        points.append(b)
    return [points[i % len(points)] for i in range(evaluations)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="recorded updates replayed (12)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved A/B repeats (3)")
    p.add_argument("--work", default=None, help="directory for trajectories (reused) and cubes")
    p.add_argument("--quick", action="store_true", help="6 steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 6), 1
    work = args.work or tempfile.mkdtemp(prefix="bench-replay-")
    store = common.record_demo(os.path.join(work, f"demo-{args.steps}"), args.steps)
    task = common.demo_task()
    kw = dict(quadrature="simpson", scheduler="sync", threads=1, datasets=DATASETS,
              groups=GROUPS)  # default chunking: a sync replay reuses across chunks
    out = os.path.join(work, "bench-replay.zarr")
    evaluations, _ = engine_run(store, out, **kw)
    expected = 2 * args.steps + 1
    if evaluations < 0:  # the summary line changed: count as the rule does
        evaluations = expected
    elif evaluations != expected:
        common.log(f"note: the engine made {evaluations} gradient evaluations, "
                   f"{expected} expected for Simpson with reuse")
    loop = PlainLoop(task, DATASETS, task.eval_batch_size)
    points = simpson_points(store, evaluations)
    times = common.interleave({
        "engine": lambda: engine_run(store, out, clean=False, **kw),
        "bound": lambda: loop.run(points),
    }, args.repeats, warmup={"bound": lambda: loop.run(points[:3])},
        before={"engine": common.removal(out)})
    engine, bound = common.median(times["engine"]), common.median(times["bound"])
    eff = common.paired(times, "bound", "engine")
    common.log(f"demo ToyNMT, {args.steps} steps, exact Simpson on {'+'.join(DATASETS)}, "
               f"{evaluations} gradient evaluations, sync, 1 torch thread; "
               f"median of {args.repeats} interleaved runs")
    common.log(f"  engine (replay.run, end to end)  {engine:8.2f} s "
               f"({engine / evaluations * 1e3:.0f} ms per evaluation)")
    common.log(f"  plain torch loop (the bound)     {bound:8.2f} s "
               f"({bound / evaluations * 1e3:.0f} ms per evaluation)")
    common.log(f"  efficiency = bound / engine      {eff:8.3f} (target >= 0.9; median of the "
               f"rounds' ratios; ratio of the medians {bound / engine:.3f})")
    rows = [common.row("replay efficiency (bound / engine, sync, 1 thread)", eff, ">= 0.9",
                       eff >= 0.9, f"{engine:.1f} s vs {bound:.1f} s, {evaluations} evaluations,"
                       f" {args.steps} steps", fmt="{:.3f}")]
    common.emit("replay", rows)
    return {"engine": engine, "bound": bound, "evaluations": evaluations}


if __name__ == "__main__":
    main()
