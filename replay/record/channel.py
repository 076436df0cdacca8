"""The Recorder's end of its writer process (:mod:`replay.record.writer`).

Starts the process, shares the snapshot buffers with it (a memfd, or an unlinked temporary file
where there is no memfd), hands it one JSON line per recorded step, and reads what it reports:
buffers handed back and the newest step in manifest.json from a control block in the shared
memory (no system call per step), errors from its stdout.
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import tempfile
import time

import torch

from replay.store.codec import DTYPE_NAMES
from replay.errors import RecorderError
from replay.record.writer import CONTROL_BYTES
from replay.record.snapshot import Buffers, buffers
from replay.store.flat_layout import FlatLayout

__all__ = ["WriterProcess"]

# Not `-m`: that puts the working directory first on sys.path, where a user's own `replay`
# package would shadow this one. The process imports this very copy of the package.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_START = (f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
          "from replay.record.writer import main; sys.exit(main())")


class WriterProcess:
    """The Recorder's end of the writer process: shared snapshot buffers, pipes, its reports."""

    def __init__(self, root: str, header: dict, mode: str, keyframe_every: int, slots: int,
                 params: FlatLayout, state: FlatLayout, commit_interval: float = 1.0):
        groups_p, end = _groups(params, 0)
        groups_s, end = _groups(state, end)
        set_bytes = _align(end)
        fd = _shared_memory(CONTROL_BYTES + slots * set_bytes)
        try:
            self._mem = mmap.mmap(fd, CONTROL_BYTES + slots * set_bytes)
            self.buffers = [(self._buffers(params, groups_p, CONTROL_BYTES + s * set_bytes),
                             self._buffers(state, groups_s, CONTROL_BYTES + s * set_bytes))
                            for s in range(slots)]
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _START], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, pass_fds=(fd,))
        finally:
            os.close(fd)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.free = list(range(slots))[::-1]
        self._sent: collections.deque[int] = collections.deque()   # slots in the order sent
        self._freed = 0
        self.error: str | None = None
        self.failed_step: int | None = None
        self.last_complete: int | None = None
        self.ended = self.closing = self.ready = False
        self._pending = b""
        try:
            self.send({"root": root, "header": header, "mode": mode,
                       "keyframe_every": keyframe_every, "commit_interval": commit_interval,
                       "slots": slots, "set_bytes": set_bytes,
                       "fd": fd, "params": groups_p, "state": groups_s}, None, None)
        except RecorderError:      # it exited at once: reported just below
            pass
        # Wait until the process runs: a writer that cannot start fails here, not mid-training.
        deadline = time.monotonic() + 120
        while not self.ready and not self.ended and time.monotonic() < deadline:
            self.poll(timeout=0.1)
        if not self.ready:
            self.proc.kill()
            raise RecorderError(
                f"the Recorder's writer process ({sys.executable}, replay.record.writer) did "
                f"not start (exit status {self.proc.wait()}); its error is printed above")

    def _buffers(self, layout: FlatLayout, groups: list, base: int) -> Buffers:
        flats = {}
        for (_, start, n, _), torch_dtype in zip(groups, layout.groups):
            nbytes = n * torch_dtype.itemsize
            flats[torch_dtype] = (torch.frombuffer(self._mem, dtype=torch.uint8, count=nbytes,
                                                   offset=base + start).view(torch_dtype)
                                  if nbytes else torch.empty(0, dtype=torch_dtype))
        return buffers(layout, flats)

    def send(self, message: dict | str, slot: int | None, on_failure) -> None:
        """One JSON line to the writer (``slot``: the buffer it hands over, if any)."""
        if not isinstance(message, str):
            message = json.dumps(message)
        try:
            data = memoryview((message + "\n").encode())
            while data:        # a line longer than the pipe's buffer may go out in parts
                data = data[os.write(self.proc.stdin.fileno(), data):]
            if slot is not None:
                self._sent.append(slot)
        except (BrokenPipeError, ValueError):
            self.poll()
            self.ended = True
            if on_failure is not None:
                on_failure()
            raise RecorderError("the background writer process could not be reached") from None

    def check(self) -> None:
        """Take in the writer's counters (no system call); read its pipe if it failed."""
        freed, complete, failed = struct.unpack_from("<3q", self._mem, 0)
        while self._freed < freed and self._sent:
            self.free.append(self._sent.popleft())
            self._freed += 1
        if complete:
            self.last_complete = complete - 1
        if failed:
            self.poll(timeout=5.0)

    def poll(self, timeout: float = 0.0) -> None:
        """Read the writer's messages so far (waiting up to ``timeout`` seconds for one)."""
        if self.ended:
            return
        fd = self.proc.stdout.fileno()
        if timeout and not select.select([fd], [], [], timeout)[0]:
            return
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                self.ended = True
                break
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "ready" in msg:
                self.ready = True
            elif "error" in msg and self.error is None:
                self.error, self.failed_step = f"{msg['type']}: {msg['error']}", msg["step"]

    def take_slot(self, check) -> int:
        """A free buffer set; waits while the writer is behind (all buffers queued)."""
        while not self.free:
            check()        # raises if the writer failed or ended
            if self.proc.poll() is not None:
                self.poll()
            self.poll(timeout=0.01)
            self.check()
        return self.free.pop()

    def close(self) -> None:
        """Let the writer finish every queued step, then wait for it to exit."""
        self.closing = True
        try:
            self.proc.stdin.write(b'{"op": "close"}\n')
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        while not self.ended:
            self.poll(timeout=1.0)
        self.proc.wait()
        self.check()


def _groups(layout: FlatLayout, offset: int) -> tuple[list, int]:
    """The writer's view of a layout: [dtype, byte offset, numel, [[name, a, b, shape]]]."""
    groups = []
    for dtype, names in layout.groups.items():
        offset = _align(offset)        # every flat buffer starts cache-line aligned
        members = [[n, layout.place[n][1], layout.place[n][2], list(layout.place[n][3])]
                   for n in names]
        groups.append([DTYPE_NAMES[dtype], offset, layout.size(dtype), members])
        offset += layout.size(dtype) * dtype.itemsize
    return groups, offset


def _align(offset: int) -> int:
    return -(-offset // 64) * 64


def _shared_memory(size: int) -> int:
    """A file descriptor of ``size`` bytes of memory that a child process can map."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("lca-recorder")   # close-on-exec: only the writer gets it
    else:      # no memfd (not Linux): an unlinked temporary file
        fd, path = tempfile.mkstemp(prefix="lca-recorder-")
        os.unlink(path)
    os.ftruncate(fd, size)
    return fd
