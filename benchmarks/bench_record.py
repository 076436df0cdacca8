"""Benchmark: training step time with vs without the Recorder, and bytes stored per parameter.

Trains ``replay.tasks.toy_nmt:ToyNMT`` (a small Transformer encoder–decoder) with Adam and
times each step (forward, backward, optimizer step, and ``rec.step(loss=...)`` in the recorded
blocks). Blocks of ``--steps`` steps without (A) and with (B) a Recorder alternate ``--repeats``
times in one run, so both see the same machine load; each B block records into a fresh store
(θ_0 and the final flush are timed separately: they are not part of a training step).
Prints median step times, the overhead ratio B/A, the flush time, and bytes on disk per
parameter per recorded step of the stores. Usage::

    python benchmarks/bench_record.py [--steps 50] [--repeats 6] [--d-model 48] [--ffn-dim 96]
                                      [--mode delta|full] [--threads T]

On a 2-core machine shared with other jobs the ratio mostly measures CPU contention between the
training and writer threads; the time inside ``rec.step()`` shows whether the queue was full.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from replay.record.recorder import Recorder
from replay.store.trajectory import open_trajectory
from replay.tasks.toy_nmt import ToyNMT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def timed_steps(task, model, opt, batches, steps: int, rec=None, in_rec=None,
                writer_cpu=None) -> list[float]:
    """Seconds per training step, for ``steps`` steps; ``in_rec`` gets the time in rec.step,
    ``writer_cpu`` the writer process's CPU seconds (user, system) from after the second step
    to the last (its start-up and first-use costs left out; it lags by about one step at
    both ends) and the number of steps in between."""
    times, first = [], None
    for _ in range(steps):
        start = time.perf_counter()
        loss_sum, count = task.loss(model, next(batches))
        loss = loss_sum / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rec is not None:
            t0 = time.perf_counter()
            rec.step(loss=loss.detach())
            in_rec.append(time.perf_counter() - t0)
            if writer_cpu is not None and len(times) == 1:
                first = process_cpu(rec._writer.proc.pid)
        times.append(time.perf_counter() - start)
    if first is not None:
        last = process_cpu(rec._writer.proc.pid)
        writer_cpu.append((last[0] - first[0], last[1] - first[1], steps - 2))
    return times


def process_cpu(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a running process so far; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 50-step blocks: the recorder's start (θ_0 written while the first steps run) is a cost
    # per run, reported on its own, not per step; short blocks mixed it into the median.
    parser.add_argument("--steps", type=int, default=50, help="steps per A or B block")
    parser.add_argument("--repeats", type=int, default=6, help="A/B block pairs")
    parser.add_argument("--d-model", type=int, default=48, help="ToyNMT d_model (48: default)")
    parser.add_argument("--ffn-dim", type=int, default=96, help="ToyNMT ffn_dim (96: default)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", choices=("delta", "full"), default="delta")
    parser.add_argument("--keyframe-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: CPU count - 1, a core for the writer)")
    parser.add_argument("--quick", action="store_true", help="10 steps per block, 3 repeats")
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)  # run_all.py passes it
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 10), min(args.repeats, 3)
    # Oversubscribed OpenMP threads (torch's default: all cores) fight the writer thread and
    # make step times swing by 10x on a small shared machine.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))

    task = ToyNMT(d_model=args.d_model, ffn_dim=args.ffn_dim)
    model = task.build_model()
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = task.training_batches(args.batch_size, seed=0)
    print(f"ToyNMT d_model={args.d_model} ffn_dim={args.ffn_dim}: {n_params:,} parameters, "
          f"batch {args.batch_size}, {torch.get_num_threads()} torch threads, mode {args.mode}")
    timed_steps(task, model, opt, batches, 5)          # warm-up: allocator, optimizer state

    plain, recorded, in_rec, flush, starts, per_param = [], [], [], [], [], []
    writer_cpu: list = []        # per B block: (user, system, steps), where /proc exists
    with tempfile.TemporaryDirectory(prefix="bench-record-") as tmp:
        for r in range(args.repeats):
            plain += timed_steps(task, model, opt, batches, args.steps)
            path = f"{tmp}/traj-{r}"
            t0 = time.perf_counter()
            rec = Recorder(model, path, keyframe_every=args.keyframe_every,
                           mode=args.mode).start()
            starts.append(time.perf_counter() - t0)
            recorded += timed_steps(task, model, opt, batches, args.steps, rec, in_rec,
                                    writer_cpu)
            t0 = time.perf_counter()
            rec.close()
            flush.append(time.perf_counter() - t0)
            traj = open_trajectory(path)
            per_param.append(traj.nbytes() / (n_params * len(traj.steps)))
        traj.verify()
    n_cpu = sum(c[2] for c in writer_cpu) or 1
    writer_cpu = [sum(c[0] for c in writer_cpu) / n_cpu, sum(c[1] for c in writer_cpu) / n_cpu]

    a, b = statistics.median(plain), statistics.median(recorded)
    print(f"median step time without Recorder: {a * 1e3:8.2f} ms  ({len(plain)} steps)")
    print(f"median step time with Recorder:    {b * 1e3:8.2f} ms  ({len(recorded)} steps)")
    print(f"overhead ratio (with / without):   {b / a:8.3f}")
    print(f"time inside rec.step() (snapshot + enqueue; blocks when the queue is full): median "
          f"{statistics.median(in_rec) * 1e3:.2f} ms, max {max(in_rec) * 1e3:.2f} ms")
    print(f"mean step time without / with:     {statistics.mean(plain) * 1e3:.2f} / "
          f"{statistics.mean(recorded) * 1e3:.2f} ms")
    print(f"writer process CPU per recorded step: {sum(writer_cpu) * 1e3:.2f} ms "
          f"(user {writer_cpu[0] * 1e3:.2f}, system {writer_cpu[1] * 1e3:.2f}; on the other core)")
    print(f"start (θ_0) / close (flush) time:  {statistics.median(starts) * 1e3:.1f} / "
          f"{statistics.median(flush) * 1e3:.1f} ms (median per store)")
    print(f"bytes per parameter per recorded step: {statistics.median(per_param):.3f} "
          f"({args.steps + 1} recorded steps per store, keyframe every {args.keyframe_every})")
    overhead = b / a - 1
    common.emit("record", [common.row(
        "recording overhead per training step (demo model)", overhead, "<= 5%",
        overhead <= 0.05, f"median step {b * 1e3:.1f} ms vs {a * 1e3:.1f} ms, "
        f"{torch.get_num_threads()} torch threads; writer CPU {sum(writer_cpu) * 1e3:.2f} ms/step",
        fmt="{:+.1%}")])


if __name__ == "__main__":
    main()
