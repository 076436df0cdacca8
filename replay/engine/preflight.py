"""What keeps a replay from damaging anything: checks made before the first byte is written,
and what is done when a run fails part-way.

Before: the task's model has every recorded tensor with its recorded shape, and every store
file the replay will read is present with its recorded size, so such mistakes change nothing on
disk. After: a cube that the failed run created and left empty is removed again, and an
OSError that hit the cube (disk full, quota, permissions) becomes one line saying what is kept.
"""

from __future__ import annotations

import errno
import os
import shutil

import numpy as np

from replay.errors import CubeError, LCAError, TaskError, TrajectoryError
from replay.cube.lock import CubeLock


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
    checked against their sha256 as they are read). One ``stat`` per file; local stores only.
    """
    from replay.store.manifest import MANIFEST, is_remote, local_path

    if not todo.any() or is_remote(traj.path):
        return
    root = local_path(traj.path)
    fix = f"restore it from a copy of the store or re-record; `lca verify {traj.path}` lists " \
        "every problem"
    idx = np.flatnonzero(todo)
    first, last = int(starts[idx[0]]), int(ends[idx[-1]])
    key = max(k for k in traj.keyframe_steps if k <= first)
    entries = {e["step"]: e for e in traj.manifest["steps"]}
    prev = None
    for t in traj.steps:
        if t < key:
            continue
        if t > last:
            break
        files = entries[t]["files"]
        # Walking forward reads the keyframe of t if it has one, else the delta of the step before.
        if prev is None or "keyframe" in files:
            needed = ["keyframe"]
            at = t
        elif "delta" in entries[prev]["files"]:
            needed, at = ["delta"], prev
        else:
            raise TrajectoryError(f"{root}/{MANIFEST}: step {t} has no keyframe and step {prev} "
                                  f"no delta file, so step {t} cannot be rebuilt; re-record the "
                                  "trajectory")
        needed = [(at, r) for r in needed] + ([(t, "state")] if "state" in files else [])
        for step, role in needed:
            rel = entries[step]["files"][role]
            path = os.path.join(root, rel)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise TrajectoryError(f"{path}: the {role} file of step {step} is missing; "
                                      f"{fix}") from None
            except OSError as err:
                raise TrajectoryError(f"{path}: cannot read ({err.strerror}); {fix}") from None
            if size != entries[step]["bytes"][rel]:
                raise TrajectoryError(
                    f"{path}: {size} bytes, {MANIFEST} says {entries[step]['bytes'][rel]} "
                    f"(truncated or replaced); {fix}")
        prev = t


def discard_if_empty(out: str, created: bool, writer) -> bool:
    """Remove the cube at ``out`` if this run ``created`` it and failed before any step was done.

    Leaves the disk as it was (and a rerun with other settings, e.g. ``--nonfinite skip``,
    free to start afresh). Only when no other replay holds any of its chunks.
    """
    if not created or "://" in out:
        return False
    try:
        with CubeLock(out) as lock, lock.exclusive():
            if not lock.take_whole() or writer.done_mask().any():
                return False
            shutil.rmtree(out)
    except Exception:  # the cube stays as it is: valid, empty, resumable
        return False
    return True


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_failure(out: str, err: BaseException, writer, gone: bool) -> LCAError | None:
    """A one-line CubeError for an OSError that hit the cube (disk full, quota, permissions).

    Other errors (a bad file in the store, non-finite values, Ctrl-C) pass through unchanged.
    """
    if not isinstance(err, OSError) or isinstance(err, LCAError):
        return None
    inside = str(getattr(err, "filename", None) or "").startswith(out.rstrip("/"))
    if err.errno not in _NO_SPACE and not inside:
        return None
    what = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
        (err.strerror or type(err).__name__).lower()
    if err.errno == errno.EFBIG:
        what = "no space left (file size limit reached)"
    if gone or writer is None:
        kept = "nothing was written (the new cube was removed)"
    else:
        try:
            done = writer.done_mask()
            kept = f"the {int(done.sum())}/{done.size} steps done so far are kept and valid"
        except Exception:
            kept = "the steps marked done so far are kept"
    fix = "free some space (or pass another --cube)" if what.startswith("no space") else \
        "fix the cube's permissions (or pass another --cube)"
    return CubeError(f"cube {out}: {what} while writing it ({err.strerror or err}); {kept}: "
                     f"{fix} and run the same command again to finish")
