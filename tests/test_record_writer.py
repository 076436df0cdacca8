"""The Recorder's writer process: its numpy encoding against the torch reader, and its failures."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from tests.helpers_record import make_model, train

from replay.store.codec import apply_delta, bits, encode_delta
from replay.errors import RecorderError
from replay.record.recorder import Recorder
from replay.record.encoder import encode
from replay.store.trajectory import open_trajectory

INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
          torch.float64: torch.int64}
NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
        torch.float64: "float64"}


def random_bits(dtype: torch.dtype, n: int, g: torch.Generator) -> torch.Tensor:
    """Every bit pattern is possible: NaNs with payloads, ±Inf, subnormals, ±0."""
    width = torch.finfo(dtype).bits
    raw = torch.randint(-2 ** (width - 1), 2 ** (width - 1) - 1, (n,), generator=g,
                        dtype=torch.int64)
    return raw.to(INT_OF[dtype]).view(dtype)


def near(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small relative moves and sign flips of ``x``: the usual training update."""
    wide = x.double()
    step = torch.randn(x.shape, generator=g, dtype=torch.float64) * wide.abs() * 1e-2
    flip = torch.rand(x.shape, generator=g) < 0.05
    return torch.where(flip, -wide * 0.5, wide + step).to(x.dtype)


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("dtype", list(NAME))
def test_numpy_encoding_rebuilds_every_bit_pattern_through_the_torch_reader(dtype):
    g = torch.Generator().manual_seed(7)
    prev = random_bits(dtype, 200_000, g)
    cases = [(prev, random_bits(dtype, 200_000, g)), (prev, near(prev, g))]
    for start, target in cases:
        delta, idx, val = encode(numpy_of(start), numpy_of(target), NAME[dtype])
        payload = {"x": torch.from_numpy(delta)}
        if idx.size:
            payload["x::fix_idx"] = torch.from_numpy(idx)
            payload["x::fix_val"] = torch.from_numpy(np.ascontiguousarray(val))
            if dtype == torch.bfloat16:
                payload["x::fix_val"] = payload["x::fix_val"].view(torch.int16).view(dtype)
        rebuilt = apply_delta({"x": start}, payload)["x"]
        assert torch.equal(bits(rebuilt), bits(target))


@pytest.mark.parametrize("dtype", list(NAME))
def test_numpy_encoding_equals_the_torch_encoding_on_finite_values(dtype):
    # Same Δ and the same corrections as replay.store.codec (which also lists NaN results, as
    # the writer does, only where it must): both sides compute the same IEEE operations.
    g = torch.Generator().manual_seed(3)
    start = torch.randn(50_000, generator=g, dtype=torch.float64).mul(1e-3).to(dtype)
    target = near(start, g)
    delta, idx, val = encode(numpy_of(start), numpy_of(target), NAME[dtype])
    ref = encode_delta({"x": start}, {"x": target})
    assert torch.equal(bits(torch.from_numpy(delta)), bits(ref["x"]))
    ref_idx = ref.get("x::fix_idx", torch.zeros(0, dtype=torch.int64))
    assert torch.equal(torch.from_numpy(idx), ref_idx)


def test_a_writer_that_cannot_start_is_a_one_line_error_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(RecorderError, match=r"writer process \(/bin/false, replay\.record\.writer"
                                            r"\) did not start \(exit status 1\)"):
        Recorder(make_model(), tmp_path / "traj").start()
    assert not (tmp_path / "traj").exists()


def test_a_killed_writer_stops_training_with_the_store_valid(tmp_path):
    model = make_model()
    rec = Recorder(model, tmp_path / "traj", queue_size=1).start()
    train(model, 3, [rec])
    os.kill(rec._writer.proc.pid, signal.SIGKILL)
    rec._writer.proc.wait()
    with pytest.raises(RecorderError, match=r"background writer .*traj"):
        train(model, 10, [rec])
    rec.close()
    open_trajectory(tmp_path / "traj").verify()


