"""``replay.run``: a trajectory in, an LCA cube out (DESIGN §5–8).

The driver resolves the task, groupings and step selection, creates (or checks and resumes)
the cube, cuts the not-yet-done steps into pieces that never straddle a cube chunk, runs one
task per piece on the chosen scheduler and writes each piece's arrays as it finishes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import xarray as xr

from replay.cube import writer as cube
from replay.engine import preflight as guard
from replay.errors import ConfigError, ReplayError, TaskError
from replay.engine.gradients import Sampled, describe_gradient, parse_gradient, plan_batches, sorts_by_size
from replay.cube.lock import CubeLock
from replay.engine.quadrature import check_quadrature
from replay.cluster.executor import JOBQUEUE, executor
from replay.engine.piece import DTYPES, Spec, compute_piece

DEFAULT_BATCH = 256


def run(trajectory, task=None, datasets: Sequence[str] | None = None, gradient="exact",
        quadrature: str = "simpson", tolerance: float = 1e-3, max_splits: int = 32,
        groups="tensor", out: str | None = None, scheduler="local", steps=None,
        chunk_size: int | None = None, precision: str = "float32", *,
        task_args: dict | None = None, trust_task: bool = False, batch_size: int | None = None,
        device: str = "cpu", threads: int = 1, nonfinite: str = "error",
        cluster_options: dict | None = None, progress: bool = True) -> xr.Dataset:
    """Replay ``trajectory`` and return its LCA cube (lazily opened from ``out``).

    ``task``: a Task instance, a ``"package.module:Factory"`` reference (arguments from
    ``task_args`` or, for the recorded reference, the manifest), or None with
    ``trust_task=True`` to import the reference stored in the manifest. ``steps``: ``"A:B"``,
    ``(A, B)`` or ``slice(A, B)``, the intervals whose start t has A <= t < B. Re-running on an
    existing cube computes only the steps not yet done. ``scheduler``: see
    :mod:`replay.cluster.executor`; ``threads``: torch threads per task (part of the settings, since
    float results depend on it).
    """
    began = time.perf_counter()
    plan = prepare(trajectory, task, datasets, gradient, quadrature, tolerance, max_splits,
                   groups, out, steps=steps, chunk_size=chunk_size, precision=precision,
                   task_args=task_args, trust_task=trust_task, batch_size=batch_size,
                   device=device, threads=threads, nonfinite=nonfinite)
    spec, writer = plan.spec, plan.writer
    try:
        # Own the chunks this run writes (another replay of them is refused, a dead one holds
        # nothing), then plan again: a replay that just finished may have done some of them.
        with CubeLock(spec.cube, plan.label) as lock:
            lock.claim(sorted({i0 // plan.chunk for i0, _ in plan.pieces}))
            pieces = plan_pieces(plan.selected & ~writer.done_mask(), plan.chunk)
            stats = _execute(spec, pieces, writer, scheduler, threads, device, cluster_options,
                             progress)
            with lock.exclusive():  # replays finishing their slices at once finalise once
                complete = writer.finalize_params(spec.datasets, plan.names, plan.shapes)
    except BaseException as err:
        gone = guard.discard_if_empty(plan.spec.cube, plan.created, writer)
        failure = guard.write_failure(spec.cube, err, writer, gone)
        if failure is not None:
            raise failure from None
        raise
    if progress:
        _summary(spec.cube, stats, plan.selected, time.perf_counter() - began, complete)
    return xr.open_zarr(spec.cube)


@dataclass
class Plan:
    """What :func:`prepare` resolved: the task spec, the cube writer and the pieces to run."""

    spec: Spec
    writer: cube.CubeWriter
    pieces: list[tuple[int, int]]
    selected: np.ndarray
    names: list[str]
    shapes: dict
    chunk: int = 1
    created: bool = False  # this call created the cube (it may remove it if nothing got done)

    def label(self, c0: int, c1: int) -> str:
        """Chunks [c0, c1) as the steps they hold, for messages."""
        steps = self.spec.steps
        last = min(c1 * self.chunk, len(steps)) - 1
        return f"steps {int(steps[c0 * self.chunk])}..{int(steps[last])}"


def prepare(trajectory, task=None, datasets: Sequence[str] | None = None, gradient="exact",
            quadrature: str = "simpson", tolerance: float = 1e-3, max_splits: int = 32,
            groups="tensor", out: str | None = None, *, steps=None,
            chunk_size: int | None = None, precision: str = "float32",
            task_args: dict | None = None, trust_task: bool = False,
            batch_size: int | None = None, device: str = "cpu", threads: int = 1,
            nonfinite: str = "error", scheduler=None, cluster_options=None,
            progress=None) -> Plan:
    """Validate everything, create the cube (or check the existing one) and plan the pieces;
    computes nothing. Job arrays call it once before their tasks fill the cube. Accepts (and
    ignores) :func:`run`'s execution arguments, so both take the same keywords.

    ``task``: a Task instance, a ``"package.module:Factory"`` reference (arguments from
    ``task_args`` or, for the recorded reference, the manifest), or None with
    ``trust_task=True`` to import the reference stored in the manifest. ``steps``: ``"A:B"``,
    ``(A, B)`` or ``slice(A, B)``, the intervals whose start t has A <= t < B. Re-running on an
    existing cube computes only the steps not yet done.
    """
    from replay.grouping.groupings import resolve_groupings
    from replay.store.trajectory import open_trajectory

    traj = open_trajectory(trajectory)
    mode = parse_gradient(gradient)
    check_quadrature(quadrature, tolerance, max_splits)
    if precision not in DTYPES:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(DTYPES)}")
    if nonfinite not in ("error", "skip"):
        raise ConfigError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
    if not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    ref, args, task_obj, task_inst = _resolve_task(traj, task, task_args, trust_task)
    provided = task_inst.datasets()
    available = list(provided)
    names = list(datasets) if datasets is not None else available
    unknown = [d for d in names if d not in available]
    if unknown or not names:
        raise ReplayError(f"unknown dataset(s) {unknown or names}; the task provides "
                          f"{', '.join(available)}")
    empty = [d for d in names if len(provided[d]) == 0]
    if empty:
        raise ReplayError(f"dataset {empty[0]!r} of task {ref!r} is empty: there is no loss to "
                          "allocate; leave it out (datasets=[...], CLI --datasets) or give the "
                          "task data")
    guard.check_model(task_inst, traj, ref)
    counts = None
    if callable(getattr(task_inst, "token_counts", None)):
        counts = {k: np.asarray(v) for k, v in task_inst.token_counts().items()}
    groupings = resolve_groupings(groups, traj.names, traj.shapes, counts, aliases=traj.aliases)
    batch = int(batch_size or getattr(task_inst, "eval_batch_size", DEFAULT_BATCH))
    by_size = sorts_by_size(task_inst)
    if by_size:  # a bad item_size() fails here, before the cube exists
        for d in names:
            plan_batches(task_inst, d, provided[d], batch)

    starts, ends = _intervals(traj)
    selected = select_steps(starts, steps)
    out = _absolute(out or default_cube_path(traj.path, mode))
    labels, owners, sizes = [], [], []
    for g in groupings:
        labels += [f"{g.name}/{label}" for label in g.labels]
        owners += [g.name] * len(g.labels)
        sizes += list(np.asarray(g.sizes, dtype=np.int64))
    settings = {
        "trajectory": traj.manifest_sha256, "task": ref, "task_args": args,
        "datasets": names, "gradient": json.loads(describe_gradient(mode)),
        "quadrature": quadrature, "tolerance": tolerance if quadrature == "adaptive" else None,
        "max_splits": max_splits if quadrature == "adaptive" else None,
        "precision": precision, "batch_size": batch, "threads": threads,
        "groupings": [g.name for g in groupings], "nonfinite": nonfinite,
    }
    if by_size:  # absent otherwise, so cubes of earlier versions still resume
        settings["batch_order"] = "size"
    if mode is not None:  # 0.2 evaluated each mini-batch on its own: other float rounding
        settings["sample_batches"] = "pooled"
    chunk = chunk_size or default_chunk(len(starts))
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk!r}")
    layout = cube.Layout(starts, ends, tuple(labels), tuple(owners), np.array(sizes, np.int64),
                         tuple(names), chunk)
    # Everything is checked before the first byte is written: a refused run leaves no trace.
    created = False
    if cube.exists(out):
        if chunk_size is None:
            layout = dataclasses.replace(layout, chunk=cube.cube_chunk(out))
        cube.check_compatible(out, layout, settings)
        guard.check_files(traj, starts, ends, selected & ~cube.CubeWriter(out).done_mask())
    else:
        guard.check_files(traj, starts, ends, selected)
        try:
            created = cube.create(out, layout, _attrs(traj, settings, mode, quadrature, tolerance))
        except OSError as err:
            raise guard.write_failure(out, err, None, True) or err from None
        if not created:  # another replay created it a moment ago: resume that one
            cube.check_compatible(out, layout, settings)
    writer = cube.CubeWriter(out)
    pieces = plan_pieces(selected & ~writer.done_mask(), layout.chunk)
    spec = Spec(_absolute(traj.path), ref, args, tuple(names), mode, quadrature, tolerance,
                max_splits, groupings, precision, device, batch, threads, out, starts, ends,
                nonfinite, task_obj)
    return Plan(spec, writer, pieces, selected, list(traj.names), dict(traj.shapes),
                layout.chunk, created)


def _resolve_task(traj, task, task_args, trust_task):
    from replay.task import load_task, task_reference

    if task is None:
        if not traj.task:
            raise TaskError(f"trajectory {traj.path} names no task; pass task='pkg.module:Factory'")
        if not trust_task:
            raise TaskError(
                f"trajectory {traj.path} names task {traj.task!r}; importing it runs its code, "
                f"so pass task={traj.task!r} (CLI: --task {traj.task}) or trust_task=True "
                "(CLI: --trust-task)"
            )
        task = traj.task
    if isinstance(task, str):
        if task_args is None:
            task_args = traj.task_args if task == traj.task else {}
        return task, dict(task_args), None, load_task(task, task_args)
    if task_args is not None:
        raise TaskError("task_args is only used with a task reference string, not a Task object")
    return task_reference(type(task)), {}, task, task


def _intervals(traj):
    recorded = np.asarray(traj.steps, dtype=np.int64)
    if len(recorded) < 2:
        raise ReplayError(f"trajectory {traj.path} has {len(recorded)} complete recorded step(s); "
                          "a replay needs at least two")
    return recorded[:-1], recorded[1:]


def select_steps(starts: np.ndarray, steps: Any) -> np.ndarray:
    """Boolean mask over intervals for ``"A:B"`` / ``(A, B)`` / ``slice`` / None (all)."""
    if steps is None:
        return np.ones(len(starts), dtype=bool)
    if isinstance(steps, str):
        try:
            a, b = (s.strip() for s in steps.split(":"))
            lo, hi = (int(a) if a else None), (int(b) if b else None)
        except ValueError:
            raise ConfigError(f"steps {steps!r} is not of the form A:B (e.g. 0:100)") from None
    elif isinstance(steps, slice):
        lo, hi = steps.start, steps.stop
    else:
        lo, hi = steps
    lo = int(starts[0]) if lo is None else lo
    hi = int(starts[-1]) + 1 if hi is None else hi
    mask = (starts >= lo) & (starts < hi)
    if not mask.any():
        raise ReplayError(
            f"steps {lo}:{hi} select no interval; the trajectory's intervals start at "
            f"{int(starts[0])}..{int(starts[-1])}"
        )
    return mask


def default_chunk(n: int) -> int:
    # ~16 chunks: enough tasks to balance a few workers, few enough that the one extra
    # gradient evaluation each chunk start costs (no end-point reuse across tasks) stays small.
    return max(1, min(256, math.ceil(n / 16)))


def plan_pieces(todo: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """Maximal runs of True in ``todo`` that stay inside one chunk."""
    pieces = []
    for c0 in range(0, len(todo), chunk):
        block = todo[c0:c0 + chunk]
        i = 0
        while i < len(block):
            if block[i]:
                j = i
                while j < len(block) and block[j]:
                    j += 1
                pieces.append((c0 + i, c0 + j))
                i = j
            else:
                i += 1
    return pieces


def plan_slices(n_intervals: int, chunk: int, n: int, starts: np.ndarray) -> list[tuple[int, int]]:
    """``n`` contiguous ``--steps A:B`` slices made of whole chunks (for job arrays)."""
    n_chunks = math.ceil(n_intervals / chunk)
    if n < 1:
        raise ConfigError("the number of slices must be >= 1")
    n = min(n, n_chunks)
    bounds = [round(k * n_chunks / n) for k in range(n + 1)]
    slices = []
    for a, b in zip(bounds, bounds[1:]):
        lo = int(starts[a * chunk])
        hi = int(starts[b * chunk]) if b * chunk < n_intervals else int(starts[-1]) + 1
        slices.append((lo, hi))
    return slices


def default_cube_path(store: str, mode: Sampled | None) -> str:
    parent = os.path.dirname(os.path.abspath(store.rstrip("/"))) if "://" not in store else \
        store.rstrip("/").rsplit("/", 1)[0]
    kind = "exact" if mode is None else "sampled"
    return f"{parent}/lca-{kind}.zarr"


def _absolute(path) -> str:
    # Workers may run in another directory (batch jobs): hand them absolute paths.
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _attrs(traj, settings, mode, quadrature, tolerance) -> dict:
    attrs = cube.version_attrs()
    attrs.update(
        quadrature=quadrature, gradient=describe_gradient(mode), tolerance=tolerance,
        trajectory=json.dumps({"path": traj.path, "manifest_sha256": traj.manifest_sha256}),
        task=json.dumps({"ref": settings["task"], "args": settings["task_args"]}),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        precision=settings["precision"], settings=json.dumps(settings, sort_keys=True),
    )
    return attrs


def _execute(spec, pieces, writer, scheduler, threads, device, cluster_options, progress):
    stats = {"evaluations": 0, "forwards": 0, "task_seconds": 0.0, "steps": 0, "where": "-"}
    if not pieces:
        return stats
    writer.drop_stale_parts(spec.datasets, pieces)
    total = sum(i1 - i0 for i0, i1 in pieces)
    bar = None
    if scheduler in JOBQUEUE and "://" not in spec.cube:
        # Batch jobs write their logs beside the cube, not into the user's working directory.
        extra = dict((cluster_options or {}).get("extra") or {})
        extra.setdefault("log_directory", f"{spec.cube}.jobs")
        cluster_options = {**(cluster_options or {}), "extra": extra}
    with contextlib.ExitStack() as stack:
        try:
            run_, where = stack.enter_context(executor(
                scheduler, threads=threads, device=device, cluster_options=cluster_options))
        except (OSError, TimeoutError) as err:   # e.g. no scheduler at that address
            raise ReplayError(f"cannot start or reach the Dask scheduler {scheduler!r} ({err}); "
                              "check that it runs and its address, or use --scheduler local "
                              "(or sync)") from None
        stats["where"] = where
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="step", desc=f"replay [{where}]", file=sys.stderr,
                       dynamic_ncols=True)
        try:
            for result in run_(compute_piece, spec, pieces):
                writer.write(result["i0"], result["i1"], result)
                stats["evaluations"] += result["evaluations"]
                stats["forwards"] += result["forwards"]
                stats["task_seconds"] += result["seconds"]
                stats["steps"] += result["i1"] - result["i0"]
                if bar is not None:
                    bar.update(result["i1"] - result["i0"])
        except Exception as err:
            if type(err).__name__ != "KilledWorker":
                raise
            # Dask gave up on a piece whose workers kept dying (out of memory, a crash).
            raise ReplayError(f"replay tasks kept killing their Dask workers ({err}); give "
                              "workers more memory (e.g. --memory) or use fewer per node, then "
                              "run the same command again: the steps done are kept") from None
        finally:
            if bar is not None:
                bar.close()
    return stats


def _summary(out, stats, selected, seconds, complete):
    # numpy-backed: with dask arrays, a Client of the run's cluster would compute these few
    # numbers through its scheduler (0.2 s of a 10-step replay's serial time).
    ds = xr.open_zarr(out, chunks=None)
    done = np.asarray(ds["done"].values, dtype=bool)
    res = np.abs(ds["residual"].values[done & selected]) if done.any() else np.array([])
    res = res[np.isfinite(res)]
    if stats["steps"]:
        lines = [f"replayed {stats['steps']} step(s) on {stats['where']} in {seconds:.1f} s "
                 f"({stats['evaluations']} gradient evaluations, {stats['forwards']} loss-only)"]
    else:
        lines = [f"nothing to replay: the {int(selected.sum())} selected step(s) are already done"]
    lines.append(f"cube {out}: {int(done.sum())}/{done.size} steps done"
                 + ("" if complete else " (run again to fill the rest)"))
    skipped = np.flatnonzero(done & selected & (np.asarray(ds["splits"].values) == 0))
    if skipped.size:
        steps = ", ".join(str(int(ds["step"].values[i])) for i in skipped[:10])
        lines.append(f"{skipped.size} step(s) skipped for non-finite values (lca NaN, splits 0): "
                     f"{steps}{' …' if skipped.size > 10 else ''}")
    if res.size:
        lines.append(f"|residual| mean {res.mean():.3g}, max {res.max():.3g} (loss units)")
    print("\n".join(lines), file=sys.stderr)
