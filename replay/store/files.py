"""Whole-file writes for the Recorder's writer process, past the page cache where possible, and
the hashes that the manifest records for each file.

Torch-free (the writer process imports numpy, the standard library and xxhash only).
"""

from __future__ import annotations

import collections
import errno
import hashlib
import mmap
import os
import tempfile
import threading

__all__ = ["DIGESTS", "AlignedBuffer", "BackgroundFiles", "FileWriter", "default_digest",
           "hexdigest"]

# Hash algorithms a manifest may name for a file (the key of its step entry's digest table).
# sha256 runs at about the speed of a disk (1 GB/s on one core) and would halve the writer's
# throughput; xxh3_128 runs at memory speed and detects corruption as well, which is all the
# digest is for (whoever can rewrite a file can rewrite the manifest too).
DIGESTS = ("sha256", "xxh3_128")


def default_digest() -> str:
    """The hash the writer records: xxh3_128 where the xxhash package is installed."""
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def new_hash(name: str):
    """A fresh hashlib-style object (``update``, ``hexdigest``) of algorithm ``name``."""
    if name == "sha256":
        return hashlib.sha256()
    if name == "xxh3_128":
        import xxhash   # an ImportError names the package to install

        return xxhash.xxh3_128()
    raise ValueError(f"unknown hash algorithm {name!r} (known: {', '.join(DIGESTS)})")


def hexdigest(name: str, data) -> str:
    """Hex digest of ``data`` (bytes-like) with algorithm ``name``."""
    h = new_hash(name)
    h.update(data)
    return h.hexdigest()


