"""The Recorder's writer process: encodes, hashes and writes the store while training goes on.

A separate process, not a thread: the writer's few hundred Python-level calls per step would
otherwise compete with the training loop for the GIL, which slows every training step even
with a core to spare. The module imports numpy, xxhash and the torch-free parts of the package
only, so the process starts fast.

Started by :class:`replay.record.channel.WriterProcess`, which calls :func:`main` and talks to
it over pipes, one JSON object per line:

- stdin, first line: the configuration (store root, manifest header, mode, keyframe interval,
  buffer layout); then ``{"op": "step", "slot", "step", "loss", "lr", "time", "interval",
  "skipped", "interval_skipped"}`` (the last three optional)
  per recorded step and ``{"op": "close"}`` at the end (end of file counts as close).
- stdout: ``{"ready": true}`` once set up, ``{"error", "type", "step"}`` once if writing fails.

Snapshots travel through shared memory (a file descriptor inherited from the Recorder): a
control block of CONTROL_BYTES, then ``slots`` buffer sets of ``set_bytes`` each, every dtype
group at a fixed offset. The control block holds int64 counters that the Recorder reads
without a system call: buffers handed back (in the order they were sent: a buffer is free once
the step after it is written), the newest step in manifest.json plus one, and an error flag.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import signal
import sys
import time

import numpy as np

from replay.record.encoder import CHUNK, NUMPY, DeltaEncoder, bits, tensor_file
from replay.store.files import BackgroundFiles, FileWriter, default_digest, hexdigest
from replay.store.manifest import MANIFEST, ManifestWriter, file_name

CONTROL_BYTES = 64
FREED, COMPLETE, FAILED = 0, 1, 2      # int64 fields of the control block


class Layout:
    """Where each tensor lives in a buffer set: per dtype group a flat array, per tensor a span."""

    def __init__(self, groups: list, mem: mmap.mmap, slots: int, set_bytes: int):
        self.groups = groups          # [[dtype, byte offset, numel, [[name, start, end, shape]]]]
        self._starts = {g[0]: np.array([m[1] for m in g[3]], dtype=np.int64) for g in groups}
        self.flats = [{g[0]: np.frombuffer(mem, NUMPY[g[0]], g[2],
                                           CONTROL_BYTES + s * set_bytes + g[1])
                       if g[2] else np.empty(0, NUMPY[g[0]]) for g in groups}
                      for s in range(slots)]

    def tensors(self, slot: int, names: set | None = None) -> dict:
        out = {}
        for dtype, _, _, members in self.groups:
            flat = self.flats[slot][dtype]
            for name, a, b, shape in members:
                if names is None or name in names:
                    out[name] = (flat[a:b], dtype, shape)
        return out

    def changed(self, old: int, new: int) -> set:
        """Names of the tensors whose bits differ between two slots (compared block by block:
        no temporaries the size of the state, which may hold a whole frozen model)."""
        hit = set()
        mask = np.empty(CHUNK, np.bool_)
        for dtype, _, n, members in self.groups:
            a_flat, b_flat = bits(self.flats[old][dtype]), bits(self.flats[new][dtype])
            for a in range(0, n, CHUNK):
                m = mask[:min(CHUNK, n - a)]
                np.not_equal(a_flat[a:a + m.size], b_flat[a:a + m.size], out=m)
                if m.any():
                    where = np.flatnonzero(m) + a
                    which = np.searchsorted(self._starts[dtype], where, "right") - 1
                    hit.update(members[i][0] for i in np.unique(which))
        return hit


class Writer:
    """Writes keyframe/delta/state files for each step and commits them to manifest.json.

    A commit fsyncs the directories of the files written since the last one, then replaces
    the manifest: a step counts (for readers, and after a crash) once a commit has listed it.
    Commits come at most every ``commit_interval`` seconds, and as soon as that has passed when
    training pauses. Replacing the manifest after every step instead cost more than everything
    else the writer does once a run is long: the manifest grows by a few hundred bytes per
    step, and writing a new file means fresh page-cache pages, kernel time that grows with it.

    Each file is assembled in a page-aligned buffer (a delta encoded in place, see
    :class:`~replay.record.encoder.DeltaEncoder`), hashed, and handed to a background thread
    that writes it with one aligned write while the next one is encoded: for a large model the
    device then works while the CPU does. A commit first waits for those writes.
    """

    # A long run's manifest may take at most this share of the writer's time, whatever the
    # commit interval.
    MANIFEST_SHARE = 0.1

    def __init__(self, cfg: dict, mem: mmap.mmap):
        self.root, self.mode, self.keyframe_every = cfg["root"], cfg["mode"], cfg["keyframe_every"]
        self.interval = cfg["commit_interval"]
        self.params = Layout(cfg["params"], mem, cfg["slots"], cfg["set_bytes"])
        self.state = Layout(cfg["state"], mem, cfg["slots"], cfg["set_bytes"])
        self.manifest = ManifestWriter(cfg["header"])
        self.control = np.frombuffer(mem, np.int64, 3, 0)
        self.prev: dict | None = None
        self.last_key: int | None = None
        self.unwritten: int | None = None
        self.folders: set[str] = set()        # written into since the last commit
        self.manifest_time, self.manifest_cost = -float("inf"), 0.0
        self.files = FileWriter()
        self.out = BackgroundFiles(self.files)
        self.digest = default_digest()
        self.deltas = DeltaEncoder([(g[0], g[2]) for g in cfg["params"]], ("step", "next"))

    def emit(self, role: str, step: int, buf, length: int, entry: dict) -> None:
        """Hash the file assembled in ``buf`` and queue it; list it in ``entry``."""
        rel = file_name(role, step)
        view = memoryview(buf.mem)[:length]
        try:
            digest = hexdigest(self.digest, view)
        finally:
            view.release()
        # The file is fsynced before the next commit, its directory entry at that commit.
        self.out.write(os.path.join(self.root, rel), buf, length)
        self.folders.add(os.path.dirname(rel))
        entry["files"][role] = rel
        entry.setdefault(self.digest, {})[rel] = digest
        entry["bytes"][rel] = length

    def write(self, role: str, step: int, arrays: dict, entry: dict, **meta) -> None:
        buf = self.out.buffer()
        length = tensor_file(buf, arrays, {"format": "lca-replay-2", "step": str(step),
                                           **{k: str(v) for k, v in meta.items()}})
        self.emit(role, step, buf, length, entry)

    def record(self, msg: dict) -> None:
        t, slot, prev = msg["step"], msg["slot"], self.prev
        keyframe = (self.mode == "full" or self.last_key is None
                    or t - self.last_key >= self.keyframe_every)
        if prev is not None and self.mode == "delta":
            # Also written when t gets a keyframe: `lca verify` then checks that the deltas
            # rebuild each keyframe bit for bit (costs 1/keyframe_every of the store).
            buf = self.out.buffer()
            length = self.deltas.fill(buf, self.params.flats[prev["slot"]],
                                      self.params.flats[slot],
                                      {"step": str(prev["step"]), "next": str(t)})
            self.emit("delta", prev["step"], buf, length, self.manifest.last)
            self.manifest.refresh_last()
        entry = {"step": t, "files": {}, self.digest: {}, "bytes": {}}
        if keyframe:
            self.write("keyframe", t, self.params.tensors(slot), entry)
            state = self.state.tensors(slot)
        else:   # only the state tensors whose bytes changed since the previous recorded step
            state = self.state.tensors(slot, self.state.changed(prev["slot"], slot))
        if state:
            self.write("state", t, state, entry, full=int(keyframe))
        entry["loss"], entry["lr"], entry["time"] = msg["loss"], msg.get("lr"), msg["time"]
        if msg.get("skipped"):
            entry["skipped"] = True
        if msg.get("interval") is not None:
            entry["interval_losses"] = msg["interval"]
        if msg.get("interval_skipped"):
            entry["interval_skipped"] = msg["interval_skipped"]
        self.manifest.append(entry)
        self.unwritten = t
        if self.commit_wait() == 0.0:
            self.commit()
        if prev is not None:
            self.control[FREED] += 1
        self.prev = msg
        if keyframe:
            self.last_key = t

    def commit_wait(self) -> float | None:
        """Seconds until the uncommitted steps are due (0: now), None when there are none."""
        if self.unwritten is None:
            return None
        due = self.manifest_time + max(self.interval, self.manifest_cost / self.MANIFEST_SHARE)
        return max(0.0, due - time.monotonic())

    def commit(self) -> None:
        if self.unwritten is None:
            return
        start = time.monotonic()
        self.out.drain()       # a failed write raises here: nothing after it gets committed
        for folder in sorted(self.folders):
            fd = os.open(os.path.join(self.root, folder), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.folders.clear()
        # No directory fsync for the manifest itself: if a power loss undoes this rename, the
        # previous manifest is still whole and consistent, only the newest steps are lost.
        self.files.write(os.path.join(self.root, MANIFEST), self.manifest.chunks(), digest=None)
        self.control[COMPLETE] = self.unwritten + 1
        self.unwritten = None
        self.manifest_time = time.monotonic()
        self.manifest_cost = self.manifest_time - start


def main() -> int:
    # Ctrl-C reaches the whole process group: the Recorder decides when writing stops, and
    # after the training process dies (end of file on stdin) the queued steps are still written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: where it has to share a core with training, training should win. When
    # the writer falls behind, training waits for a free buffer, which gives the writer the core.
    try:
        os.nice(10)
    except OSError:
        pass
    out_fd = sys.stdout.fileno()
    sys.stdout = sys.stderr            # nothing else may write into the message pipe

    def send(obj: dict) -> None:
        os.write(out_fd, (json.dumps(obj) + "\n").encode())

    pipe = Input(sys.stdin.fileno())
    cfg = next(pipe.messages())
    mem = mmap.mmap(cfg["fd"], CONTROL_BYTES + cfg["slots"] * cfg["set_bytes"])
    writer = Writer(cfg, mem)
    send({"ready": True})
    step = None
    try:
        for msg in pipe.messages(writer.commit_wait):
            if msg is None:            # training paused with steps not yet committed
                writer.commit()
                continue
            if msg["op"] == "close":
                break
            step = msg["step"]
            writer.record(msg)
        writer.commit()
    except BaseException as err:       # reported to the training process as RecorderError
        send({"error": str(err), "type": type(err).__name__, "step": step})
        writer.control[FAILED] = 1
        try:                           # the steps completed before the failure stay readable
            writer.commit()
        except BaseException:
            pass
        for msg in pipe.messages():    # hand every buffer back: training never blocks
            if msg["op"] == "close":
                break
            writer.control[FREED] += 1
        return 1
    return 0


class Input:
    """The JSON messages of one line each arriving on a pipe."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, bytearray()

    def messages(self, timeout=None):
        """Each message in turn until end of file; None whenever ``timeout()`` seconds (when
        it gives a number) pass without one."""
        while True:
            while b"\n" not in self.buf:
                wait = timeout() if timeout is not None else None
                if wait is not None and not select.select([self.fd], [], [], wait)[0]:
                    yield None
                    continue
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    return
                self.buf += chunk
            end = self.buf.index(b"\n")
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            yield json.loads(line)


if __name__ == "__main__":
    sys.exit(main())
