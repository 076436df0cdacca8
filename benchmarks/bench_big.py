"""Benchmark: a big model (a 54.6 M-parameter MLP) recorded and replayed.

- **Writer throughput**: the Recorder's writer (``replay.record.writer.Writer``, the code its
  process runs) fed snapshots of real Adam updates of the model from memory, as fast as it takes
  them, in this process on one core: parameter bytes per second of wall time (encoding, hashing,
  writing and fsyncing each delta file, the manifest commits), and per second of the process's
  CPU time. Next to it, in the same run with the repeats interleaved, the disk's own sequential
  write speed: ``dd if=/dev/zero bs=64M oflag=direct conv=fsync`` of the size of one delta file
  into the same directory. Target: >= 1 GB/s of parameters.
- **Recording overhead**: blocks of Adam training steps (batch 32) without and with a
  ``Recorder`` (A, B, A, B, …), the median step time of each, the time ``close()`` waits for
  the writer to drain its queue, and the bytes on disk per parameter per recorded step.
- **Replay efficiency**: an exact Simpson replay (``replay.run``, sync, 1 thread, datasets train
  and test, ``groups="tensor"``) against a plain torch loop doing the same gradient evaluations
  (``bench_replay.PlainLoop``), interleaved.
- **Peak memory per worker**: the sync replay's peak RSS in a fresh process, as multiples of the
  float32 parameter bytes over a process that only built the task (baseline) and over one that
  ran one plain gradient evaluation of both datasets (``bench_storage.memory``).

Usage::

    python benchmarks/bench_big.py [--hidden 4096] [--depth 4] [--writer-steps 10]
                                   [--record-steps 12] [--replay-steps 3] [--repeats 2]
                                   [--only writer,record,replay,memory] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

MLP = "replay.tasks.tiny_mlp:TinyMLP"
PARTS = ("writer", "record", "replay", "memory")
# Snapshot buffers of a default Recorder (queue_size + 2): each is first written (page faults
# of fresh shared memory) when the queue first grows that deep.
SLOTS = 6


def mlp_args(args) -> dict:
    return {"seed": 0, "features": args.features, "hidden": args.hidden, "depth": args.depth,
            "classes": 4, "train_size": args.train_size, "test_size": args.test_size}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Trainer:
    """Adam steps of the MLP on batches of 32 of its train split."""

    def __init__(self, task, batch_size: int = 32):
        self.task, self.model = task, task.build_model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.data, self.batch_size, self.i = task.datasets()["train"], batch_size, 0

    def step(self) -> float:
        n = len(self.data)
        items = [self.data[(self.i + k) % n] for k in range(self.batch_size)]
        self.i += self.batch_size
        loss, count = self.task.loss(self.model, self.task.collate(items))
        (loss / count).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / count


# ------------------------------------------------------------------------ writer throughput

class FedWriter:
    """A ``Writer`` over anonymous shared memory holding ``versions`` snapshots of θ."""

    def __init__(self, trainer: Trainer, versions: int, root: str):
        from replay.record.channel import _align, _groups
        from replay.record.snapshot import FlatLayout
        from replay.record.writer import CONTROL_BYTES

        params = [(n, tuple(p.shape), p.dtype) for n, p in trainer.model.named_parameters()]
        self.layout = FlatLayout(params)
        groups, end = _groups(self.layout, 0)
        self.set_bytes, self.slots = _align(end), versions
        self.mem = mmap.mmap(-1, CONTROL_BYTES + versions * self.set_bytes)
        self.groups, self.root, self.control = groups, root, CONTROL_BYTES
        for s in range(versions):        # θ after s + 1 more Adam steps, one slot each
            trainer.step()
            flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
            start = CONTROL_BYTES + s * self.set_bytes + groups[0][1]
            self.mem[start:start + flat.numel() * 4] = flat.numpy().tobytes()
        self.param_bytes = sum(g[2] for g in groups) * 4

    def run(self, steps: int) -> dict:
        """Write a fresh store of 1 + ``steps`` steps; seconds and CPU seconds of the deltas."""
        from replay.record.writer import Writer
        from replay.store.manifest import FORMAT_VERSION, ManifestWriter

        shutil.rmtree(self.root, ignore_errors=True)
        for sub in ("keyframes", "deltas", "state"):
            os.makedirs(os.path.join(self.root, sub))
        header = {"format_version": FORMAT_VERSION, "mode": "delta", "keyframe_every": 100,
                  "every": 1, "task": None, "task_args": {},
                  "params": [{"name": n, "shape": list(s), "dtype": "float32"}
                             for n, (_, _, _, s) in self.layout.place.items()],
                  "aliases": {}, "state": []}
        cfg = {"root": self.root, "header": header, "mode": "delta", "keyframe_every": 100,
               "commit_interval": 1.0, "slots": self.slots, "set_bytes": self.set_bytes,
               "params": self.groups, "state": []}
        ManifestWriter(header)      # imported modules warm
        writer = Writer(cfg, self.mem)

        def msg(t):
            return {"op": "step", "slot": t % self.slots, "step": t, "loss": 0.0, "lr": None,
                    "time": time.time(), "interval": None}

        # Not timed: θ_0 (a keyframe) and the first two deltas, which fault in the writer's
        # file buffers (a cost per recording, not per step).
        warm = time.perf_counter()
        for t in range(3):
            writer.record(msg(t))
        writer.commit()
        warm = time.perf_counter() - warm
        wall, cpu = time.perf_counter(), time.process_time()
        for t in range(3, steps + 3):
            writer.record(msg(t))
        writer.commit()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        files = sorted(os.listdir(os.path.join(self.root, "deltas")))[2:]
        size = sum(os.path.getsize(os.path.join(self.root, "deltas", f)) for f in files)
        if hasattr(writer, "close"):
            writer.close()
        return {"wall": wall, "cpu": cpu, "bytes": size, "steps": steps, "warm": warm}


def disk_speed(directory: str, nbytes: int) -> float:
    """Bytes per second of ``dd`` writing ``nbytes`` (rounded to 64 MiB) with O_DIRECT + fsync."""
    count = max(1, round(nbytes / (64 << 20)))
    target = os.path.join(directory, "dd.bin")
    done = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={count}",
                           "oflag=direct", "conv=fsync"], capture_output=True, text=True)
    os.remove(target)
    found = re.search(r"^(\d+) bytes.*copied, ([\d.]+) s", done.stderr, re.M)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"dd failed: {done.stderr.strip()}")
    return int(found.group(1)) / float(found.group(2))


def writer_part(args, task, work) -> list[dict]:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    fed = FedWriter(Trainer(task), versions=args.versions, root=os.path.join(work, "fed"))
    gb = fed.param_bytes / 1e9
    common.log(f"writer: {fed.param_bytes / 4:,.0f} float32 parameters ({gb:.3f} GB per "
               f"step), {args.writer_steps} delta steps per run, {args.repeats} runs, "
               f"interleaved with dd of the same size")
    runs, disk = [], []
    for r in range(args.repeats):
        order = ("writer", "dd") if r % 2 == 0 else ("dd", "writer")
        for what in order:
            if what == "writer":
                runs.append(fed.run(args.writer_steps))
            else:
                disk.append(disk_speed(work, fed.param_bytes))
    shutil.rmtree(fed.root, ignore_errors=True)
    wall = [fed.param_bytes * r["steps"] / r["wall"] / 1e9 for r in runs]
    cpu = [fed.param_bytes * r["steps"] / r["cpu"] / 1e9 for r in runs]
    dd = [d / 1e9 for d in disk]
    per_param = runs[-1]["bytes"] / (runs[-1]["steps"] * fed.param_bytes / 4)
    tw, tc, td = common.median(wall), common.median(cpu), common.median(dd)
    common.log(f"  writer: {tw:.2f} GB/s of parameters (runs {', '.join(f'{x:.2f}' for x in wall)})"
               f"; per CPU second {tc:.2f} GB/s; delta files {per_param:.3f} B per parameter")
    common.log(f"  first three steps (θ_0 and two deltas, not timed above): "
               f"{common.median([r['warm'] for r in runs]):.2f} s")
    common.log(f"  disk (dd, O_DIRECT, fsync): {td:.2f} GB/s (runs "
               f"{', '.join(f'{x:.2f}' for x in dd)}); writer / disk = {tw / td:.2f}")
    return [common.row("writer throughput, parameters per second (one core)", tw, ">= 1 GB/s",
                       tw >= 1.0, f"disk (dd) {td:.2f} GB/s in the same run (writer/disk "
                       f"{tw / td:.2f}); {tc:.2f} GB/s per CPU second; "
                       f"{fed.param_bytes / 4 / 1e6:.1f} M float32 parameters",
                       fmt="{:.2f} GB/s")]


# ------------------------------------------------------------------------ recording overhead

def record_part(args, task, work) -> list[dict]:
    import replay

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    trainer = Trainer(task)
    n = n_params(trainer.model)
    for _ in range(2):
        trainer.step()                              # warm: Adam state, allocator
    plain, recorded, closes, per_param, inside, steady = [], [], [], [], [], []
    for r in range(args.repeats):
        for _ in range(args.record_steps):
            t0 = time.perf_counter()
            trainer.step()
            plain.append(time.perf_counter() - t0)
        path = os.path.join(work, f"big-record-{r}")
        shutil.rmtree(path, ignore_errors=True)
        rec = replay.Recorder(trainer.model, path).start()
        for k in range(args.record_steps):
            t0 = time.perf_counter()
            loss = trainer.step()
            t1 = time.perf_counter()
            rec.step(loss=loss)
            inside.append(time.perf_counter() - t1)
            recorded.append(time.perf_counter() - t0)
            if k >= SLOTS:
                steady.append(recorded[-1])
        t0 = time.perf_counter()
        rec.close()
        closes.append(time.perf_counter() - t0)
        traj = replay.open_trajectory(path)
        per_param.append(traj.nbytes() / (n * len(traj.steps)))
        shutil.rmtree(path, ignore_errors=True)
    a, b = common.median(plain), common.median(recorded)
    # A writer that falls behind does its work during close(): counted per step too.
    whole = (sum(recorded) + sum(closes)) / sum(plain) - 1
    common.log(f"recording: {n:,} parameters, Adam, batch 32, {torch.get_num_threads()} torch "
               f"thread(s), {args.repeats} x {args.record_steps} steps each way")
    common.log(f"  step without Recorder {a * 1e3:.0f} ms, with {b * 1e3:.0f} ms (median "
               f"overhead {b / a - 1:+.1%}); close() {common.median(closes):.2f} s; with "
               f"close() spread over the steps {whole:+.1%}")
    if steady:
        common.log(f"  steps after the first {SLOTS} of a block (every snapshot buffer in use "
                   f"once): median {common.median(steady) * 1e3:.0f} ms "
                   f"({common.median(steady) / a - 1:+.1%})")
    common.log(f"  inside rec.step() (snapshot into shared memory, waiting for a free buffer): "
               f"median {common.median(inside) * 1e3:.0f} ms, max {max(inside) * 1e3:.0f} ms")
    common.log(f"  {common.median(per_param):.3f} bytes per parameter per recorded step "
               f"({args.record_steps + 1} steps, θ_0 a keyframe)")
    return [
        common.row("recording overhead per training step (54.6 M MLP)", whole, "report", None,
                   f"incl. close(); median step {b * 1e3:.0f} ms vs {a * 1e3:.0f} ms "
                   f"({b / a - 1:+.1%}); close() waits {common.median(closes):.2f} s",
                   fmt="{:+.1%}"),
        common.row("trajectory bytes per parameter per step (54.6 M MLP)",
                   common.median(per_param), "report", None,
                   f"{args.record_steps + 1} recorded steps, one keyframe", fmt="{:.3f}"),
    ]


# ------------------------------------------------------------------------ replay and memory

def record_store(task, task_args: dict, path: str, steps: int) -> str:
    import replay

    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    trainer = Trainer(task)
    with replay.Recorder(trainer.model, path, task=MLP, task_args=task_args) as rec:
        for _ in range(steps):
            rec.step(loss=trainer.step())
    return path


def replay_part(args, task, work, store) -> list[dict]:
    from bench_replay import PlainLoop, simpson_points

    import replay

    datasets = ["train", "test"]
    out = os.path.join(work, "big-replay.zarr")

    def engine(param_lca=True):
        shutil.rmtree(out, ignore_errors=True)
        replay.run(store, task=MLP, task_args=mlp_args(args), datasets=datasets, out=out,
                   quadrature="simpson", scheduler="sync", threads=1, groups=["tensor"],
                   progress=False, param_lca=param_lca)

    evaluations = 2 * args.replay_steps + 1
    loop = PlainLoop(task, datasets, task.eval_batch_size)
    points = simpson_points(store, evaluations)
    times = common.interleave({"engine": engine, "bound": lambda: loop.run(points),
                               "no-param-lca": lambda: engine(False)},
                              args.repeats, warmup={"bound": lambda: loop.run(points[:1])})
    e, b = common.median(times["engine"]), common.median(times["bound"])
    f = common.median(times["no-param-lca"])
    common.log(f"replay: exact Simpson, {args.replay_steps} steps, train ({args.train_size}) + "
               f"test ({args.test_size}), sync, 1 thread, {evaluations} evaluations")
    common.log(f"  engine {e:.2f} s (runs {', '.join(f'{x:.2f}' for x in times['engine'])}), "
               f"plain loop {b:.2f} s (runs {', '.join(f'{x:.2f}' for x in times['bound'])}); "
               f"efficiency {b / e:.3f}; with param_lca=False {f:.2f} s, efficiency {b / f:.3f} "
               "(each piece's per-parameter sums, 8 bytes per parameter and dataset, are written, "
               "read back and added)")
    return [common.row("replay efficiency, 54.6 M MLP (bound / engine, sync, 1 thread)", b / e,
                       "report", None, f"{e:.1f} s vs {b:.1f} s, {evaluations} evaluations",
                       fmt="{:.3f}"),
            common.row("  the same with param_lca=False", b / f, "report", None,
                       f"{f:.1f} s vs {b:.1f} s", fmt="{:.3f}")]


def memory_part(args, task, work, store) -> list[dict]:
    from bench_storage import memory

    n = sum(p.numel() for p in task.build_model().parameters())
    m = memory(store, MLP, mlp_args(args), ["train", "test"], os.path.join(work, "big-memory.zarr"),
               4 * n, 1)
    common.log(f"memory: peak RSS baseline {m['baseline'] / 2**20:.0f} MiB, plain evaluation "
               f"{m['plain'] / 2**20:.0f} MiB, replay {m['replay'] / 2**20:.0f} MiB, without "
               f"param_lca {m['replay-no-param-lca'] / 2**20:.0f} MiB; parameters "
               f"{4 * n / 2**20:.0f} MiB")
    common.log(f"  replay - plain evaluation = {m['over_plain']:.1f} x parameter bytes "
               f"({m['over_baseline']:.1f} x over baseline); param_lca=False: "
               f"{m['no_param_lca_over_plain']:.1f} x ({m['no_param_lca_over_baseline']:.1f} x)")
    label = f"{n / 1e6:.1f} M MLP"
    return [common.row(f"replay peak memory per worker, {label} (over a plain evaluation)",
                       m["over_plain"], "<= 11x", m["over_plain"] <= 11,
                       f"x parameter bytes, 2 datasets, exact Simpson; {m['over_baseline']:.1f}x "
                       "over an idle process", fmt="{:.1f}x"),
            common.row(f"replay peak memory per worker, {label}, param_lca=False",
                       m["no_param_lca_over_plain"], "<= 7x", m["no_param_lca_over_plain"] <= 7,
                       f"x parameter bytes over a plain evaluation; "
                       f"{m['no_param_lca_over_baseline']:.1f}x over an idle process",
                       fmt="{:.1f}x")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--train-size", type=int, default=64, help="items in the train split (64)")
    p.add_argument("--test-size", type=int, default=32, help="items in the test split (32)")
    p.add_argument("--versions", type=int, default=3, help="snapshots fed to the writer (3)")
    p.add_argument("--writer-steps", type=int, default=10, help="delta steps per writer run")
    p.add_argument("--record-steps", type=int, default=12, help="training steps per block (12)")
    p.add_argument("--replay-steps", type=int, default=3, help="steps replayed (3)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (2)")
    p.add_argument("--only", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="fewer steps, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.writer_steps, args.record_steps, args.replay_steps = 4, 3, 2
        args.repeats = 1
    parts = [x.strip() for x in args.only.split(",")]
    from replay.task import load_task

    task = load_task(MLP, mlp_args(args))
    n = n_params(task.build_model())
    common.log(f"MLP {args.features}-{'-'.join([str(args.hidden)] * args.depth)}-4: {n:,} "
               f"parameters ({4 * n / 2**20:.0f} MiB float32)")
    owned = args.work is None
    work = args.work or tempfile.mkdtemp(prefix="bench-big-")
    rows = []
    try:
        if "writer" in parts:
            rows += writer_part(args, task, work)
        if "record" in parts:
            rows += record_part(args, task, work)
        if "replay" in parts or "memory" in parts:
            store = record_store(task, mlp_args(args), os.path.join(work, f"big-{n}-{args.replay_steps}"),
                                 args.replay_steps)
            if "replay" in parts:
                rows += replay_part(args, task, work, store)
            if "memory" in parts:
                rows += memory_part(args, task, work, store)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    common.emit("big", rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
