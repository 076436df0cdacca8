"""The Recorder: what it records (tied, frozen, buffers), sparse recording, errors, crash safety."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from replay.errors import RecorderError
from replay.record.recorder import Recorder
from replay.store.trajectory import open_trajectory
from tests.helpers_record import make_model, train


class TiedFrozenNorm(torch.nn.Module):
    """Embedding tied to the output layer, a frozen projection, and a BatchNorm (buffers)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Embedding(10, 6)
        self.frozen = torch.nn.Linear(6, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight                   # tied
        self.register_buffer("cache", torch.zeros(3), persistent=False)   # not state
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.frozen.requires_grad_(False)

    def forward(self, tokens):
        return self.out(self.norm(self.frozen(self.embed(tokens))))


def test_tied_weights_frozen_layer_and_buffers(tmp_path):
    model = TiedFrozenNorm()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    states, params = {}, {}

    def keep(t):
        params[t] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        states[t] = {k: v.clone() for k, v in model.state_dict().items()
                     if k.startswith(("frozen.", "norm.running", "norm.num"))}

    with Recorder(model, tmp_path / "traj", keyframe_every=4) as rec:
        keep(0)
        for t in range(1, 11):
            model.train(t <= 6)          # steps 7..10: eval mode, BatchNorm stats do not move
            tokens = torch.randint(0, 10, (8,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(tokens), tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss.detach())          # a 0-d tensor is accepted
            keep(t)
    traj = open_trajectory(tmp_path / "traj")
    assert traj.names == ["embed.weight", "norm.weight", "norm.bias"]
    assert traj.aliases == {"out.weight": "embed.weight"}
    assert traj.state_names == ["frozen.weight", "frozen.bias", "norm.running_mean",
                                "norm.running_var", "norm.num_batches_tracked"]
    kinds = {s["name"]: s["kind"] for s in traj.manifest["state"]}
    assert kinds["frozen.weight"] == "frozen" and kinds["norm.running_var"] == "buffer"
    for t, p, s in traj.walk():
        assert all(torch.equal(p[n], params[t][n]) for n in p)
        assert s.keys() == states[t].keys()
        assert all(torch.equal(s[n], states[t][n]) for n in s)
    # State files: full at keyframes (0, 4, 8), only changed tensors at steps 1..6, none after.
    files = {t: traj.manifest["steps"][t]["files"] for t in traj.steps}
    assert [t for t in traj.steps if "state" in files[t]] == [0, 1, 2, 3, 4, 5, 6, 8]
    assert all(isinstance(v, float) for v in list(traj.losses().values())[1:])
    traj.verify()


def test_every_k_records_multiples_and_the_final_step(tmp_path):
    model = make_model()
    snaps = train(model, 0, snapshots={})
    with Recorder(model, tmp_path / "traj", every=7, keyframe_every=20) as rec:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for t in range(1, 24):
            model(torch.ones(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=float(t), lr=[0.1 * t])
            snaps[t] = {n: p.detach().clone() for n, p in model.named_parameters()}
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == [0, 7, 14, 21, 23]
    assert traj.keyframe_steps == [0, 21]
    assert traj.every == 7
    assert traj.losses() == {0: None, 7: 7.0, 14: 14.0, 21: 21.0, 23: 23.0}
    assert traj.train_losses() == {0: None, **{t: float(t) for t in range(1, 24)}}
    assert traj.lrs()[23] == [pytest.approx(2.3)]
    for t in traj.steps:
        assert all(torch.equal(v, snaps[t][n]) for n, v in traj.params(t).items())
    traj.verify()


def test_attach_records_each_optimizer_step_with_lr_and_loss(tmp_path):
    model = make_model()
    opt = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.5},
                           {"params": [model[0].bias, model[2].weight, model[2].bias]}], lr=0.25)
    with Recorder(model, tmp_path / "traj").attach(opt) as rec:
        for _ in range(3):
            loss = model(torch.ones(2, 8)).sum()
            loss.backward()
            rec.set_loss(loss.detach())
            opt.step()
            opt.zero_grad()
        assert rec.step_count == 3
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == [0, 1, 2, 3]
    assert traj.lrs()[3] == [0.5, 0.25]
    assert traj.losses()[3] is not None
    opt.step()                      # the hook is removed at close: no error, no record
    assert open_trajectory(tmp_path / "traj").steps == [0, 1, 2, 3]


