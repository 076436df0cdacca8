"""Benchmark: what a small operation costs right after a model's forward and backward pass.

A replay does a little bookkeeping between gradient evaluations (read a delta, draw and
collate a sample, check finiteness, reduce into groups). Timed alone, each of these takes
microseconds; between the passes of a real model it takes several times longer, because the
model's kernels have just evicted the interpreter's code and data from the caches. This
benchmark times three small operations — a torch sum and finiteness test of a 6,090-element
vector, the same on numpy, and a pure-Python loop — alone and right after a forward+backward of
``TinyCNN`` (16/32 channels, batch 32, 1 thread), and prints the ratio. It explains why the
engine's per-step work weighs more on a 3-ms model than its isolated cost suggests
(docs/benchmarks.md). Usage::

    python benchmarks/bench_cold_ops.py [--repeats 300] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import common


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=300, help="timed calls per case (300)")
    p.add_argument("--work", default=None, help="unused (run_all passes one)")
    p.add_argument("--quick", action="store_true", help="100 calls per case")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 100
    from replay.task import load_task

    torch.set_num_threads(1)
    task = load_task("replay.tasks.tiny_cnn:TinyCNN", {"seed": 0, "size": 8, "channels": 16,
                                                       "classes": 10, "train_size": 64})
    model = task.build_model().eval()
    batch = task.collate(task.datasets()["train"][:32])
    vec, arr = torch.randn(6090), np.random.default_rng(0).random(6090)
    ops = {"torch sum + isfinite": lambda: bool(torch.isfinite(vec.sum())),
           "numpy sum + isfinite": lambda: bool(np.isfinite(arr.sum())),
           "Python loop of 200": lambda: sum(range(200))}

    def model_work():
        task.loss(model, batch)[0].backward()

    rows = []
    for name, op in ops.items():
        for _ in range(30):
            model_work()
            op()
        after = alone = 0.0
        for _ in range(args.repeats):
            model_work()
            t = time.perf_counter()
            op()
            after += time.perf_counter() - t
        for _ in range(args.repeats):
            t = time.perf_counter()
            op()
            alone += time.perf_counter() - t
        after, alone = after / args.repeats, alone / args.repeats
        common.log(f"  {name:22s} alone {alone * 1e6:6.1f} us, right after forward+backward "
                   f"{after * 1e6:6.1f} us: {after / alone:.1f}x")
        rows.append(common.row(f"small op after a forward+backward / alone: {name}",
                               after / alone, "report", None,
                               f"{after * 1e6:.1f} us vs {alone * 1e6:.1f} us", fmt="{:.1f}"))
    common.emit("cold-ops", rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
