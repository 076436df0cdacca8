"""``lca submit`` (a SLURM job array of replay slices) and ``lca status`` (progress of a cube).

``lca status CUBE`` exit codes: 0 every step is done, 3 some steps are missing, 1 error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from replay.errors import ConfigError, CubeError

STATUS_INCOMPLETE = 3
_MAX_RANGES = 20  # ranges listed by `lca status` before "... and N more"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="replay on SLURM as a job array of step slices plus a finishing job",
        description="Split the replay into N slices of whole cube chunks and submit them as a "
        "SLURM job array (task i runs `lca replay CONFIG --cube CUBE --steps A_i:B_i`), then a "
        "job that runs once all tasks succeeded: `lca replay CONFIG --cube CUBE` (finalise) and "
        "`lca status CUBE`. Scripts and logs go to CUBE.jobs/. Failed tasks can be resubmitted "
        "as they are: finished steps are skipped.")
    p.add_argument("config", help="replay configuration (YAML), as for `lca replay`")
    p.add_argument("--array", type=int, required=True, metavar="N",
                   help="number of array tasks (fewer if the cube has fewer chunks)")
    p.add_argument("--cube", help="output cube (zarr); default: as for `lca replay`")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job scripts, write and submit nothing")
    p.add_argument("--partition", "--queue", dest="partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--time", help="walltime per task, e.g. 2:00:00")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per task (the local Dask cluster "
                   "inside each task is sized to them)")
    p.add_argument("--mem", help="memory per task, e.g. 16G")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="any further sbatch option, e.g. --sbatch=--gres=gpu:1 (repeatable)")
    p.add_argument("--scheduler", default="local",
                   help="Dask scheduler inside each task (default: local, sized to the task)")
    p.add_argument("--python", help="Python interpreter of the jobs (default: this one)")
    p.set_defaults(func=run_submit)

    p = subparsers.add_parser(
        "status", help="steps done and missing in a cube",
        description="Print how many steps of a cube are done and the missing step ranges. "
        "Exit status: 0 complete, 3 incomplete, 1 error.")
    p.add_argument("cube", help="cube (zarr directory or URL)")
    p.set_defaults(func=run_status)


# ---- lca submit ------------------------------------------------------------------------------------

def sbatch_options(args: argparse.Namespace) -> list[str]:
    """The ``#SBATCH`` options given on the command line, in sbatch's long form."""
    opts = [f"--{name.replace('_', '-')}={value}"
            for name in ("partition", "account", "time", "cpus_per_task", "mem")
            if (value := getattr(args, name)) is not None]
    return opts + list(args.sbatch)


def plan(source: str, cube: str | None, n: int, *, create: bool) -> tuple[str, list]:
    """The cube path and ``n`` (or fewer) ``(A, B)`` step slices of whole cube chunks, with the
    settings ``lca replay SOURCE --cube CUBE`` resolves, so that slices and cube match what
    each array task will compute.

    create: make the cube now (:func:`replay.engine.driver.prepare`) unless it exists, so that
    the array tasks only ever resume it; concurrent first writers would race to create it.
    """
    from replay.commands.replay import read_source
    from replay.cube import writer as cubes
    from replay.engine.driver import prepare
    from replay.engine.plan import default_chunk, plan_slices
    from replay.store.trajectory import open_trajectory

    src = read_source(source, overrides={"cube": cube} if cube else None)
    starts = np.asarray(open_trajectory(src.trajectory).steps[:-1], dtype=np.int64)
    out = src.settings.cube
    if not out:
        raise ConfigError(f"no cube to write: pass --cube PATH (or set replay.cube in {source})")
    settings = src.settings
    if settings.chunk_size is None and not cubes.exists(out):
        # Each array task gets whole chunks: small enough ones that there are n of them.
        settings = dataclasses.replace(settings, chunk_size=min(
            default_chunk(len(starts)), max(1, math.ceil(len(starts) / n))))
    if create and not cubes.exists(out):
        prepare(src.trajectory, src.task, settings=settings, task_args=src.task_args)
    if cubes.exists(out):
        chunk = cubes.cube_chunk(out)
    else:
        chunk = settings.chunk_size
    return out, plan_slices(len(starts), chunk, n, starts)


def run_submit(args: argparse.Namespace) -> int:
    from replay.cluster.job_array import submit

    if args.array < 1:
        raise ConfigError(f"--array {args.array}: give at least 1 task")
    cube, slices = plan(args.config, args.cube, args.array, create=not args.dry_run)
    result = submit(args.config, cube=cube, slices=slices, python=args.python,
                    scheduler=args.scheduler, extra_sbatch=sbatch_options(args),
                    dry_run=args.dry_run)
    if args.dry_run:
        print(f"# {result.jobs_dir}/replay-array.sh ({len(slices)} tasks)")
        print(result.array_script)
        print(f"# {result.jobs_dir}/finish.sh (sbatch --dependency=afterok:<array job>)")
        print(result.finish_script, end="")
        return 0
    print(f"submitted array job {result.array_job} ({len(slices)} tasks: "
          + ", ".join(f"{a}:{b}" for a, b in slices) + ")")
    print(f"submitted finishing job {result.finish_job} (after {result.array_job} succeeds)")
    print(f"scripts and logs: {result.jobs_dir}; progress: lca status {cube}")
    return 0


# ---- lca status ------------------------------------------------------------------------------------

def cube_progress(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(step, done) of a cube: the ``step`` coordinate (int64[n]) and ``done`` (bool[n])."""
    import xarray as xr

    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        raise CubeError(f"no cube at {path}: make it with lca replay CONFIG --cube {path}")
    try:
        # Not consolidated: jobs may be writing the cube, and its own metadata is the truth.
        ds = xr.open_zarr(path, consolidated=False)
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise CubeError(f"{path} is not a readable zarr cube ({err}): check the path") from None
    if "done" not in ds or "step" not in ds.coords:
        raise CubeError(f"{path} has no `done` variable over `step`: not an lca-replay cube")
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    done = np.asarray(ds["done"].values, dtype=bool)
    return steps, done


def missing_ranges(steps: Sequence[int], done: Sequence[bool]) -> list[tuple[int, int]]:
    """Runs of consecutive not-done steps as (first step, last step), in step order."""
    ranges: list[tuple[int, int]] = []
    run_start = None
    for i, ok in enumerate(done):
        if not ok and run_start is None:
            run_start = i
        if ok and run_start is not None:
            ranges.append((int(steps[run_start]), int(steps[i - 1])))
            run_start = None
    if run_start is not None:
        ranges.append((int(steps[run_start]), int(steps[len(done) - 1])))
    return ranges


def format_ranges(ranges: Sequence[tuple[int, int]], limit: int = _MAX_RANGES) -> str:
    """``[(40, 79), (120, 120)]`` -> ``"40-79, 120"``; more than `limit` ranges are summarised."""
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges[:limit])
    if len(ranges) > limit:
        text += f", ... and {len(ranges) - limit} more ranges"
    return text


def run_status(args: argparse.Namespace) -> int:
    steps, done = cube_progress(args.cube)
    n_done, total = int(done.sum()), len(done)
    print(f"{args.cube}: {n_done}/{total} steps done")
    if n_done == total:
        return 0
    print(f"missing: {format_ranges(missing_ranges(steps, done))}")
    return STATUS_INCOMPLETE