def test_dtype_and_shape_changes_are_rejected_with_names(tmp_path):
    model = make_model()
    with pytest.raises(RecorderError, match=r"^tensor '0\.weight' changed from float32 "
                                            r"\(16, 8\) to float16 \(16, 8\) at step 1; "):
        with Recorder(model, tmp_path / "a") as rec:
            model[0].weight.data = model[0].weight.data.half()
            rec.step()
    assert open_trajectory(tmp_path / "a").steps == [0]          # what was recorded stays
    model = make_model()
    with Recorder(model, tmp_path / "b") as rec:
        model[2].weight = torch.nn.Parameter(torch.zeros(5, 16))
        with pytest.raises(RecorderError, match=r"tensor '2\.weight' changed from float32 "
                                                r"\(4, 16\) to float32 \(5, 16\) at step 1"):
            rec.step()
        model[2].weight = torch.nn.Parameter(torch.zeros(4, 16))
        train(model, 12, [rec])        # the refused step handed no buffer over: none is lost
    assert open_trajectory(tmp_path / "b").steps[-1] == 13


def test_a_weight_replaced_by_its_own_transpose_is_recorded_as_it_reads(tmp_path):
    # Same storage, same (square) shape: only the layout tells the snapshot that it changed.
    model = torch.nn.Linear(6, 6)
    with Recorder(model, tmp_path / "t") as rec:
        rec.step()
        model.weight.data = model.weight.data.t()
        rec.step()
        expected = model.weight.detach().clone()
    assert torch.equal(open_trajectory(tmp_path / "t").params(2)["weight"], expected)


def test_refuses_to_overwrite_and_bad_arguments(tmp_path):
    record_path = tmp_path / "traj"
    with Recorder(make_model(), record_path):
        pass
    before = json.loads((record_path / "manifest.json").read_text())
    with pytest.raises(RecorderError, match=r"traj already holds a trajectory; choose a new "
                                            r"path or delete it"):
        Recorder(make_model(), record_path)
    assert json.loads((record_path / "manifest.json").read_text()) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RecorderError, match="other is not empty; choose a new path"):
        Recorder(make_model(), tmp_path / "other")
    with pytest.raises(RecorderError, match="cannot record to 's3://b/t'"):
        Recorder(make_model(), "s3://b/t")
    with pytest.raises(RecorderError, match="mode must be 'delta' or 'full', got 'sparse'"):
        Recorder(make_model(), tmp_path / "x", mode="sparse")
    with pytest.raises(RecorderError, match="every must be a positive integer, got 0"):
        Recorder(make_model(), tmp_path / "x", every=0)
    with pytest.raises(RecorderError, match="has not started: use `with rec:`"):
        Recorder(make_model(), tmp_path / "x").step()
    frozen = make_model().requires_grad_(False)
    with pytest.raises(RecorderError, match="no trainable parameter"):
        Recorder(frozen, tmp_path / "x")


def test_writer_failure_is_raised_in_the_training_thread(tmp_path):
    model = make_model()
    rec = Recorder(model, tmp_path / "traj", queue_size=1).start()
    time.sleep(0.2)
    shutil.rmtree(tmp_path / "traj")          # the writer's next file cannot be created
    with pytest.raises(RecorderError, match=r"background writer failed at step \d+ "
                                            r"\(FileNotFoundError: .*is valid up to step 0"):
        for _ in range(50):
            rec.step()
            time.sleep(0.02)
        rec.close()
    rec.close()                               # closing again after the error is harmless


def test_exception_in_training_keeps_the_completed_steps(tmp_path):
    model = make_model()
    with pytest.raises(ZeroDivisionError):
        with Recorder(model, tmp_path / "traj", every=3) as rec:
            for _ in range(4):
                rec.step(loss=1.0)
            raise ZeroDivisionError("training failed")
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == [0, 3]        # step 4 not added: the counter may lag the model
    traj.verify()


