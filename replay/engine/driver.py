"""``replay.run``: a trajectory in, an LCA cube out (docs/design.md §5–8).

The driver resolves the task, groupings and step selection, creates (or checks and resumes)
the cube, cuts the not-yet-done steps into pieces that never straddle a cube chunk, runs one
task per piece on the chosen scheduler and writes the pieces' arrays as they finish, a few at
a time (:mod:`replay.cube.buffer`). Every
setting comes from one :class:`~replay.settings.ReplaySettings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from replay.cluster.executor import JOBQUEUE, executor
from replay.cube import failure, opening, param_lca, schema, zarr_files
from replay.cube import writer as cubes
from replay.cube.buffer import INLINE_BYTES, ResultBuffer
from replay.cube.lock import CubeLock
from replay.engine.gradients import plan_batches, sorts_by_size, to_device
from replay.engine.piece import compute_pieces
from replay.engine.runtime import Spec, release_buffers
from replay.engine.plan import (absolute, default_chunk, default_cube_path, default_piece,
                                intervals, plan_pieces, select_steps)
from replay.engine.preflight import check_files, check_model
from replay.engine.tied import reached_uses, tensor_uses, use_counts
from replay.errors import ReplayError, TaskError
from replay.settings import ReplaySettings, describe_gradient

DEFAULT_BATCH = 256


def run(trajectory, task=None, *, settings: ReplaySettings | None = None,
        task_args: dict | None = None, trust_task: bool = False, **options) -> xr.Dataset:
    """Replay ``trajectory`` and return its LCA cube (lazily opened from ``out``).

    ``task``: a Task instance, a ``"package.module:Factory"`` reference (arguments from
    ``task_args`` or, for the recorded reference, the manifest), or None with
    ``trust_task=True`` to import the reference stored in the manifest.

    ``options`` are the settings of :class:`~replay.settings.ReplaySettings` by their
    keywords — ``datasets``, ``gradient`` ("exact" or :class:`~replay.settings.Sampled`),
    ``quadrature``, ``tolerance``, ``max_splits``, ``groups``, ``out``, ``scheduler``, ``steps``
    (``"A:B"``, ``(A, B)`` or ``slice(A, B)``: intervals whose start t has A <= t < B),
    ``chunk_size``, ``precision``, ``batch_size`` (of the data loop), ``device``, ``threads``,
    ``nonfinite``, ``cluster_options``, ``progress`` — over ``settings`` when given. Re-running
    on an existing cube computes only the steps not yet done.
    """
    began = time.perf_counter()
    settings = ReplaySettings.from_options(options, base=settings)
    plan = prepare(trajectory, task, settings=settings, task_args=task_args,
                   trust_task=trust_task)
    spec, writer = plan.spec, plan.writer
    try:
        # Own the chunks this run writes (another replay of them is refused, a dead one holds
        # nothing), then plan again: a replay that just finished may have done some of them.
        with CubeLock(spec.cube, plan.label) as lock:
            lock.claim(sorted({i0 // plan.chunk for i0, _ in plan.pieces}))
            done = writer.done_mask()
            pieces = plan_pieces(plan.selected & ~done, plan.chunk, plan.piece)
            stats = execute(plan, pieces, done)
            with lock.exclusive():  # replays finishing their slices at once finalise once
                complete = param_lca.finalize(writer, spec.datasets, plan.names, plan.shapes) \
                    if settings.param_lca else bool(writer.done_mask().all())
    except BaseException as err:
        gone = failure.discard_if_empty(spec.cube, plan.created, writer)
        found = failure.write_failure(spec.cube, err, writer, gone)
        if found is not None:
            raise found from None
        raise
    if settings.progress:
        _summary(spec.cube, stats, plan.selected, time.perf_counter() - began, complete)
    return opening.open_dataset(spec.cube)


@dataclass
class Plan:
    """What :func:`prepare` resolved: the settings, the task spec, the cube writer and the
    pieces to run."""

    settings: ReplaySettings
    spec: Spec
    writer: cubes.CubeWriter
    pieces: list[tuple[int, int]]
    selected: np.ndarray
    names: list[str]
    shapes: dict
    chunk: int = 1  # intervals per cube chunk
    piece: int = 1  # most intervals per task
    created: bool = False  # this call created the cube (it may remove it if nothing got done)

    def label(self, c0: int, c1: int) -> str:
        """Chunks [c0, c1) as the steps they hold, for messages."""
        steps = self.spec.steps
        last = min(c1 * self.chunk, len(steps)) - 1
        return f"steps {int(steps[c0 * self.chunk])}..{int(steps[last])}"


def prepare(trajectory, task=None, *, settings: ReplaySettings | None = None,
            task_args: dict | None = None, trust_task: bool = False, **options) -> Plan:
    """Validate everything, create the cube (or check the existing one) and plan the pieces;
    computes nothing. Job arrays call it once before their tasks fill the cube. Takes the
    same arguments as :func:`run`.
    """
    from replay.grouping.resolve import default_groupings, resolve_groupings
    from replay.store.trajectory import open_trajectory

    s = ReplaySettings.from_options(options, base=settings, where="replay.prepare")
    traj = open_trajectory(trajectory)
    ref, args, task_obj, task_inst = _resolve_task(traj, task, task_args, trust_task)
    provided = task_inst.datasets()
    available = list(provided)
    names = list(s.datasets) if s.datasets is not None else available
    unknown = [d for d in names if d not in available]
    if unknown or not names:
        raise ReplayError(f"unknown dataset(s) {unknown or names}; the task provides "
                          f"{', '.join(available)}")
    empty = [d for d in names if len(provided[d]) == 0]
    if empty:
        raise ReplayError(f"dataset {empty[0]!r} of task {ref!r} is empty: there is no loss to "
                          "allocate; leave it out (datasets=[...], CLI --datasets) or give the "
                          "task data")
    checked = (_task_key(ref, args), traj.manifest_sha256) if task_obj is None else None
    if checked not in _CHECKED:
        check_model(task_inst, traj, ref)
        if checked is not None:
            _CHECKED.add(checked)
    counts = None
    if callable(getattr(task_inst, "token_counts", None)):
        counts = {k: np.asarray(v) for k, v in task_inst.token_counts().items()}
    uses = tensor_uses(traj.names, traj.aliases, s.tied)
    split = len(uses) > len(traj.names)
    if split:  # uses the loss never reaches would only dilute their groups
        probe = [to_device(task_inst.collate([provided[d][i] for i in range(min(8, len(
            provided[d])))]), torch.device("cpu"), torch.float32) for d in names]
        uses = reached_uses(task_inst, uses, probe)
    names_u = list(uses)
    shapes_u = {use: traj.shapes[name] for use, name in uses.items()}
    spec_groups = s.groups if s.groups is not None else default_groupings(names_u)
    groupings = resolve_groupings(list(spec_groups), names_u, shapes_u,
                                  use_counts(counts, uses, traj.aliases) if split else counts,
                                  aliases=None if split else traj.aliases)
    batch = int(s.eval_batch_size or getattr(task_inst, "eval_batch_size", DEFAULT_BATCH))
    by_size = sorts_by_size(task_inst)
    if by_size:  # a bad item_size() fails here, before the cube exists
        for d in names:
            plan_batches(task_inst, d, provided[d], batch)

    starts, ends = intervals(traj)
    selected = select_steps(starts, s.steps)
    out = absolute(s.cube or default_cube_path(traj.path, s.mode))
    recorded = s.cube_settings(trajectory=traj.manifest_sha256, task=ref, task_args=args,
                               datasets=names, batch_size=batch,
                               groupings=[g.name for g in groupings], by_size=by_size,
                               moot=frozenset() if _has_ties(traj) else frozenset({"tied"}))
    chunk = s.chunk_size or default_chunk(len(starts))
    layout = schema.Coords.of(starts, ends, groupings, names, chunk)
    # Everything is checked before the first byte is written: a refused run leaves no trace.
    created = False
    if cubes.exists(out):
        if s.chunk_size is None:
            layout = dataclasses.replace(layout, chunk=cubes.cube_chunk(out))
        cubes.check_compatible(out, layout, recorded)
        check_files(traj, starts, ends, selected & ~cubes.CubeWriter(out).done_mask())
    else:
        check_files(traj, starts, ends, selected)
        try:
            attrs = schema.attributes(
                trajectory_path=traj.path, manifest_sha256=traj.manifest_sha256,
                settings=recorded, gradient=describe_gradient(s.mode), quadrature=s.quadrature,
                tolerance=s.tolerance)
            created = cubes.create(out, layout, attrs)
        except OSError as err:
            raise failure.write_failure(out, err, None, True) or err from None
        if not created:  # another replay created it a moment ago: resume that one
            cubes.check_compatible(out, layout, recorded)
    writer = cubes.CubeWriter(out)
    done = np.zeros(len(starts), dtype=bool) if created else writer.done_mask()
    piece = s.chunk_size or default_piece(len(starts))
    pieces = plan_pieces(selected & ~done, layout.chunk, piece)
    size = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes_u.values())
    spec = Spec(s.for_workers(), absolute(traj.path), ref, args, tuple(names), groupings,
                uses, batch, out, starts, ends, task_obj,
                inline_parts=size * len(names) * 8 <= INLINE_BYTES,
                manifest=traj.manifest_sha256)
    return Plan(s, spec, writer, pieces, selected, names_u, shapes_u, layout.chunk, piece,
                created)


def _has_ties(traj) -> bool:
    recorded = set(traj.names)
    return any(name in recorded for name in traj.aliases.values())


# Tasks built from a reference in this process, by reference and arguments, as the replay's
# runtimes are cached (replay.engine.runtime): a second replay in a notebook or a benchmark does
# not build its data and model again to check them. Models checked against a trajectory, too.
_TASKS: dict[str, object] = {}
_KEEP_TASKS = 4
_CHECKED: set[tuple[str, str]] = set()


def _task_key(ref: str, args) -> str:
    return json.dumps([ref, args], sort_keys=True, default=str)


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
        key = _task_key(task, task_args)
        inst = _TASKS.pop(key, None)
        if inst is None:
            inst = load_task(task, task_args)
        _TASKS[key] = inst  # the most recent last
        while len(_TASKS) > _KEEP_TASKS:
            _TASKS.pop(next(iter(_TASKS)))
        return task, dict(task_args), None, inst
    if task_args is not None:
        raise TaskError("task_args is only used with a task reference string, not a Task object")
    return task_reference(type(task)), {}, task, task


def execute(plan: Plan, pieces: list[tuple[int, int]], done: np.ndarray | None = None) -> dict:
    """Run ``pieces`` on the plan's scheduler, writing results as they arrive (in batches,
    :mod:`replay.cube.buffer`); ``done``: the cube's done mask if the caller has just read it."""
    s, spec, writer = plan.settings, plan.spec, plan.writer
    stats = {"evaluations": 0, "forwards": 0, "task_seconds": 0.0, "steps": 0, "where": "-"}
    if not pieces:
        return stats
    if s.param_lca:
        param_lca.drop_stale_parts(writer, spec.datasets, pieces, done)
    total = sum(i1 - i0 for i0, i1 in pieces)
    bar = None
    cluster_options = s.cluster_options
    if isinstance(s.scheduler, str) and s.scheduler in JOBQUEUE and "://" not in spec.cube:
        # Batch jobs write their logs beside the cube, not into the user's working directory.
        extra = dict((cluster_options or {}).get("extra") or {})
        extra.setdefault("log_directory", f"{spec.cube}.jobs")
        cluster_options = {**(cluster_options or {}), "extra": extra}
    with contextlib.ExitStack() as stack:
        try:
            run_, where = stack.enter_context(executor(
                s.scheduler, threads=s.threads, device=s.device, cluster_options=cluster_options))
        except (OSError, TimeoutError) as err:   # e.g. no scheduler at that address
            raise ReplayError(f"cannot start or reach the Dask scheduler {s.scheduler!r} ({err}); "
                              "check that it runs and its address, or use --scheduler local "
                              "(or sync)") from None
        stats["where"] = where
        if s.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="step", desc=f"replay [{where}]", file=sys.stderr,
                       dynamic_ncols=True)
        whole = plan.created and s.param_lca and spec.inline_parts and total == len(spec.steps)
        held = ResultBuffer(writer, spec.datasets,
                            totals=(plan.names, plan.shapes) if whole else None)
        try:
            for result in run_(compute_pieces, spec, pieces):
                held.add(result)
                stats["evaluations"] += result["evaluations"]
                stats["forwards"] += result["forwards"]
                stats["task_seconds"] += result["seconds"]
                stats["steps"] += result["i1"] - result["i0"]
                if bar is not None:
                    bar.update(result["i1"] - result["i0"])
        except BaseException as err:
            # The pieces finished before the error are kept, as if written when they arrived;
            # if writing is what failed, the original error is the one to report.
            with contextlib.suppress(Exception):
                held.flush()
            if type(err).__name__ != "KilledWorker":
                raise
            # Dask gave up on a piece whose workers kept dying (out of memory, a crash).
            raise ReplayError(f"replay tasks kept killing their Dask workers ({err}); give "
                              "workers more memory (e.g. --memory) or use fewer per node, then "
                              "run the same command again: the steps done are kept") from None
        finally:
            if bar is not None:
                bar.close()
        held.flush(last=True)
    release_buffers()
    return stats


