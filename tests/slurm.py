"""A real single-node SLURM for tests: ``require_slurm()``, the ``slurm`` fixture, job waiting.

Start SLURM with ``sudo scripts/slurm-up.sh`` (``.ci/run`` does). When it is not running, tests
that need it skip with the reason, except under ``CI=true``, where they fail: CI must exercise
the cluster path, not silently skip it.

Use from a test module::

    from tests.slurm import slurm, wait_for_jobs  # noqa: F401  (slurm is a fixture)

    @pytest.mark.slurm
    @pytest.mark.usefixtures("slurm")
    def test_on_slurm(tmp_path): ...

or call ``require_slurm()`` at the top of a test.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Iterable

import pytest

_UP_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}


@functools.cache  # asked once per session: a down controller makes sinfo retry for ~10 s
def slurm_problem() -> str | None:
    """Why SLURM cannot run test jobs here, or None when ``sinfo`` shows a node up."""
    if shutil.which("sinfo") is None:
        return "sinfo not found: install slurm-wlm and munge, then run scripts/slurm-up.sh"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                              timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s: restart SLURM with scripts/slurm-up.sh"
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        return f"sinfo failed ({why}): start SLURM with scripts/slurm-up.sh"
    # sinfo appends flags such as '*' (not responding) or '~' (powered off) to a state.
    states = [s.rstrip("*~#!%$@^-+") for s in proc.stdout.split()]
    if not _UP_STATES & set(states):
        return (f"no SLURM node is up (sinfo states: {' '.join(states) or 'none'}): "
                f"run scripts/slurm-up.sh")
    return None


def require_slurm() -> None:
    """Skip the calling test when SLURM is not running; under ``CI=true`` fail it instead."""
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SLURM is required under CI=true: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture
def slurm():
    """A running SLURM (see :func:`require_slurm`)."""
    require_slurm()
    yield


def job_states(job_id: str) -> list[str]:
    """States of a job (one per array task), from ``scontrol`` (completed jobs stay MinJobAge)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                          text=True, check=False)
    return [field.split("=", 1)[1] for line in proc.stdout.splitlines()
            for field in line.split() if field.startswith("JobState=")]


def wait_for_jobs(job_ids: Iterable[str], timeout: float = 180) -> None:
    """Wait until none of the jobs is pending or running; fail with the queue after `timeout` s."""
    ids = [str(j) for j in job_ids]
    deadline = time.monotonic() + timeout
    while True:
        queue = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"],
                               capture_output=True, text=True, check=False).stdout.strip()
        if not queue:
            return
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids], check=False)
            pytest.fail(f"SLURM jobs {', '.join(ids)} still queued after {timeout:.0f} s:\n{queue}")
        time.sleep(1)
