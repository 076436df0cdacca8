"""FileWriter: the writer process's whole-file writes, through O_DIRECT or the page cache."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

import numpy as np
import pytest

from replay.store.files import AlignedBuffer, BackgroundFiles, FileWriter


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


@pytest.mark.parametrize("digest", ["xxh3_128", None])
def test_files_are_hashed_with_the_named_algorithm(tmp_path, digest):
    import xxhash

    writer = SmallStage()
    for i, size in enumerate(SIZES):
        chunks = chunks_of(size, i)
        expected = b"".join(bytes(c) for c in chunks)
        hexd, n = writer.write(str(tmp_path / f"f{i}"), chunks, digest=digest)
        assert n == size and (tmp_path / f"f{i}").read_bytes() == expected
        assert hexd == (xxhash.xxh3_128(expected).hexdigest() if digest else "")


def filled(size: int, seed: int) -> AlignedBuffer:
    buf = AlignedBuffer(size)
    buf.mem[:size] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return buf


@pytest.mark.parametrize("direct", [True, False])
def test_buffers_are_written_as_files_of_their_length(tmp_path, direct):
    writer = FileWriter(direct=direct)
    for i, size in enumerate(SIZES):
        buf = filled(size, i)
        writer.write_buffer(str(tmp_path / f"f{i}"), buf, size)
        assert (tmp_path / f"f{i}").read_bytes() == buf.mem[:size]
    assert writer.direct is direct
    assert sorted(os.listdir(tmp_path)) == sorted(f"f{i}" for i in range(len(SIZES)))


def test_a_buffer_refused_by_o_direct_is_written_through_the_page_cache(tmp_path, monkeypatch):
    import replay.store.files as fw

    real_write_all = fw._write_all

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_write_all(fd, data)

    monkeypatch.setattr(fw, "_write_all", refusing_write)
    writer = FileWriter()
    buf = filled(3 * 4096 + 5, 1)
    writer.write_buffer(str(tmp_path / "f"), buf, 3 * 4096 + 5)
    assert (tmp_path / "f").read_bytes() == buf.mem[:3 * 4096 + 5] and writer.direct is False


def test_background_files_are_written_in_order_and_buffers_come_back(tmp_path):
    files = BackgroundFiles(FileWriter(), buffers=2, inline_below=5000)
    expected = {}
    for i, size in enumerate(SIZES * 3):
        buf = files.buffer()          # waits while both buffers are being written
        buf.ensure(size)
        data = np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8).tobytes()
        buf.mem[:size] = data
        # The same name again and again: the last one written must win, as in order.
        files.write(str(tmp_path / f"f{i % 4}"), buf, size)
        expected[f"f{i % 4}"] = data
    files.drain()
    assert {name: (tmp_path / name).read_bytes() for name in expected} == expected
    assert len(files._free) == 2 and files._busy == 0


def test_a_failed_background_write_is_raised_and_nothing_after_it_is_written(tmp_path):
    files = BackgroundFiles(FileWriter(), buffers=2, inline_below=0)
    buf = files.buffer()
    files.write(str(tmp_path / "missing" / "a"), buf, 10)       # no such directory
    with pytest.raises(FileNotFoundError):      # whether "b" was queued before it failed or not
        files.write(str(tmp_path / "b"), files.buffer(), 10)
        files.drain()
    with pytest.raises(FileNotFoundError):
        files.drain()
    with pytest.raises(FileNotFoundError):
        files.buffer()
    assert os.listdir(tmp_path) == []
