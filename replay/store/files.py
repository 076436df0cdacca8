"""Whole-file writes for the Recorder's writer process, past the page cache where possible.

Torch-free (the writer process imports numpy and the standard library only).
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import tempfile

__all__ = ["FileWriter"]


class FileWriter:
    """Writes whole files atomically (temporary name, fsync, rename), bypassing the page cache
    where the file system allows it (``O_DIRECT``).

    Copying into the page cache is a large share of the writer's CPU time: each step's file
    needs fresh cache pages. With ``O_DIRECT`` the device reads the file from a
    reused, page-aligned staging buffer of at most STAGE bytes; the last block is padded for
    the write and cut back with ``ftruncate``. File systems that refuse it (tmpfs, some network
    ones) get ordinary writes from then on.
    """

    BLOCK = 4096
    STAGE = 8 << 20
    _REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.stage: mmap.mmap | None = None

    def write(self, target: str, chunks: list) -> tuple[str, int]:
        """Write ``chunks`` (bytes, or memoryviews of format "B") as ``target``; its sha256
        (hex) and size."""
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(target))
        try:
            result = self._direct(tmp, chunks) if self.direct else None
            if result is None:
                result = self._buffered(fd, chunks)
            os.ftruncate(fd, result[1])
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
        return result

    @staticmethod
    def _buffered(fd: int, chunks: list) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        os.lseek(fd, 0, os.SEEK_SET)
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            _write_all(fd, memoryview(chunk))
        return digest.hexdigest(), size

    def _direct(self, path: str, chunks: list) -> tuple[str, int] | None:
        """Written through ``O_DIRECT``, or None where the file system refuses it."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as err:
            if err.errno not in self._REFUSED:
                raise
            self.direct = False
            return None
        if self.stage is None:
            self.stage = mmap.mmap(-1, self.STAGE)      # page-aligned
        stage = memoryview(self.stage)
        digest, size, fill = hashlib.sha256(), 0, 0
        try:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                data = memoryview(chunk)
                while data:
                    n = min(len(data), self.STAGE - fill)
                    stage[fill:fill + n] = data[:n]
                    fill, data = fill + n, data[n:]
                    if fill == self.STAGE:
                        _write_all(fd, stage)
                        fill = 0
            if fill:
                padded = -(-fill // self.BLOCK) * self.BLOCK
                stage[fill:padded] = bytes(padded - fill)
                _write_all(fd, stage[:padded])
        except OSError as err:
            if err.errno not in self._REFUSED:
                raise
            self.direct = False          # e.g. blocks larger than BLOCK: write it again
            return None
        finally:
            stage.release()
            os.close(fd)
        return digest.hexdigest(), size


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]
