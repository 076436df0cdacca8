"""Benchmark: bytes on disk per parameter per step, and replay memory per worker.

Storage: the demo config's recording (delta mode, keyframe every 100) of ``--steps`` updates of
the demo model: ``Trajectory.nbytes() / (parameters × recorded steps)`` (target <= 4.1),
against the original LCA pipeline (Lan et al.): float64 weights every step (8 B) + float32
gradients, ≈2 rows per step for each of 2 splits (16 B) + float32 T × D LCA matrices for
2 splits (8 B) = 32 B per parameter per step. The cube's bytes per parameter are shown too.

Memory: peak resident memory (VmHWM) of fresh subprocesses that each import the same
modules and load the task, then either build its model and stop (``baseline``), build it and
run one plain gradient evaluation over the collated data (``plain``: the raw work's own memory,
mostly activations), or run a sync exact Simpson replay of the store, which builds its own
model (``replay``; ``replay-no-param-lca`` with ``param_lca=False``). Reported: (replay −
baseline) and (replay − plain) as multiples of the model's parameter bytes, for the demo model (memory
dominated by activations) and for a parameter-heavy MLP (``TinyMLP`` with 3072-wide layers,
10.2 M parameters, little data: the engine's per-parameter buffers dominate; at this size
every (D,) buffer is above glibc's largest mmap threshold, 32 MiB, so freed buffers leave the
process, as for any large model). Usage::

    python benchmarks/bench_storage.py [--steps 100] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import common

HERE = os.path.dirname(os.path.abspath(__file__))
MLP = "replay.tasks.tiny_mlp:TinyMLP"
MLP_ARGS = {"seed": 0, "features": 256, "hidden": 3072, "depth": 2, "classes": 4,
            "train_size": 256, "test_size": 64}
ORIGINAL = 8 + 2 * 2 * 4 + 2 * 4  # float64 θ + float32 gradients (2 per step, 2 splits) + LCA
# Replay modes of the memory measurement: name -> the run's param_lca setting.
REPLAYS = {"replay": True, "replay-no-param-lca": False}


def record_mlp(path: str, steps: int) -> str:
    import torch

    import replay
    from replay.task import load_task

    if os.path.exists(os.path.join(path, "manifest.json")):
        return path
    task = load_task(MLP, MLP_ARGS)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = task.datasets()["train"]
    with replay.Recorder(model, path, task=MLP, task_args=MLP_ARGS) as rec:
        for step in range(steps):
            loss, n = task.loss(model, task.collate(data[(step * 32) % 256:][:32]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss.item() / n)
    return path


def child(mode: str, store: str, task_ref: str, task_args: dict, datasets: list[str],
          out: str) -> None:
    """Runs in a fresh process; prints ``{"maxrss": bytes}``."""
    import torch

    import replay
    import replay.engine.driver  # noqa: F401  (same imports in every mode)
    from replay.engine.kernel import warm_up
    from replay.task import load_task

    torch.set_num_threads(1)
    warm_up()
    task = load_task(task_ref, task_args)
    # A replay builds its own model: one more here would count against it.
    model = task.build_model().eval() if mode not in REPLAYS else None
    if mode == "plain":
        items = task.datasets()
        bs = getattr(task, "eval_batch_size", 256)
        for d in datasets:
            for i in range(0, len(items[d]), bs):
                loss, _ = task.loss(model, task.collate(items[d][i:i + bs]))
                loss.backward()
    elif mode in REPLAYS:
        shutil.rmtree(out, ignore_errors=True)  # a complete cube would make this a no-op
        replay.run(store, task=task_ref, task_args=task_args, datasets=datasets, out=out,
                   quadrature="simpson", scheduler="sync", threads=1, progress=False,
                   groups=["tensor"], param_lca=REPLAYS[mode])
    print(json.dumps({"maxrss": peak_rss()}))


def peak_rss() -> int:
    """Peak resident bytes of this process image. VmHWM, not ``ru_maxrss``: Linux carries
    ``ru_maxrss`` across fork + exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB elsewhere