def test_sigkill_mid_run_leaves_a_store_valid_up_to_its_last_complete_step(tmp_path):
    recorder_survives_sigkill(tmp_path / "traj", kill_after=40, min_steps=30)


def wait_for_exit(pid: int, timeout: float) -> None:
    """Wait until process ``pid`` (not a child of this one) has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {timeout} s")


def recorder_survives_sigkill(store, kill_after: int, min_steps: int) -> None:
    """Record in a subprocess, SIGKILL it after step ``kill_after``: once its writer process
    has finished, the store must hold every step handed to it, verify, and every θ_t must equal
    an in-process rerun bit for bit (also used by tests/reliability)."""
    helper = os.path.join(os.path.dirname(__file__), "helpers_record.py")
    proc = subprocess.Popen([sys.executable, helper, str(store), "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline:        # wait until a few keyframes are on disk
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("writer "):
                writer = int(line.split()[1])
            if line.startswith("step ") and int(line.split()[1]) >= kill_after:
                break
        assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert writer is not None
    wait_for_exit(writer, timeout=30)
    traj = open_trajectory(store)
    n = traj.steps[-1]
    assert n >= max(min_steps, kill_after) and traj.steps == list(range(n + 1))
    traj.verify()
    # The same run rebuilt in-process matches the store bit for bit (single thread, same seeds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(width=64)
        snaps = train(model, n, snapshots={})
    finally:
        torch.set_num_threads(threads)
    for t, params, _ in traj.walk():
        assert all(torch.equal(params[k], snaps[t][k]) for k in params), t


def test_skipped_updates_are_steps_with_zero_delta_marked_in_the_manifest(tmp_path):
    # A real gradient scaler skips the update whose gradient overflowed (an Inf put in by hand).
    for every in (1, 2):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        snaps = {}
        with Recorder(model, tmp_path / f"traj{every}", every=every) as rec:
            snaps[0] = {n: p.detach().clone() for n, p in model.named_parameters()}
            for t in range(1, 6):
                scaler.scale(model(torch.ones(2, 8)).sum()).backward()
                if t in (2, 3):
                    with torch.no_grad():
                        model[0].weight.grad[0, 0] = float("inf")
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                rec.step(loss=float(t), skipped=scaler.get_scale() < scale)
                snaps[t] = {n: p.detach().clone() for n, p in model.named_parameters()}
        traj = open_trajectory(tmp_path / f"traj{every}")
        assert traj.skipped_steps() == [2, 3]
        entries = {e["step"]: e for e in traj.manifest["steps"]}
        if every == 1:
            assert [t for t, e in entries.items() if e.get("skipped")] == [2, 3]
            # delta(t) is the update from t to t + 1: those into 2 and 3 were skipped
            for t, moved in ((0, True), (1, False), (2, False), (3, True)):
                assert any(float(d.abs().max()) > 0.0 for d in traj.delta(t).values()) == moved
        else:
            assert traj.steps == [0, 2, 4, 5]
            assert entries[2].get("skipped") and entries[2]["interval_skipped"] == [2]
            assert not entries[4].get("skipped") and entries[4]["interval_skipped"] == [3]
        for t in traj.steps:
            assert all(torch.equal(v, snaps[t][n]) for n, v in traj.params(t).items())
        traj.verify()


def test_manifest_validation_checks_skipped_marks(tmp_path):
    from replay.errors import TrajectoryError

    model = make_model()
    with Recorder(model, tmp_path / "traj") as rec:
        rec.step(skipped=True)
    path = tmp_path / "traj" / "manifest.json"
    good = json.loads(path.read_text())
    assert good["steps"][1]["skipped"] is True
    for key, value, message in (("skipped", 1, "step 1: skipped must be true or false"),
                                ("interval_skipped", [0], "step 1: interval_skipped must list "
                                 "ascending steps after 0 up to 1")):
        bad = json.loads(json.dumps(good))
        bad["steps"][1][key] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(TrajectoryError, match=re.escape(message)):
            open_trajectory(tmp_path / "traj")