def test_the_writer_finishes_queued_steps_after_close_and_exits(tmp_path):
    model = make_model(width=256)
    with Recorder(model, tmp_path / "traj", queue_size=8) as rec:
        train(model, 30, [rec])
        proc = rec._writer.proc
    assert proc.returncode == 0
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == list(range(31))
    traj.verify()


def test_a_replay_package_in_the_working_directory_does_not_shadow_the_writer(tmp_path,
                                                                             monkeypatch):
    (tmp_path / "replay").mkdir()
    (tmp_path / "replay" / "__init__.py").write_text("raise ImportError('not lca-replay')\n")
    monkeypatch.chdir(tmp_path)
    model = make_model()
    with Recorder(model, tmp_path / "traj") as rec:
        train(model, 3, [rec])
    assert open_trajectory(tmp_path / "traj").steps == [0, 1, 2, 3]


def test_many_tensors_and_long_loss_lists_pass_through_the_pipe(tmp_path):
    # The configuration line (every tensor's name and shape) and the interval losses of
    # every=k are longer than a pipe's 64 KiB buffer here.
    model = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(1500))
    with Recorder(model, tmp_path / "traj", every=5000) as rec:
        for _ in range(5000):
            rec.step(loss=0.123456789012345)
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == [0, 5000] and len(traj.names) == 3000
    assert traj.manifest["steps"][1]["interval_losses"] == [0.123456789012345] * 5000


def manifest_steps(path) -> list[int]:
    with open(os.path.join(path, "manifest.json")) as f:
        return [s["step"] for s in json.load(f)["steps"]]


def wait_for_steps(path, steps: list[int], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manifest_steps(path) == steps:
            return True
        time.sleep(0.02)
    return False


def test_steps_count_once_committed_and_close_commits_the_rest(tmp_path):
    model = make_model()
    with Recorder(model, tmp_path / "traj", commit_interval=3600) as rec:
        assert wait_for_steps(tmp_path / "traj", [0])    # the first step commits at once
        train(model, 3, [rec])
        deadline = time.monotonic() + 20
        while rec._writer._freed < 3 and time.monotonic() < deadline:   # steps 1..3 written
            rec._writer.check()
            time.sleep(0.01)
        assert rec._writer._freed == 3
        assert manifest_steps(tmp_path / "traj") == [0]
    assert manifest_steps(tmp_path / "traj") == [0, 1, 2, 3]
    open_trajectory(tmp_path / "traj").verify()


def test_a_pause_in_training_commits_the_waiting_steps(tmp_path):
    model = make_model()
    with Recorder(model, tmp_path / "traj", commit_interval=0.2) as rec:
        train(model, 3, [rec])
        assert wait_for_steps(tmp_path / "traj", [0, 1, 2, 3])
        open_trajectory(tmp_path / "traj").verify()      # readable while recording goes on
        train(model, 2, [rec])


def test_commit_interval_zero_commits_every_step(tmp_path):
    model = make_model()
    with Recorder(model, tmp_path / "traj", commit_interval=0) as rec:
        for t in range(1, 4):
            train(model, 1, [rec])
            assert wait_for_steps(tmp_path / "traj", list(range(t + 1)))


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), "1", True])
def test_a_bad_commit_interval_is_a_one_line_error(tmp_path, bad):
    with pytest.raises(RecorderError, match="commit_interval must be a number of seconds"):
        Recorder(make_model(), tmp_path / "traj", commit_interval=bad)
    assert not (tmp_path / "traj").exists()


