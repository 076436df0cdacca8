"""Who writes which steps of a cube: POSIX record locks on one small file inside the cube.

Two replays must never write one zarr chunk at the same time (a region write reads, modifies
and rewrites the whole chunk, so one would silently undo the other), yet SLURM array tasks
replay disjoint slices of one cube at once. So the lock is per step chunk: byte ``1 + c`` of
``<cube>/done/.lca-replay.lock`` is held while a replay owns chunk c. It is never waited for: a
replay that needs a chunk held by another process refuses to start
(:class:`~replay.errors.CubeBusyError`, naming the steps and the process). Byte 0 guards the
short sections that touch the whole cube (finalising per-parameter LCA, discarding an empty
cube) and is waited for.

Why ``fcntl`` record locks rather than a lock file created with ``O_EXCL``: the kernel drops
them when the holding process dies, SIGKILL included, so there is never a stale lock to remove
by hand, and one file holds any number of them. They work on local file systems and on NFS (v3
through lockd, v4 natively; the server drops a crashed client's locks when its lease expires).
Where a file system refuses them (e.g. Lustre mounted without ``-o flock``) the replay warns and
runs unlocked. Cubes at URLs (object stores) are not locked: give concurrent replays disjoint
``--steps`` slices of whole chunks, as ``lca submit`` does.

POSIX locks belong to a process, not to a descriptor, and closing *any* descriptor of the file
drops all of them; so a process opens the lock file once, keeps it open while anything is held,
and tracks which chunks its own threads hold (its own locks never conflict with each other).
The file sits in the ``done`` array's directory, which zarr never lists: it appears with a
cube's first replay and goes away with the cube.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from replay.errors import CubeBusyError

LOCK_FILE = os.path.join("done", ".lca-replay.lock")
_BUSY = (errno.EACCES, errno.EAGAIN)


class LockWarning(RuntimeWarning):
    """The cube's file system refuses record locks: the replay runs unlocked."""


class _Shared:
    """One open lock file of this process: its descriptor and what this process holds."""

    def __init__(self, fd: int, key: tuple[int, int]):
        self.fd, self.key = fd, key
        self.users = 0
        self.held: set[int] = set()      # chunks held by any guard of this process
        self.whole = False               # one guard took every chunk (to discard the cube)
        self.meta = threading.Lock()     # byte 0 between this process's threads


_REGISTRY = threading.Lock()
_OPEN: dict[tuple[int, int], _Shared] = {}


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Sorted chunk indices as maximal [a, b) runs (one lock call per run)."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][1] == c:
            out[-1] = (out[-1][0], c + 1)
        else:
            out.append((c, c + 1))
    return out


def _holder(fd: int, start: int, length: int) -> tuple[int, int, int] | None:
    """(first byte, length, pid) of a lock of another process over the range, or None."""
    try:
        # struct flock on Linux (x86-64, arm64): short type, short whence, off_t start,
        # off_t len, pid_t pid, padded to 32 bytes.
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        kind, _, first, size, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except (OSError, struct.error, ValueError):
        return None
    return None if kind == fcntl.F_UNLCK else (first, size, pid)


