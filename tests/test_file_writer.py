"""FileWriter: the writer process's whole-file writes, through O_DIRECT or the page cache."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import numpy as np
import pytest

from replay.store.files import FileWriter


class SmallStage(FileWriter):
    STAGE = 3 * FileWriter.BLOCK       # staging boundaries at a few KB, not 8 MB


SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096 - 1, 3 * 4096, 3 * 4096 + 5, 7 * 4096 + 123]


def chunks_of(size: int, seed: int) -> list:
    """Random bytes of ``size`` split at random places, as bytes and "B" memoryviews."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    cuts = sorted(rng.integers(0, size + 1, 3).tolist()) if size else []
    parts = np.split(data, cuts)
    return [p.tobytes() if i % 2 else memoryview(p).cast("B") for i, p in enumerate(parts)]


@pytest.mark.parametrize("cls", [FileWriter, SmallStage])
@pytest.mark.parametrize("direct", [True, False])
def test_files_hold_exactly_the_chunks_with_their_hash(tmp_path, cls, direct):
    writer = cls(direct=direct)
    for i, size in enumerate(SIZES):
        chunks = chunks_of(size, i)
        expected = b"".join(bytes(c) for c in chunks)
        digest, n = writer.write(str(tmp_path / f"f{i}"), chunks)
        assert (tmp_path / f"f{i}").read_bytes() == expected
        assert (digest, n) == (hashlib.sha256(expected).hexdigest(), size)
    assert sorted(os.listdir(tmp_path)) == sorted(f"f{i}" for i in range(len(SIZES)))


# No file system at hand refuses O_DIRECT (this kernel's tmpfs takes it), so the refusals are
# injected where the file system would give them: at open, or at the first aligned write.
@pytest.mark.parametrize("where", ["open", "write"])
def test_a_file_system_refusing_o_direct_gets_ordinary_writes(tmp_path, monkeypatch, where):
    import replay.store.files as fw

    if where == "open":
        real_open = os.open

        def refusing_open(path, flags, *args):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(fw.os, "open", refusing_open)
    else:
        real_write_all = fw._write_all

        def refusing_write(fd, data):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            real_write_all(fd, data)

        monkeypatch.setattr(fw, "_write_all", refusing_write)
    writer = SmallStage()
    for i, size in enumerate(SIZES):
        chunks = chunks_of(size, i)
        digest, n = writer.write(str(tmp_path / f"f{i}"), chunks)
        expected = b"".join(bytes(c) for c in chunks)
        assert (tmp_path / f"f{i}").read_bytes() == expected
        assert digest == hashlib.sha256(expected).hexdigest() and n == size
    assert writer.direct is False
    assert len(os.listdir(tmp_path)) == len(SIZES)


def test_a_full_disk_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    import replay.store.files as fw

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fw, "_write_all", full)
    writer = FileWriter()
    with pytest.raises(OSError, match="No space left"):
        writer.write(str(tmp_path / "f"), chunks_of(10000, 0))
    assert os.listdir(tmp_path) == []