def _summary(out, stats, selected, seconds, complete):
    root = zarr_files.open_root(out)
    done = np.asarray(root["done"][:], dtype=bool)
    residual, splits = np.asarray(root["residual"][:]), np.asarray(root["splits"][:])
    res = np.abs(residual[done & selected]) if done.any() else np.array([])
    res = res[np.isfinite(res)]
    if stats["steps"]:
        lines = [f"replayed {stats['steps']} step(s) on {stats['where']} in {seconds:.1f} s "
                 f"({stats['evaluations']} gradient evaluations, {stats['forwards']} loss-only)"]
    else:
        lines = [f"nothing to replay: the {int(selected.sum())} selected step(s) are already done"]
    lines.append(f"cube {out}: {int(done.sum())}/{done.size} steps done"
                 + ("" if complete else " (run again to fill the rest)"))
    skipped = np.flatnonzero(done & selected & (splits == 0))
    if skipped.size:
        starts = root["step"][:]
        steps = ", ".join(str(int(starts[i])) for i in skipped[:10])
        lines.append(f"{skipped.size} step(s) skipped for non-finite values (lca NaN, splits 0): "
                     f"{steps}{' …' if skipped.size > 10 else ''}")
    if res.size:
        lines.append(f"|residual| mean {res.mean():.3g}, max {res.max():.3g} (loss units)")
    print("\n".join(lines), file=sys.stderr)