class CubeLock:
    """The chunks of one cube that one replay owns. Use as a context manager::

        with CubeLock(cube, label) as lock:
            lock.claim(chunks)           # CubeBusyError if another process holds one of them
            with lock.exclusive():       # whole-cube sections (waits for other processes)
                ...

    ``label(c0, c1)`` describes chunks [c0, c1) for messages (e.g. ``"steps 0..19"``).
    A no-op for URLs and on file systems without record locks (with a :class:`LockWarning`).
    """

    def __init__(self, cube: str, label: Callable[[int, int], str] | None = None):
        self.cube = cube
        self.file = None if "://" in cube else os.path.join(cube, LOCK_FILE)
        self.label = label or (lambda a, b: f"step chunks {a}..{b - 1}")
        self._shared: _Shared | None = None
        self._mine: set[int] = set()
        self._whole = False

    # -- the shared descriptor --------------------------------------------------------------
    def _open(self) -> _Shared | None:
        if self._shared is not None or self.file is None:
            return self._shared
        with _REGISTRY:
            try:
                st = os.stat(self.file)
                shared = _OPEN.get((st.st_dev, st.st_ino))
                if shared is None:
                    fd = os.open(self.file, os.O_RDWR)
            except FileNotFoundError:
                shared = None
                try:
                    fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as err:
                    return self._unlocked(err)
            except OSError as err:
                return self._unlocked(err)
            if shared is None:
                st = os.fstat(fd)
                shared = _OPEN.setdefault((st.st_dev, st.st_ino), _Shared(fd, (st.st_dev, st.st_ino)))
                if shared.fd != fd:      # cannot happen under _REGISTRY; never close a used one
                    os.close(fd)
            shared.users += 1
            self._shared = shared
        return shared

    def _unlocked(self, err: OSError) -> None:
        warnings.warn(f"cannot lock cube {self.cube} ({err.strerror or err}); replaying it "
                      "unlocked: make sure no other replay writes the same steps",
                      LockWarning, stacklevel=3)
        self.file = None
        return None

    def __enter__(self) -> CubeLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- chunk claims -----------------------------------------------------------------------
    def claim(self, chunks: Iterable[int]) -> None:
        """Own ``chunks`` until :meth:`release`; CubeBusyError names the first one held."""
        want = sorted(set(chunks) - self._mine)
        if not want:
            return
        shared = self._open()
        if shared is None:
            self._mine.update(want)
            return
        with _REGISTRY:
            clash = sorted(shared.held.intersection(want))
            if shared.whole or clash:
                c = clash[0] if clash else want[0]
                raise self._busy(c, c + 1, os.getpid(), same_process=True)
            got: list[tuple[int, int]] = []
            try:
                for a, b in _runs(want):
                    try:
                        fcntl.lockf(shared.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, b - a, 1 + a)
                    except OSError as err:
                        if err.errno not in _BUSY:
                            self._give_up(err, got)
                            self._mine.update(want)
                            return
                        who = _holder(shared.fd, 1 + a, b - a)
                        if who is None:
                            raise self._busy(a, b, None) from None
                        first, size, pid = who
                        c0 = max(a, first - 1)
                        c1 = b if size == 0 else min(b, first - 1 + size)
                        raise self._busy(c0, c1, pid) from None
                    got.append((a, b))
            except BaseException:
                for a, b in got:
                    fcntl.lockf(shared.fd, fcntl.LOCK_UN, b - a, 1 + a)
                raise
            shared.held.update(want)
            self._mine.update(want)

    def _give_up(self, err: OSError, got: list[tuple[int, int]]) -> None:
        # The file system has no record locks (ENOLCK, EOPNOTSUPP, ...): go on without them.
        for a, b in got:
            fcntl.lockf(self._shared.fd, fcntl.LOCK_UN, b - a, 1 + a)
        self._drop()
        self._unlocked(err)

    def _busy(self, c0: int, c1: int, pid: int | None, same_process: bool = False) -> CubeBusyError:
        who = "this process" if same_process else \
            "another process" + (f" (pid {pid})" if pid and pid > 0 else "")
        return CubeBusyError(
            f"cube {self.cube}: {self.label(c0, c1)} are being replayed by {who} right now; "
            "wait for it to finish and run again to fill what is left, or replay other steps "
            "(--steps A:B; slices of whole chunks may run at the same time)")

    @contextmanager
    def exclusive(self):
        """Hold byte 0 (waiting for other processes and threads) for a whole-cube section."""
        shared = self._open()
        if shared is None:
            yield
            return
        with shared.meta:
            try:
                fcntl.lockf(shared.fd, fcntl.LOCK_EX, 1, 0)
            except OSError as err:
                if err.errno in _BUSY:
                    raise
                yield   # no record locks on this file system
                return
            try:
                yield
            finally:
                fcntl.lockf(shared.fd, fcntl.LOCK_UN, 1, 0)

    def take_whole(self) -> bool:
        """Own every chunk if nobody else holds any (before discarding the cube); else False."""
        shared = self._open()
        if shared is None:
            return self.file is None and "://" not in self.cube
        with _REGISTRY:
            if shared.whole or shared.held - self._mine:
                return False
            try:
                fcntl.lockf(shared.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 1)
            except OSError:
                return False
            shared.whole = self._whole = True
            return True

    def release(self) -> None:
        """Give back everything this guard holds (idempotent)."""
        if self._shared is None:
            self._mine.clear()
            return
        with _REGISTRY:
            self._drop()

    def _drop(self) -> None:
        shared = self._shared
        if self._whole:
            fcntl.lockf(shared.fd, fcntl.LOCK_UN, 0, 1)
            shared.whole = self._whole = False
        else:
            mine = sorted(self._mine & shared.held)
            for a, b in _runs(mine):
                fcntl.lockf(shared.fd, fcntl.LOCK_UN, b - a, 1 + a)
        shared.held -= self._mine
        self._mine.clear()
        shared.users -= 1
        if shared.users == 0:
            # Last user in this process: closing drops any lock left, which is none by now.
            del _OPEN[shared.key]
            os.close(shared.fd)
        self._shared = None
