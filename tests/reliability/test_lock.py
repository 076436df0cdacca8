"""replay/lock.py: per-chunk record locks, refused across processes and threads, gone with a
killed holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from replay.errors import CubeBusyError
from replay.cube.lock import CubeLock
from tests.reliability.helpers import ROOT

HOLD = """
import sys, time
from replay.cube.lock import CubeLock
guard = CubeLock(sys.argv[1]).__enter__()
guard.claim([0, 1, 5])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def cube(tmp_path):
    (tmp_path / "c.zarr" / "done").mkdir(parents=True)
    return str(tmp_path / "c.zarr")


def label(c0, c1):
    return f"steps {2 * c0}..{2 * c1 - 1}"


def test_claims_in_one_process(cube):
    with CubeLock(cube, label) as a, CubeLock(cube, label) as b:
        a.claim([0, 1, 2])
        with pytest.raises(CubeBusyError, match=r"^cube .*c\.zarr: steps 4\.\.5 are being "
                                                r"replayed by this process right now; wait"):
            b.claim([2, 3])
        b.claim([3, 4])        # disjoint chunks: fine (job-array slices)
        assert not b.take_whole()
        a.release()
        b.claim([0, 1, 2])     # released by a
    with CubeLock(cube, label) as c:
        assert c.take_whole()  # nobody holds anything now
    assert os.path.exists(os.path.join(cube, "done", ".lca-replay.lock"))


def test_another_process_and_its_death(cube):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, cube], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "held", proc.stderr.read()
        with CubeLock(cube, label) as guard:
            with pytest.raises(CubeBusyError, match=rf"steps 2\.\.3 are being replayed by "
                                                    rf"another process \(pid {proc.pid}\)"):
                guard.claim([1, 2])
            with pytest.raises(CubeBusyError, match=r"steps 10\.\.11 are being replayed"):
                guard.claim([3, 4, 5, 6])
            guard.claim([2, 3, 4])
            assert not guard.take_whole()
            with guard.exclusive():  # byte 0 is not a chunk: free
                pass
        proc.send_signal(signal.SIGKILL)   # its locks die with it: nothing stale to remove
        proc.wait()
        with CubeLock(cube, label) as guard:
            guard.claim([0, 1, 5])
            assert guard.take_whole()
    finally:
        proc.kill()
        proc.wait()


def test_urls_are_not_locked():
    with CubeLock("memory://x/c.zarr") as a, CubeLock("memory://x/c.zarr") as b:
        a.claim([0])
        b.claim([0])
        with a.exclusive():
            pass
