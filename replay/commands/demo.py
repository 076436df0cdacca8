"""``lca demo CONFIG --out DIR``: train with recording, replay exactly and sampled, report.

Re-running on the same DIR reuses the trajectory and the finished cubes (each stage resumes),
so an interrupted demo continues where it stopped and a finished one only rewrites the report.
"""

from __future__ import annotations

import os
import sys
import time

from replay.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="train, record, replay (exact and sampled) and report, in one go",
        description="Train the config's task with recording into DIR/trajectory, replay it "
        "with exact gradients (DIR/lca-exact.zarr) and with Zhu et al.'s sampled gradients "
        "(DIR/lca-sampled.zarr), then write DIR/report (exact) and DIR/report-sampled (sampled "
        "vs exact, Zhu et al.'s validation).")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--scheduler", help="replay scheduler (default: the config's)")
    p.set_defaults(func=main)


def main(args) -> int:
    from replay.commands.train import train
    from replay.config import load_config
    from replay.engine.driver import run
    from replay.engine.gradients import Sampled
    from replay.store.trajectory import open_trajectory

    config = load_config(args.config)
    began = time.perf_counter()
    store = os.path.join(args.out, "trajectory")
    rc = config.replay
    if os.path.exists(os.path.join(store, "manifest.json")):
        traj = open_trajectory(store)
        if traj.steps[-1] < config.train.steps:
            raise ConfigError(
                f"{store} holds an incomplete trajectory (last step {traj.steps[-1]} of "
                f"{config.train.steps}); delete {args.out} and run the demo again")
        _say(f"[1/4] reusing the trajectory in {store} ({len(traj.steps)} recorded steps)")
    else:
        _say(f"[1/4] training {config.task.ref} for {config.train.steps} steps, recording "
             f"into {store}")
        train(config, store)
    common = dict(task=config.task.ref, task_args=dict(config.task.args),
                  datasets=rc.datasets, quadrature=rc.quadrature, tolerance=rc.tolerance,
                  max_splits=rc.max_splits, groups=list(rc.groups),
                  scheduler=args.scheduler or rc.scheduler, chunk_size=rc.chunk_size,
                  precision=rc.precision, threads=rc.threads, device=rc.device,
                  nonfinite=rc.nonfinite)
    exact = os.path.join(args.out, "lca-exact.zarr")
    _say(f"[2/4] exact replay ({rc.quadrature}) -> {exact}")
    run(store, gradient="exact", out=exact, **common)
    sampled = os.path.join(args.out, "lca-sampled.zarr")
    mode = Sampled(batches=rc.batches or 4, batch_size=rc.batch_size or 32, seed=rc.seed)
    _say(f"[3/4] sampled replay ({mode.batches} mini-batches of {mode.batch_size} per step) "
         f"-> {sampled}")
    run(store, gradient=mode, out=sampled, **common)
    try:
        from analysis import open_cube
        from analysis.report import write_report
    except ModuleNotFoundError:
        _say("[4/4] analysis package not installed: no report")
        return 0
    report = os.path.join(args.out, "report")
    versus = os.path.join(args.out, "report-sampled")
    _say(f"[4/4] reports -> {report} (exact) and {versus} (sampled vs exact)")
    write_report(open_cube(exact), report, cube_path=exact)
    write_report(open_cube(sampled), versus, reference=open_cube(exact), cube_path=sampled,
                 reference_path=exact)
    _say(f"demo finished in {time.perf_counter() - began:.0f} s: open {report}/index.html "
         f"and {versus}/index.html")
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
