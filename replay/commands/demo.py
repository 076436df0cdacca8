"""``lca demo CONFIG --out DIR``: train with recording, replay exactly and sampled, report.

Re-running on the same DIR reuses the trajectory and the finished cubes (each stage resumes),
so an interrupted demo continues where it stopped and a finished one only rewrites the report.
"""

from __future__ import annotations

import dataclasses
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
    from analysis import open_cube
    from analysis.report import write_report

    from replay.commands.train import train
    from replay.config import load_config
    from replay.engine.driver import run
    from replay.store.trajectory import open_trajectory

    config = load_config(args.config)
    base = config.replay
    if base.batches is None or base.batch_size is None:
        raise ConfigError(f"lca demo's sampled replay needs replay.batches and "
                          f"replay.batch_size in {args.config} (mini-batches per step and their "
                          "size); set both")
    if args.scheduler:
        base = dataclasses.replace(base, scheduler=args.scheduler)
    began = time.perf_counter()
    store = os.path.join(args.out, "trajectory")
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
    task = dict(task=config.task.ref, task_args=dict(config.task.args))
    exact = os.path.join(args.out, "lca-exact.zarr")
    _say(f"[2/4] exact replay ({base.quadrature}) -> {exact}")
    run(store, settings=dataclasses.replace(base, gradient="exact", cube=exact), **task)
    sampled = os.path.join(args.out, "lca-sampled.zarr")
    drawn = dataclasses.replace(base, gradient="sampled", cube=sampled)
    _say(f"[3/4] sampled replay ({drawn.batches} mini-batches of {drawn.batch_size} per step) "
         f"-> {sampled}")
    run(store, settings=drawn, **task)
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
