"""Checks a replay makes before the first byte is written, so that its mistakes change nothing
on disk: the task's model has every recorded tensor with its recorded shape, and every store
file the replay will read is present with its recorded size. (What happens when a run fails
part-way is :mod:`replay.cube.failure`.)
"""

from __future__ import annotations

import os

import numpy as np

from replay.errors import TaskError, TrajectoryError


def check_model(task_inst, traj, ref) -> None:
    """The task's model must hold every recorded tensor with its recorded shape.

    Checked here, before the cube exists, so a mismatch changes nothing on disk. The model is
    built on the meta device (shapes only, no memory) where the task allows it.
    """
    import torch

    try:
        with torch.device("meta"):
            model = task_inst.build_model()
    except Exception:  # a task that loads or copies real data while building: build it for real
        model = task_inst.build_model()
    if not isinstance(model, torch.nn.Module):
        raise TaskError(f"task {ref!r}: build_model() returned {type(model).__name__}, not a "
                        "torch.nn.Module")
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    fix = "the task must build the recorded architecture: check its arguments (--task-args)"
    missing = [n for n in list(traj.names) + list(traj.state_names) if n not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TaskError(f"task {ref!r} builds a model without the recorded tensor "
                        f"{missing[0]!r} {traj.shapes[missing[0]]}{more} (trajectory "
                        f"{traj.path}); {fix}")
    for name in list(traj.names) + list(traj.state_names):
        got, want = tuple(tensors[name].shape), tuple(traj.shapes[name])
        if got != want:
            raise TaskError(f"parameter {name!r} has shape {got} in the model built by task "
                            f"{ref!r} but {want} in trajectory {traj.path}; {fix}")


def check_files(traj, starts, ends, todo) -> None:
    """Every file the intervals in ``todo`` will read is present with its recorded size.

    A missing or truncated file then stops the run before the cube is touched (contents are
    checked against their sha256 as they are read). The files are those of the store's
    :class:`~replay.store.rebuild.RebuildPlan`; one ``stat`` each; local stores only.
    """
    from replay.store.manifest import MANIFEST, is_remote, local_path

    if not todo.any() or is_remote(traj.path):
        return
    root = local_path(traj.path)
    fix = f"restore it from a copy of the store or re-record; `lca verify {traj.path}` lists " \
        "every problem"
    idx = np.flatnonzero(todo)
    for _, _, reads in traj.plan.walk(int(starts[idx[0]]), int(ends[idx[-1]])):
        for read in reads:
            rel = traj.plan.files[read.step][read.role]
            path = os.path.join(root, rel)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise TrajectoryError(f"{path}: the {read.role} file of step {read.step} is "
                                      f"missing; {fix}") from None
            except OSError as err:
                raise TrajectoryError(f"{path}: cannot read ({err.strerror}); {fix}") from None
            expected = traj.file_size(read.step, read.role)
            if size != expected:
                raise TrajectoryError(f"{path}: {size} bytes, {MANIFEST} says {expected} "
                                      f"(truncated or replaced); {fix}")