class AlignedBuffer:
    """A page-aligned, growable memory buffer for one file at a time (``O_DIRECT`` reads the
    device's data straight from it)."""

    def __init__(self, size: int = 0):
        self.mem = _anonymous(max(size, 1))

    def __len__(self) -> int:
        return len(self.mem)

    def ensure(self, size: int, keep: int = 0) -> None:
        """Room for ``size`` bytes plus the padding of the last block; the first ``keep`` bytes
        survive a move to a larger buffer. Grows with some headroom, so that files of about one
        size (a delta with more or fewer corrections, the keyframe) fit without another move."""
        if size > len(self.mem):
            bigger = _anonymous(max(size + size // 16, len(self.mem) + len(self.mem) // 2))
            if keep:
                with memoryview(bigger) as dst, memoryview(self.mem) as src:
                    dst[:keep] = src[:keep]
            self.mem.close()
            self.mem = bigger


class FileWriter:
    """Writes whole files atomically (temporary name, fsync, rename), bypassing the page cache
    where the file system allows it (``O_DIRECT``).

    Copying into the page cache is a large share of the writer's CPU time: each step's file
    needs fresh cache pages. With ``O_DIRECT`` the device reads the file from page-aligned
    memory: an :class:`AlignedBuffer` the file was assembled in, or a reused staging buffer of
    at most STAGE bytes for files given as chunks; the last block is padded for the write and
    cut back with ``ftruncate``. File systems that refuse it (some network
    ones) get ordinary writes from then on.
    """

    BLOCK = 4096
    STAGE = 8 << 20
    _REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.stage: mmap.mmap | None = None

    def write(self, target: str, chunks: list, digest: str | None = "sha256") -> tuple[str, int]:
        """Write ``chunks`` (bytes, or memoryviews of format "B") as ``target``; the hex digest
        of its bytes with algorithm ``digest`` ("" for None) and its size."""
        hashed: list = []
        size = self._atomic(target, lambda fd, tmp: self._chunks(fd, tmp, chunks, digest, hashed))
        return (hashed[0].hexdigest() if digest else ""), size

    def write_buffer(self, target: str, buf: AlignedBuffer, length: int) -> None:
        """Write the first ``length`` bytes of ``buf`` as ``target``, in one aligned write."""
        self._atomic(target, lambda fd, tmp: self._from_buffer(fd, tmp, buf, length))

    def _atomic(self, target: str, fill) -> int:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(target))
        try:
            size = fill(fd, tmp)
            os.ftruncate(fd, size)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, target)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return size

    def _from_buffer(self, fd: int, tmp: str, buf: AlignedBuffer, length: int) -> int:
        view = memoryview(buf.mem)
        try:
            if self.direct:
                padded = _round_up(length, self.BLOCK)
                if self._direct(tmp, [view[:padded]], None, staged=False):
                    return length
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, view[:length])
        finally:
            view.release()
        return length

    def _chunks(self, fd: int, tmp: str, chunks: list, digest: str | None, hashed: list) -> int:
        size = sum(len(c) for c in chunks)
        h = new_hash(digest) if digest else None
        if self.direct and self._direct(tmp, chunks, h, staged=True):
            hashed.append(h)
            return size
        h = new_hash(digest) if digest else None   # a refused attempt may have hashed a part
        hashed.append(h)
        os.lseek(fd, 0, os.SEEK_SET)
        for chunk in chunks:
            if h is not None:
                h.update(chunk)
            _write_all(fd, memoryview(chunk))
        return size

    def _direct(self, path: str, chunks: list, h, staged: bool) -> bool:
        """Written through ``O_DIRECT`` (False where the file system refuses it): ``chunks``
        copied through the staging buffer, or (``staged=False``) one aligned chunk as it is."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as err:
            if err.errno not in self._REFUSED:
                raise
            self.direct = False
            return False
        try:
            if staged:
                self._staged(fd, chunks, h)
            else:
                _write_all(fd, chunks[0])
        except OSError as err:
            if err.errno not in self._REFUSED:
                raise
            self.direct = False          # e.g. blocks larger than BLOCK: write it again
            return False
        finally:
            os.close(fd)
        return True

    def _staged(self, fd: int, chunks: list, h) -> None:
        if self.stage is None:
            self.stage = mmap.mmap(-1, self.STAGE)      # page-aligned
        stage = memoryview(self.stage)
        fill = 0
        try:
            for chunk in chunks:
                if h is not None:
                    h.update(chunk)
                data = memoryview(chunk)
                while data:
                    n = min(len(data), self.STAGE - fill)
                    stage[fill:fill + n] = data[:n]
                    fill, data = fill + n, data[n:]
                    if fill == self.STAGE:
                        _write_all(fd, stage)
                        fill = 0
            if fill:
                padded = _round_up(fill, self.BLOCK)
                stage[fill:padded] = bytes(padded - fill)
                _write_all(fd, stage[:padded])
        finally:
            stage.release()


class BackgroundFiles:
    """Files written from :class:`AlignedBuffer` s by one background thread, in order, while the
    caller prepares the next one: writing to the device then overlaps the encoding.

    :meth:`buffer` hands out a free buffer (waiting while all ``buffers`` are being written);
    :meth:`write` queues one, which is free again once written. Files under ``inline_below``
    bytes are written at once instead (a thread hand-off costs more than they do). A failed
    write is raised by the next :meth:`buffer`, :meth:`write` or :meth:`drain`, and every one
    after it: nothing queued after a failure is written.
    """

    def __init__(self, files: FileWriter, buffers: int = 2, inline_below: int = 4 << 20):
        self.files, self.inline_below = files, inline_below
        self._free = [AlignedBuffer() for _ in range(buffers)]
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._busy = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def buffer(self) -> AlignedBuffer:
        with self._cv:
            while not self._free and self._error is None:
                self._cv.wait()
            self._raise()
            return self._free.pop()

    def write(self, target: str, buf: AlignedBuffer, length: int) -> None:
        if length < self.inline_below:
            try:
                self._raise()
                self.files.write_buffer(target, buf, length)
            finally:
                with self._cv:
                    self._free.append(buf)
            return
        with self._cv:
            self._raise()
            self._queue.append((target, buf, length))
            self._busy += 1
            self._cv.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lca-writer-io", daemon=True)
            self._thread.start()

    def drain(self) -> None:
        """Wait until every queued file is written; raises a failed write."""
        with self._cv:
            while self._busy and self._error is None:
                self._cv.wait()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                target, buf, length = self._queue.popleft()
                failed = self._error is not None
            error = None
            if not failed:
                try:
                    self.files.write_buffer(target, buf, length)
                except BaseException as err:        # handed to the caller's thread
                    error = err
            with self._cv:
                if error is not None and self._error is None:
                    self._error = error
                self._free.append(buf)
                self._busy -= 1
                self._cv.notify_all()


def _anonymous(size: int) -> mmap.mmap:
    """Private page-aligned memory of ``size`` bytes rounded up to whole blocks, faulted in at
    once (one system call instead of a page fault per 4 KiB when first written)."""
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, _round_up(size, FileWriter.BLOCK), flags=flags)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]
