"""The Recorder's writer process: its numpy encoding against the torch reader, and its failures."""

from __future__ import annotations

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
from replay.record.writer import encode
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
