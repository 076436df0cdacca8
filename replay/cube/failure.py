"""What is done when a replay fails part-way: a cube that the failed run created and left
empty is removed again (the disk is as it was), and an OSError that hit the cube (disk full,
quota, permissions) becomes one line saying what is kept and what to do.
"""

from __future__ import annotations

import errno
import shutil

from replay.cube.lock import CubeLock
from replay.errors import CubeError, LCAError


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
