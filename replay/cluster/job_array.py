"""SLURM job arrays of replay slices: ``lca submit``.

Fire and forget: a job array whose task i runs ``lca replay CONFIG --cube CUBE --steps A_i:B_i``,
and a finishing job, started once every task succeeded, that completes and finalises the cube and
prints ``lca status``. The cube's ``done`` markers make any task safe to re-run. Slices hold whole
cube chunks, so no two tasks ever write the same zarr chunk.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from replay.cluster.jobqueue import ClusterError

__all__ = [
    "Submission",
    "array_script",
    "finish_script",
    "jobs_dir_for",
    "sbatch",
    "submit",
]


def _sbatch_header(job_name: str, output: str, extra_sbatch: Sequence[str]) -> list[str]:
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --output={output}"]
    lines += [f"#SBATCH {opt}" for opt in extra_sbatch]
    return lines


def _abs(path) -> str:
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


# Inside a job `local` is sized to the job's CPUs, not to the node the job happens to land on.
_CPUS = 'cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}'


def _scheduler_arg(scheduler: str) -> str:
    return '"local:$cpus"' if scheduler == "local" else shlex.quote(scheduler)


def array_script(config_path, *, cube, slices: Sequence[tuple[int, int]],
                 python: str | None = None, scheduler: str = "local",
                 extra_sbatch: Sequence[str] = (), log_dir=None,
                 job_name: str = "lca-replay") -> str:
    """An sbatch array script: task i runs ``lca replay CONFIG --cube CUBE --steps A_i:B_i``.

    slices: ``[(A_i, B_i), ...]`` of whole cube chunks, from ``replay.engine.driver.plan_slices``
    (array indices 0..len-1).
    extra_sbatch: further ``#SBATCH`` options, e.g. ``["--partition=debug", "--time=2:00:00"]``.
    log_dir: where ``replay-<array job>_<task>.out`` go (default: the current directory).
    """
    if not slices:
        raise ClusterError("no step slices to submit: the trajectory has nothing to replay")
    py = shlex.quote(python or sys.executable)
    out = os.path.join(_abs(log_dir or "."), "replay-%A_%a.out")
    lines = _sbatch_header(job_name, out, extra_sbatch)
    lines.insert(2, f"#SBATCH --array=0-{len(slices) - 1}")
    lines += [
        "# lca-replay: task i replays the intervals whose start step t satisfies A_i <= t < B_i;",
        "# steps already marked done in the cube are skipped, so a task can simply be re-run.",
        "set -euo pipefail",
        "slices=(" + " ".join(f"{a}:{b}" for a, b in slices) + ")",
        'steps=${slices[$SLURM_ARRAY_TASK_ID]}',
        _CPUS,
        'echo "lca-replay: array task $SLURM_ARRAY_TASK_ID: --steps $steps on $(hostname), '
        '$cpus CPUs"',
        f"exec {py} -m replay.cli replay {shlex.quote(_abs(config_path))} "
        f'--cube {shlex.quote(_abs(cube))} --steps "$steps" '
        f"--scheduler {_scheduler_arg(scheduler)}",
    ]
    return "\n".join(lines) + "\n"


def finish_script(config_path, *, cube, python: str | None = None, scheduler: str = "local",
                  extra_sbatch: Sequence[str] = (), log_dir=None,
                  job_name: str = "lca-finish") -> str:
    """An sbatch script that completes and finalises the cube, then prints ``lca status``.

    Submitted with ``--dependency=afterok:<array job>``: it runs once every array task succeeded.
    ``lca replay`` computes whatever is still missing (nothing, normally) and finalises; ``lca
    status`` exits 3 if steps are still missing, so the job fails visibly.
    """
    py = shlex.quote(python or sys.executable)
    cube_q = shlex.quote(_abs(cube))
    out = os.path.join(_abs(log_dir or "."), "finish-%j.out")
    lines = _sbatch_header(job_name, out, extra_sbatch) + [
        "set -euo pipefail",
        _CPUS,
        f"{py} -m replay.cli replay {shlex.quote(_abs(config_path))} --cube {cube_q} "
        f"--scheduler {_scheduler_arg(scheduler)}",
        f"exec {py} -m replay.cli status {cube_q}",
    ]
    return "\n".join(lines) + "\n"


def sbatch(script, *, after: str | None = None) -> str:
    """Submit a script file with ``sbatch``; return the job id.

    after: a job id this one waits for (``--dependency=afterok``); if that job fails, this one is
    cancelled rather than left pending forever (``--kill-on-invalid-dep=yes``).
    """
    exe = shutil.which("sbatch")
    if exe is None:
        raise ClusterError("sbatch not found on PATH: run lca submit where SLURM is installed "
                           "(a login node), or add --dry-run to only print the job scripts")
    cmd = [exe, "--parsable"]
    if after is not None:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    proc = subprocess.run(cmd + [os.fspath(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ClusterError(f"sbatch {script} failed (exit {proc.returncode}): {why}: fix the "
                           f"SLURM options (--partition, --account, --time) and submit again")
    job = proc.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
    if not job.isdigit():
        raise ClusterError(f"sbatch {script} printed {proc.stdout.strip()!r}, not a job id")
    return job


@dataclass(frozen=True)
class Submission:
    """What :func:`submit` wrote and submitted (job ids are None for a dry run)."""

    jobs_dir: Path
    array_script: str
    finish_script: str
    slices: tuple[tuple[int, int], ...]
    array_job: str | None = None
    finish_job: str | None = None


def jobs_dir_for(cube) -> Path:
    """Where the job scripts and logs of a cube go: ``<cube>.jobs/`` beside a local cube."""
    cube = os.fspath(cube).rstrip("/")
    if "://" in cube:
        return Path("lca-jobs") / cube.rsplit("/", 1)[-1]
    return Path(cube + ".jobs").absolute()


def submit(config_path, *, cube, slices: Sequence[tuple[int, int]], python: str | None = None,
           scheduler: str = "local", extra_sbatch: Sequence[str] = (), jobs_dir=None,
           dry_run: bool = False) -> Submission:
    """Submit the replay of `slices` as a SLURM array plus a dependent finishing job.

    Writes ``replay-array.sh`` and ``finish.sh`` into `jobs_dir` (default ``<cube>.jobs/``, also
    where the job logs go) and submits them. ``dry_run``: only returns the scripts, writing and
    submitting nothing.
    """
    jobs = Path(jobs_dir) if jobs_dir is not None else jobs_dir_for(cube)
    common = dict(cube=cube, python=python, scheduler=scheduler, extra_sbatch=extra_sbatch,
                  log_dir=jobs)
    array = array_script(config_path, slices=slices, **common)
    finish = finish_script(config_path, **common)
    result = Submission(jobs, array, finish, tuple(tuple(s) for s in slices))
    if dry_run:
        return result
    jobs.mkdir(parents=True, exist_ok=True)
    (jobs / "replay-array.sh").write_text(array)
    (jobs / "finish.sh").write_text(finish)
    array_job = sbatch(jobs / "replay-array.sh")
    finish_job = sbatch(jobs / "finish.sh", after=array_job)
    return Submission(jobs, array, finish, result.slices, array_job, finish_job)
