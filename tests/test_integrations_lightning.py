"""The Lightning integration: LCACallback on real ``lightning.pytorch.Trainer`` fits.

The LightningModule wraps the TinyMLP task's model; θ is captured independently in its own
``optimizer_step`` hook, the per-batch losses in ``training_step``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pl = pytest.importorskip("lightning.pytorch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import replay  # noqa: E402
from replay.errors import RecorderError  # noqa: E402
from replay.integrations.lightning import LCACallback  # noqa: E402
from replay.record.recorder import Recorder  # noqa: E402
from replay.store.trajectory import open_trajectory  # noqa: E402
from replay.tasks.tiny_mlp import TinyMLP  # noqa: E402

TASK = "replay.tasks.tiny_mlp:TinyMLP"
ARGS = {"train_size": 28, "test_size": 8}


class LitMLP(pl.LightningModule):
    """The task's model under ``self.model``, trained with a plain mean cross-entropy."""

    def __init__(self, optimizer: str = "adam", overflow_at: int | None = None):
        super().__init__()
        self.model = TinyMLP(**ARGS).build_model()
        self.optimizer, self.overflow_at = optimizer, overflow_at
        self.snaps: dict[int, dict] = {}
        self.losses: dict[int, list[float]] = {}  # optimizer step -> its batches' losses

    def on_train_start(self):
        self.snaps[self.trainer.global_step] = self._theta()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.losses.setdefault(self.trainer.global_step + 1, []).append(float(loss.detach()))
        return loss

    def on_after_backward(self):  # before the precision plugin unscales and checks
        if self.trainer.global_step + 1 == self.overflow_at:
            with torch.no_grad():
                self.model[0].weight.grad.view(-1)[0] = float("inf")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.snaps[self.trainer.global_step + 1] = self._theta()  # counted after this hook

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.Adam(self.parameters(), lr=0.05, fused=self.optimizer == "fused")

    def _theta(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def _loader(batch_size=4):
    task = TinyMLP(**ARGS)
    return torch.utils.data.DataLoader(task.datasets()["train"], batch_size=batch_size,
                                       collate_fn=task.collate, shuffle=False)


def _fit(tmp_path, lit, callbacks, epochs=2, **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs,
                         accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=callbacks, **kw)
    trainer.fit(lit, _loader())
    return trainer


def test_accumulated_fit_records_each_optimizer_step_and_replays_from_the_manifest(tmp_path):
    lit = LitMLP()
    trainer = _fit(tmp_path, lit, [LCACallback(tmp_path / "traj", task=TASK, task_args=ARGS,
                                               module="model")])
    # 7 batches per epoch, 2 per optimizer step: windows of 2, 2, 2 and 1 -> 4 steps per epoch
    assert trainer.global_step == 8
    traj = open_trajectory(tmp_path / "traj")
    assert traj.steps == list(range(9)) and sorted(lit.snaps) == traj.steps
    assert traj.names == [n for n, _ in lit.model.named_parameters()]
    for t in traj.steps:
        assert all(torch.equal(traj.params(t)[n], lit.snaps[t][n]) for n in traj.names), t
    assert sorted(lit.losses) == list(range(1, 9))
    assert [len(lit.losses[t]) for t in (1, 4, 5, 8)] == [2, 1, 2, 1]
    for t, values in lit.losses.items():  # the mean of the step's training_step losses
        assert traj.losses()[t] == pytest.approx(np.mean(values), rel=1e-6)
    assert all(traj.lrs()[t] == [0.05] for t in range(1, 9)) and traj.skipped_steps() == []
    assert traj.task == TASK and traj.task_args == ARGS
    traj.verify()

    task = TinyMLP(**ARGS)
    x, y = task.collate(task.datasets()["train"][:8])
    with torch.no_grad():  # the task's loss is the module's on a batch
        total, count = task.loss(lit.model, (x, y))
        assert float(total) / count == pytest.approx(float(F.cross_entropy(lit.model(x), y)),
                                                     rel=1e-6)

    cube = replay.run(tmp_path / "traj", trust_task=True, scheduler="sync", datasets=["train"],
                      out=str(tmp_path / "cube"), progress=False)
    loss = cube["loss"].sel(dataset="train").values
    x, y = task.collate(task.datasets()["train"])
    for t in (0, 7):
        model = task.build_model()
        model.load_state_dict(lit.snaps[t])
        with torch.no_grad():
            assert loss[t] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
    np.testing.assert_allclose(cube["loss_next"].sel(dataset="train").values[:-1], loss[1:],
                               rtol=1e-6)


def test_a_step_the_16_mixed_scaler_skips_is_a_step_with_zero_delta(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    # The scaler does not call SGD on overflow; fused Adam takes the overflow flag and is called
    for optimizer in ("sgd", "fused"):
        lit = LitMLP(optimizer, overflow_at=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        _fit(tmp_path, lit, [LCACallback(tmp_path / optimizer, task=TASK, task_args=ARGS,
                                         module="model")],
             epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
        traj = open_trajectory(tmp_path / optimizer)
        assert traj.steps == list(range(5)) and traj.skipped_steps() == [3], optimizer
        for t in traj.steps:
            assert all(torch.equal(traj.params(t)[n], lit.snaps[t][n]) for n in traj.names)
        assert all(float(d.abs().max()) == 0.0 for d in traj.delta(2).values())


def test_recording_the_whole_module_and_bad_input(tmp_path):
    lit = LitMLP()
    trainer = _fit(tmp_path, lit, [LCACallback(tmp_path / "whole", task=TASK, task_args=ARGS)],
                   epochs=1, max_steps=2)
    traj = open_trajectory(tmp_path / "whole")
    assert traj.steps == [0, 1, 2] == list(range(trainer.global_step + 1))
    assert traj.names == [f"model.{n}" for n, _ in lit.model.named_parameters()]

    with pytest.raises(RecorderError, match=re.escape(
            f"{tmp_path / 'whole'} already holds a trajectory; choose a new path")):
        LCACallback(tmp_path / "whole", task=TASK)
    with pytest.raises(RecorderError, match="LCACallback needs task="):
        LCACallback(tmp_path / "t", task=None)
    bad = LCACallback(tmp_path / "t", task=TASK, module="encoder")
    with pytest.raises(RecorderError, match=re.escape(
            "module='encoder': LitMLP has no such submodule (its children: model)")):
        _fit(tmp_path, LitMLP(), [bad], epochs=1, max_steps=1)
    assert not (tmp_path / "t").exists()
    with Recorder(torch.nn.Linear(2, 2), tmp_path / "other"):
        pass
    with pytest.raises(RecorderError, match="is not empty|already holds"):
        LCACallback(tmp_path / "other", task=TASK)


@pytest.mark.slow
def test_two_processes_record_one_trajectory_on_rank_zero(tmp_path):
    import safetensors.torch

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29900 + os.getpid() % 90), str(root / "tests" / "helpers_trainers.py"),
         "lightning-ddp", str(tmp_path)], env={**os.environ, "PYTHONPATH": str(root),
                                               "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["recorded"] for r in ranks] == [True, False]
    assert {r["world_size"] for r in ranks} == {2} and ranks[0]["backend"] == "gloo"
    # 32 items over 2 processes, batches of 4, 2 batches per step: 2 steps
    traj = open_trajectory(tmp_path / "traj")
    assert ranks[0]["steps"] == 2 and traj.steps == [0, 1, 2]
    theta = safetensors.torch.load_file(str(tmp_path / "theta.safetensors"))
    for t in traj.steps:
        assert all(torch.equal(v, theta[f"{t}/{n}"]) for n, v in traj.params(t).items())
