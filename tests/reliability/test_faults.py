"""Faults during a replay or a recording: the run completes or resumes, and the cube equals an
uninterrupted run bit for bit (float64)."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import xarray as xr
import zarr

import replay
from replay.cluster.worker_env import thread_env
from tests.test_record import recorder_survives_sigkill
from tests.reliability.helpers import (
    ARGS, COMMON, ROOT, SLOW, assert_same_cube, cli, lca, one_line_error, record, task_flags,
    tree,
)

SETTINGS = dict(task=SLOW, task_args=ARGS, precision="float64", chunk_size=2, progress=False)


def done_count(cube) -> int:
    try:
        root = zarr.open_group(str(cube), mode="r", use_consolidated=False)
        return int(np.asarray(root["done"][:]).sum())
    except Exception:
        return 0


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def run24(tmp_path_factory):
    """24 recorded steps and their uninterrupted cube (chunks of 2 steps)."""
    root = tmp_path_factory.mktemp("faults")
    store = record(str(root / "traj"), steps=24)
    reference = str(root / "reference.zarr")
    replay.run(store, out=reference, scheduler="sync", **SETTINGS)
    return store, reference


@pytest.mark.slow
@pytest.mark.parametrize("allowed_failures", [3, 0])
def test_dask_worker_killed_mid_replay(run24, tmp_path, allowed_failures):
    """SIGKILL one LocalCluster worker while it computes a piece. Dask's default: the piece
    runs again elsewhere (the nanny restarts the worker) and the cube equals the uninterrupted
    one. With ``allowed-failures: 0`` (as if it kept dying, e.g. out of memory) Dask gives up:
    one clear ReplayError, the steps done are kept, and running again completes the cube."""
    import dask
    from distributed import Client, LocalCluster

    store, reference = run24
    cube = str(tmp_path / "c.zarr")
    env = {**thread_env(1), "LCA_TEST_DELAY": "0.04"}
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0", env=env, silence_logs=50) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        outcome: dict = {}

        def replay_in_background():
            try:
                replay.run(store, out=cube, scheduler=client, **SETTINGS)
                outcome["ok"] = True
            except BaseException as err:  # reported by the assertions below
                outcome["error"] = err

        thread = threading.Thread(target=replay_in_background)
        thread.start()
        busy: list = []

        def mid_run():
            if not thread.is_alive():
                return True
            busy[:] = [a for a, keys in client.processing().items() if keys and a in pids]
            return done_count(cube) >= 4 and bool(busy)

        wait_for(mid_run, what="a worker busy mid-replay")
        assert thread.is_alive(), f"the replay ended before a worker could be killed: {outcome}"
        os.kill(pids[busy[0]], signal.SIGKILL)
        thread.join(timeout=300)
        if allowed_failures == 0:
            err = outcome.get("error")
            assert isinstance(err, replay.errors.ReplayError), outcome
            assert str(err).startswith("replay tasks kept killing their Dask workers (")
            assert str(err).endswith("give workers more memory (e.g. --memory) or use fewer "
                                     "per node, then run the same command again: the steps "
                                     "done are kept")
            assert 4 <= done_count(cube) < 24
            replay.run(store, out=cube, scheduler=client, **SETTINGS)
        else:
            assert outcome.get("ok"), outcome
    assert_same_cube(cube, reference)


@pytest.mark.slow
def test_concurrent_replays_and_sigkill(run24, tmp_path):
    """A replays steps 0:12 slowly. Meanwhile: B (all steps) and C (steps 10:14, which shares a
    chunk with A) are refused with one line naming the steps and A's pid; D (steps 12:24, other
    chunks, as a job-array task) runs beside A and finishes. Then A is killed with SIGKILL: its
    locks die with it, and running the command again completes the cube, equal to the
    uninterrupted one. A is held mid-run (a hold file) however long B, C and D take to start."""
    store, reference = run24
    cube = tmp_path / "c.zarr"
    argv = ["replay", store, *task_flags(SLOW), "--cube", cube, *COMMON, "--chunk-size", "2"]
    hold = tmp_path / "hold"
    slow = {**os.environ, "LCA_TEST_DELAY": "0.1", "LCA_TEST_HOLD": str(hold)}
    a = subprocess.Popen(cli(*argv, "--steps", "0:12"), cwd=ROOT, env=slow,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: done_count(cube) >= 2 or a.poll() is not None, what="A's first chunk")
        hold.touch()
        assert a.poll() is None, a.communicate()[1]
        b, c, d = (subprocess.Popen(cli(*argv, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
                   for extra in ([], ["--steps", "10:14"], ["--steps", "12:24"]))
        outs = {name: (p.wait(timeout=300), p.communicate()[1]) for name, p in
                (("b", b), ("c", c), ("d", d))}
        assert a.poll() is None, "A finished before it could be killed: make it slower"
        for name in ("b", "c"):
            code, err = outs[name]
            assert code == 1, err
            msg = one_line_error(err)
            assert "are being replayed by another process (pid " in msg, msg
            assert "wait for it to finish and run again to fill what is left, or replay other " \
                   "steps (--steps A:B; slices of whole chunks may run at the same time)" in msg
        assert f"(pid {a.pid})" in outs["c"][1] and "steps 10..11 are being" in outs["c"][1]
        assert outs["d"][0] == 0, outs["d"][1]
        done = xr.open_zarr(cube)["done"].values
        assert done[12:].all() and not done[:12].all()
        a.send_signal(signal.SIGKILL)
        a.wait()
    finally:
        a.kill()
        a.wait()
    assert done_count(cube) < 24
    with pytest.raises(replay.errors.CubeError, match="not complete"):
        replay.load_param_lca(str(cube))
    rerun = subprocess.run(cli(*argv), cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_cube(cube, reference)


@pytest.mark.slow
def test_recorder_killed_mid_write_leaves_a_valid_store(tmp_path):
    """The recorder's SIGKILL check of tests/test_record.py, run here with the other faults."""
    recorder_survives_sigkill(tmp_path / "traj", kill_after=30, min_steps=20)