def measure(mode: str, store: str, task_ref: str, task_args: dict, datasets, out) -> int:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--store", store,
           "--task", task_ref, "--task-args", json.dumps(task_args),
           "--datasets", ",".join(datasets), "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=common.ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
    got = json.loads(res.stdout.strip().splitlines()[-1])
    return got["maxrss"]


def memory(store, task_ref, task_args, datasets, out, param_bytes, repeats) -> dict:
    """Median peak RSS per mode (interleaved), and the multiples of the parameter bytes:
    ``over_baseline``/``over_plain`` for the default replay, ``no_param_lca_over_*`` for
    one with ``param_lca=False``."""
    runs = {m: [] for m in ("baseline", "plain", *REPLAYS)}
    for _ in range(repeats):
        for m in runs:
            runs[m].append(measure(m, store, task_ref, task_args, datasets, out))
    med = {m: common.median(v) for m, v in runs.items()}
    ratios = {}
    for m, prefix in (("replay", ""), ("replay-no-param-lca", "no_param_lca_")):
        ratios[prefix + "over_baseline"] = (med[m] - med["baseline"]) / param_bytes
        ratios[prefix + "over_plain"] = (med[m] - med["plain"]) / param_bytes
    return {**med, **ratios}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="recorded updates (100)")
    p.add_argument("--replay-steps", type=int, default=4, help="steps replayed for memory (4)")
    p.add_argument("--repeats", type=int, default=1, help="repeats of each subprocess (1)")
    p.add_argument("--work", default=None, help="directory for trajectories (reused) and cubes")
    p.add_argument("--quick", action="store_true", help="40 steps, 1 repeat")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--task-args", help=argparse.SUPPRESS)
    p.add_argument("--datasets", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.store, args.task, json.loads(args.task_args),
              args.datasets.split(","), args.out)
        return {}
    if args.quick:
        args.steps, args.repeats = min(args.steps, 40), 1
    import replay

    work = args.work or tempfile.mkdtemp(prefix="bench-storage-")
    store = common.record_demo(os.path.join(work, f"demo-{args.steps}"), args.steps)
    traj = replay.open_trajectory(store)
    n_params = sum(int(_numel(traj.shapes[n])) for n in traj.names)
    per = traj.nbytes() / (n_params * len(traj.steps))
    common.log(f"demo ToyNMT, {n_params:,} parameters, {len(traj.steps)} recorded steps "
               f"(delta mode, keyframe every {traj.manifest.get('keyframe_every')}): "
               f"{traj.nbytes() / 2**20:.2f} MiB")
    common.log(f"  bytes per parameter per step: {per:.3f} (target <= 4.1); original "
               f"pipeline {ORIGINAL} ({ORIGINAL / per:.1f}x more)")
    parts = breakdown(store, n_params, len(traj.steps))
    common.log("  of which: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    # A long recording: one delta file per step, one keyframe file per keyframe_every steps.
    key_every = int(traj.manifest.get("keyframe_every") or 100)
    n_deltas = len(traj.steps) - 1
    per_delta = parts["delta files"] * len(traj.steps) / n_deltas
    per_key = parts["keyframes"] * len(traj.steps) / len(os.listdir(os.path.join(store,
                                                                                  "keyframes")))
    steady = per_delta + per_key / key_every + parts["manifest"]
    common.log(f"  long recordings (one keyframe per {key_every} steps): {steady:.3f} = delta "
               f"file {per_delta:.3f} (headers {parts['headers'] * len(traj.steps) / n_deltas:.3f})"
               f" + keyframe {per_key:.3f} / {key_every} + manifest {parts['manifest']:.3f}")

    # Memory: the demo model (a short replay), then the parameter-heavy MLP.
    cfg = common.demo_config(1)
    short = common.record_demo(os.path.join(work, f"demo-{args.replay_steps}"),
                               args.replay_steps)
    demo_mem = memory(short, cfg.task.ref, cfg.task.args, ["train", "valid"],
                      os.path.join(work, "storage-demo.zarr"), 4 * n_params, args.repeats)
    cube_bytes = _dir_bytes(os.path.join(work, "storage-demo.zarr"))
    mlp = record_mlp(os.path.join(work, "mlp"), args.replay_steps)
    mlp_traj = replay.open_trajectory(mlp)
    mlp_params = sum(int(_numel(mlp_traj.shapes[n])) for n in mlp_traj.names)
    mlp_mem = memory(mlp, MLP, MLP_ARGS, ["train", "test"], os.path.join(work, "storage-mlp.zarr"),
                     4 * mlp_params, args.repeats)
    for label, m, n in (("demo ToyNMT", demo_mem, n_params), ("TinyMLP 3072", mlp_mem, mlp_params)):
        common.log(f"{label} ({n:,} parameters = {4 * n / 2**20:.1f} MiB float32), 2 datasets, "
                   f"peak RSS: baseline {m['baseline'] / 2**20:.0f} MiB, plain evaluation "
                   f"{m['plain'] / 2**20:.0f} MiB, replay {m['replay'] / 2**20:.0f} MiB, "
                   f"without param_lca {m['replay-no-param-lca'] / 2**20:.0f} MiB")
        common.log(f"  replay − baseline = {m['over_baseline']:.1f} x parameter bytes; "
                   f"replay − plain evaluation = {m['over_plain']:.1f} x parameter bytes; "
                   f"param_lca=False: {m['no_param_lca_over_plain']:.1f} x over plain")
    common.log(f"  demo cube on disk: {cube_bytes / 2**10:.0f} KiB for {args.replay_steps} steps")
    rows = [
        common.row("trajectory bytes per parameter per step", per, "<= 4.1", per <= 4.1,
                   f"original pipeline {ORIGINAL} B ({ORIGINAL / per:.1f}x more); "
                   f"{len(traj.steps)} steps: deltas {parts['delta files']:.3f} (safetensors "
                   f"headers {parts['headers']:.3f}), keyframes {parts['keyframes']:.3f}",
                   fmt="{:.3f}"),
        common.row("replay peak memory per worker, param-heavy MLP", mlp_mem["over_baseline"],
                   "report", None, f"x parameter bytes over an idle process; "
                   f"{mlp_mem['over_plain']:.1f}x over a plain gradient evaluation",
                   fmt="{:.1f}x"),
        common.row("replay peak memory per worker, demo ToyNMT", demo_mem["over_baseline"],
                   "report", None, f"x parameter bytes ({demo_mem['over_plain']:.1f}x over a "
                   "plain evaluation: activations dominate)", fmt="{:.0f}x"),
    ]
    common.emit("storage", rows)
    return {"per_param": per, "demo": demo_mem, "mlp": mlp_mem}


def breakdown(store: str, n_params: int, steps: int) -> dict[str, float]:
    """Bytes per parameter per recorded step, by kind of file; ``headers``: the safetensors
    headers (tensor names, dtypes, offsets) inside the delta files."""
    def size(sub):
        d = os.path.join(store, sub)
        return [os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)] \
            if os.path.isdir(d) else []

    deltas = size("deltas")
    headers = 0
    for f in os.listdir(os.path.join(store, "deltas")):
        with open(os.path.join(store, "deltas", f), "rb") as fh:
            headers += 8 + int.from_bytes(fh.read(8), "little")
    per = n_params * steps
    return {"delta files": sum(deltas) / per, "headers": headers / per,
            "keyframes": sum(size("keyframes")) / per, "state": sum(size("state")) / per,
            "manifest": os.path.getsize(os.path.join(store, "manifest.json")) / per}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