def in_process_writer(root, thetas: list[dict[str, torch.Tensor]], state=None,
                      inline_below=None, **overrides):
    """The Writer that the writer process runs, in this process, over anonymous shared memory
    holding one θ (and state) per slot; its header lists the tensors of ``thetas[0]``."""
    import mmap

    from replay.record.channel import _align, _groups
    from replay.record.snapshot import FlatLayout
    from replay.record.writer import CONTROL_BYTES, Writer
    from replay.store.codec import DTYPE_NAMES
    from replay.store.manifest import FORMAT_VERSION

    state = state or [{} for _ in thetas]
    params = FlatLayout([(n, tuple(t.shape), t.dtype) for n, t in thetas[0].items()])
    states = FlatLayout([(n, tuple(t.shape), t.dtype) for n, t in state[0].items()])
    groups_p, end = _groups(params, 0)
    groups_s, end = _groups(states, end)
    set_bytes = _align(end)
    mem = mmap.mmap(-1, CONTROL_BYTES + len(thetas) * set_bytes)
    for s, (theta, st) in enumerate(zip(thetas, state)):
        for layout, groups, tensors in ((params, groups_p, theta), (states, groups_s, st)):
            for (_, start, _, _), dtype in zip(groups, layout.groups):
                flat = torch.cat([tensors[name].reshape(-1) for name in layout.groups[dtype]])
                raw = flat.view(torch.uint8).numpy().tobytes()
                at = CONTROL_BYTES + s * set_bytes + start
                mem[at:at + len(raw)] = raw
    for sub in ("keyframes", "deltas", "state"):
        os.makedirs(os.path.join(root, sub))

    def spec(tensors):
        return [{"name": n, "shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
                for n, t in tensors.items()]

    header = {"format_version": FORMAT_VERSION, "mode": "delta", "keyframe_every": 4,
              "every": 1, "task": None, "task_args": {}, "params": spec(thetas[0]),
              "aliases": {}, "state": [{**s, "kind": "buffer"} for s in spec(state[0])]}
    cfg = {"root": str(root), "header": header, "mode": "delta", "keyframe_every": 4,
           "commit_interval": 3600, "slots": len(thetas), "set_bytes": set_bytes,
           "params": groups_p, "state": groups_s, **overrides}
    writer = Writer(cfg, mem)
    if inline_below is not None:
        writer.out.inline_below = inline_below
    return writer


def step_message(t: int, slot: int) -> dict:
    return {"op": "step", "slot": slot, "step": t, "loss": 0.5, "lr": None, "time": 0.0,
            "interval": None}


def training_thetas(steps: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    model = make_model(width=64, dtype=dtype, scale=1e-2)
    snaps: dict = {}
    train(model, steps, snapshots=snaps)
    return [snaps[t] for t in range(steps + 1)]


def test_files_written_by_the_background_thread_equal_those_written_at_once(tmp_path):
    thetas = training_thetas(9)
    big = {"running": torch.arange(100_000, dtype=torch.float32)}

    def moved(t):          # one element past the first blocks of the comparison differs
        out = big["running"].clone()
        out[70_001] += t + 1
        return {"running": out}

    state = [moved(t) if t % 3 == 0 else big for t in range(10)]
    for name, inline_below in (("inline", 1 << 40), ("thread", 0)):
        writer = in_process_writer(tmp_path / name, thetas, state, inline_below=inline_below)
        for t in range(10):
            writer.record(step_message(t, t))
        writer.commit()
    a, b = open_trajectory(tmp_path / "inline"), open_trajectory(tmp_path / "thread")
    assert a.steps == b.steps == list(range(10))
    b.verify()
    assert [f for f in a.files()] == [f for f in b.files()]
    for _, _, rel in a.files():
        assert (tmp_path / "inline" / rel).read_bytes() == (tmp_path / "thread" / rel).read_bytes()
    # The state file of a step lists exactly the state that changed (compared block by block).
    # (Keyframes at 0, 4, 8 hold all of it.)
    assert [t for t, role, _ in b.files() if role == "state"] == [0, 1, 3, 4, 6, 7, 8, 9]
    for t, params, st in b.walk():
        assert all(torch.equal(params[n], thetas[t][n]) for n in params)
        assert torch.equal(st["running"], state[t]["running"])


def test_a_failed_background_write_stops_all_later_commits(tmp_path):
    thetas = training_thetas(8)
    writer = in_process_writer(tmp_path / "traj", thetas, inline_below=0)
    for t in range(3):
        writer.record(step_message(t, t))
    writer.commit()
    before = (tmp_path / "traj" / "manifest.json").read_bytes()
    os.rename(tmp_path / "traj" / "deltas", tmp_path / "gone")    # the next delta cannot land
    with pytest.raises(FileNotFoundError):
        for t in range(3, 9):
            writer.record(step_message(t, t))
        writer.commit()
    with pytest.raises(FileNotFoundError):      # and again: nothing after a failure commits
        writer.commit()
    assert (tmp_path / "traj" / "manifest.json").read_bytes() == before
    assert open_trajectory(tmp_path / "traj").steps == [0, 1, 2]


def test_format_2_stores_hashed_with_sha256_are_read_and_checked(tmp_path):
    from replay.store.manifest import file_digest
    from replay.errors import TrajectoryError

    model = make_model(width=32, scale=1e-2)
    snaps: dict = {}
    with Recorder(model, tmp_path / "traj", keyframe_every=5) as rec:
        train(model, 12, [rec], snapshots=snaps)
    mpath = tmp_path / "traj" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["format_version"] = 2         # as lca-replay 0.2 wrote it: every file hashed with sha256
    for entry in m["steps"]:
        table = {}
        for rel in entry["files"].values():
            name, _ = file_digest(entry, rel)
            del entry[name][rel]
            table[rel] = hashlib.sha256((tmp_path / "traj" / rel).read_bytes()).hexdigest()
        entry.pop("xxh3_128")
        entry["sha256"] = table
    mpath.write_text(json.dumps(m))
    traj = open_trajectory(tmp_path / "traj")
    assert traj.format_version == 2
    traj.verify()
    for t, params, _ in traj.walk():
        assert all(torch.equal(params[n], snaps[t][n]) for n in params)
    rel = "deltas/step-00000007.safetensors"
    data = bytearray((tmp_path / "traj" / rel).read_bytes())
    data[-1] ^= 1
    (tmp_path / "traj" / rel).write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match=r"^deltas/step-00000007\.safetensors: sha256 \w+… "
                                              r"does not match the manifest's \w+… \(corrupted\)"):
        open_trajectory(tmp_path / "traj").params(8)


def test_every_file_needs_exactly_one_hash(tmp_path):
    from replay.errors import TrajectoryError

    model = make_model()
    with Recorder(model, tmp_path / "traj") as rec:
        train(model, 2, [rec])
    mpath = tmp_path / "traj" / "manifest.json"
    good = json.loads(mpath.read_text())
    rel = good["steps"][1]["files"]["delta"]
    both = json.loads(json.dumps(good))
    both["steps"][1]["sha256"] = {rel: "00"}
    neither = json.loads(json.dumps(good))
    del neither["steps"][1]["xxh3_128"][rel]
    for m in (both, neither):
        mpath.write_text(json.dumps(m))
        with pytest.raises(TrajectoryError, match=r"step 1: bad delta entry 'deltas/step-00000001"
                                                  r"\.safetensors' \(needs a relative path with "
                                                  r"one hash \(sha256 or xxh3_128\)"):
            open_trajectory(tmp_path / "traj")
    del neither["steps"][1]["xxh3_128"]
    mpath.write_text(json.dumps(neither))
    with pytest.raises(TrajectoryError, match=r"step 1: files, sha256 or xxh3_128 and bytes must "
                                              r"be objects"):
        open_trajectory(tmp_path / "traj")


def test_a_store_hashed_with_xxh3_needs_xxhash_to_be_read(tmp_path, monkeypatch):
    from replay.errors import TrajectoryError

    model = make_model()
    with Recorder(model, tmp_path / "traj") as rec:
        train(model, 2, [rec])
    monkeypatch.setitem(sys.modules, "xxhash", None)       # as if it were not installed
    with pytest.raises(TrajectoryError, match=r"^keyframes/step-00000000\.safetensors: the "
                                              r"manifest checks this file with xxh3_128, which "
                                              r"needs the xxhash package: pip install xxhash$"):
        open_trajectory(tmp_path / "traj").params(0)