# ---------------------------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs under tmp_path (needs root); unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk, leave: int) -> str:
    """Take all free space of ``disk`` but ``leave`` bytes; returns the filler's path."""
    path = os.path.join(disk, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(path, max(0, os.path.getsize(path) - leave))
    return path


def test_disk_full_while_writing_the_cube(run24, small_disk, tmp_path, capsys):
    store, reference = run24
    cube = small_disk / "c.zarr"
    argv = ["replay", store, *task_flags(SLOW), "--cube", cube, *COMMON, "--chunk-size", "2"]
    # Full before the cube exists: nothing is left behind, not even a half-made cube.
    filler = fill(small_disk, 0)
    before = tree(small_disk)
    code, _, err = lca(capsys, *argv)
    msg = one_line_error(err)
    assert code == 1
    assert f"cube {cube}: no space left on device while writing it (No space left on device); " \
           "nothing was written (the new cube was removed): free some space (or pass another " \
           "--cube) and run the same command again to finish" in msg
    assert tree(small_disk) == before
    os.remove(filler)
    # Full in the middle of a replay: the steps done stay valid and the rerun completes.
    code, _, err = lca(capsys, *argv, "--steps", "0:6")
    assert code == 0, err
    filler = fill(small_disk, 96 * 1024)
    code, _, err = lca(capsys, *argv)
    msg = one_line_error(err)
    assert code == 1
    assert f"cube {cube}: no space left on device while writing it" in msg
    done = xr.open_zarr(cube)["done"].values
    assert 6 <= done.sum() < 24 and f"the {done.sum()}/24 steps done so far are kept and valid" \
        in msg
    part, ref = xr.open_zarr(cube), xr.open_zarr(reference)
    for name in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
        assert np.array_equal(part[name].values[done], ref[name].values[done]), name
    os.remove(filler)
    code, _, err = lca(capsys, *argv)
    assert code == 0, err
    assert_same_cube(cube, reference)
    assert [f for f in os.listdir(small_disk) if f != "c.zarr"] == []



def test_interrupted_finalisation_is_redone(run24, tmp_path):
    """Killed while adding the per-parameter parts (all steps done, a `param_lca` array
    created but not marked complete, the parts still there): the per-parameter LCA is refused
    as unfinished, and the next run finalises it to the uninterrupted result."""
    from replay.engine import driver as engine

    store, reference = run24
    cube = str(tmp_path / "c.zarr")
    plan = engine.prepare(store, out=cube, scheduler="sync", **SETTINGS)
    # Run as on a cube made earlier, whose sums go through the parts (a fresh cube's short
    # replay writes its totals itself: the next test).
    engine.execute(dataclasses.replace(plan, created=False), plan.pieces)
    root = zarr.open_group(cube, mode="r+", use_consolidated=False)
    assert sorted(root["param_lca_parts/train"].array_keys())
    half = root.require_group("param_lca").create_array(
        "train", shape=(10,), dtype="f8", attributes={"complete": False})
    half[:5] = 1.0
    with pytest.raises(replay.errors.CubeError, match="not complete"):
        replay.load_param_lca(cube)
    replay.run(store, out=cube, scheduler="sync", **SETTINGS)
    assert_same_cube(cube, reference)


def test_short_replay_interrupted_between_its_totals_and_its_steps(run24, tmp_path,
                                                                  monkeypatch):
    """A short replay of a fresh cube adds its per-parameter sums in memory and writes the totals
    before its steps. Failing in between (the disk fails as the steps are written) leaves complete
    totals and no step done: the per-parameter LCA is refused as unfinished, and the next run
    completes the cube to the uninterrupted result."""
    from replay.cube import writer as cubes
    from replay.engine import driver as engine

    store, reference = run24
    cube = str(tmp_path / "c.zarr")
    real = cubes.CubeWriter.write

    def failing(self, i0, i1, result):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cubes.CubeWriter, "write", failing)
    plan = engine.prepare(store, out=cube, scheduler="sync", **SETTINGS)
    with pytest.raises(OSError, match="Input/output error"):
        engine.execute(plan, plan.pieces)
    monkeypatch.setattr(cubes.CubeWriter, "write", real)
    root = zarr.open_group(cube, mode="r", use_consolidated=False)
    datasets = sorted(root["param_lca"].array_keys())
    assert datasets and all(root[f"param_lca/{d}"].attrs["complete"] is True for d in datasets)
    assert not np.asarray(root["done"][:]).any()
    assert "param_lca_parts" not in root  # nothing went through the partial sums
    with pytest.raises(replay.errors.CubeError, match="not complete"):
        replay.load_param_lca(cube)
    replay.run(store, out=cube, scheduler="sync", **SETTINGS)
    assert_same_cube(cube, reference)
    assert list(zarr.open_group(cube, mode="r")["param_lca_parts"].group_keys()) == []
