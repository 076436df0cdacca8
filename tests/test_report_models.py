"""`lca report` adapts to the model: real replays of an MLP, a CNN and a model with a user YAML
grouping each get the figures their groupings call for (listed here by title and file)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch import nn

import analysis
import replay
from replay.cli import main
from replay.tasks.tiny_cnn import TinyCNN
from replay.tasks.tiny_mlp import TinyMLP
from tests.helpers_analysis import figure_files, figure_titles, record, replay_sync

pytestmark = pytest.mark.slow

CHECKS = ["Loss and its reconstruction", "Residual per step", "Parameters that helped"]
CHECK_FILES = ["fig-loss.png", "fig-residual.png", "fig-helped.png"]


class PartsNet(nn.Module):
    """A model whose parts a user names in YAML: an input layer, two residual blocks, a head."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, 3)

    def forward(self, x):  # (B, 6) -> (B, 3)
        h = torch.tanh(self.embed(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


class PartsTask:
    eval_batch_size = 64

    def __init__(self):
        g = torch.Generator().manual_seed(7)
        w = torch.randn(6, 3, generator=g)
        self._splits = {}
        for name, n in (("train", 64), ("test", 32)):
            x = torch.randn(n, 6, generator=g)
            y = (x @ w).argmax(1)
            self._splits[name] = [(x[i], int(y[i])) for i in range(n)]

    def build_model(self):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return PartsNet()

    def datasets(self):
        return self._splits

    def collate(self, items):
        return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum"), y.numel()


PARTS_YAML = """\
name: parts
groups:
  - {name: input, match: '^embed\\.'}
  - {name: "block{1}", match: '^blocks\\.(\\d+)\\.'}
  - {name: output, match: '^head\\.'}
"""


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def _check_files(out, files):
    assert figure_files(out) == files
    assert sorted(p.name for p in out.glob("*.png")) == sorted(files)
    for name in files:
        w, h = _png_size(out / name)
        assert w > 300 and h > 200, (name, w, h)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp")
    task = TinyMLP(train_size=64, test_size=32)
    traj = record(task, root / "traj", steps=10)
    exact = root / "exact.zarr"
    sampled = root / "sampled.zarr"
    replay_sync(traj, task, exact, groups="tensor")
    replay_sync(traj, task, sampled, groups="tensor",
                gradient=replay.Sampled(batches=2, batch_size=16, seed=0))
    return {"task": task, "traj": traj, "exact": str(exact), "sampled": str(sampled)}


def test_mlp_report_with_reference(mlp, tmp_path):
    out = tmp_path / "report"
    assert main(["report", mlp["sampled"], "--compare", mlp["exact"], "-o", str(out)]) == 0
    assert figure_titles(out) == CHECKS + [
        "Cumulative LCA per layer",  # the Sequential's layers 0, 2, 4, read from tensor names
        "Cumulative LCA per group: tensor grouping",
        "Interval LCA along training: tensor grouping",
        "Occupation ratio vs the reference: tensor grouping",
    ]
    _check_files(out, CHECK_FILES + ["fig-layers-stacks.png", "fig-groups-tensor.png",
                                     "fig-intervals-tensor.png", "fig-occupation-tensor.png"])
    md = (out / "summary.md").read_text()
    assert "## Groups by total LCA: tensor grouping (all groups)" in md
    assert "| tensor | train | 6 |" in md  # the comparison covers the shared grouping
    assert "Kendall's τ of the group rankings vs the reference on train: tensor " in md
    assert "Zhu et al. figures" not in md  # no Transformer grouping: nothing to miss
    assert "nan" not in md.lower()


def test_cnn_report_has_a_layer_figure_from_its_layer_grouping(tmp_path):
    task = TinyCNN()
    traj = record(task, tmp_path / "traj", steps=6, lr=0.1)
    cube = replay_sync(traj, task, tmp_path / "cube.zarr", groups=["tensor", "layer"])
    out = tmp_path / "report"
    analysis.write_report(cube, out)
    assert figure_titles(out) == CHECKS + [
        "Cumulative LCA per layer",
        "Cumulative LCA per group: tensor grouping",
        "Interval LCA along training: tensor grouping",
        "Interval LCA along training: layer grouping",  # its cumulative is the layer figure
    ]
    _check_files(out, CHECK_FILES + ["fig-layers-stacks.png", "fig-groups-tensor.png",
                                     "fig-intervals-tensor.png", "fig-intervals-layer.png"])
    md = (out / "summary.md").read_text()
    assert "(layer grouping; a layer's groups add up)" in md
    assert "Per parameter on train (layer grouping): of stack features, layer " in md
    assert "Occupation ratios vs a reference* omitted: needs a reference cube" in md


def test_user_yaml_grouping_leads_the_findings(tmp_path):
    rules = tmp_path / "parts.yaml"
    rules.write_text(PARTS_YAML)
    task = PartsTask()
    traj = record(task, tmp_path / "traj", steps=6)
    cube = replay_sync(traj, task, tmp_path / "cube.zarr", groups=["tensor", str(rules)])
    assert analysis.groupings(cube) == ["tensor", "parts"]
    out = tmp_path / "report"
    analysis.write_report(cube, out)
    assert figure_titles(out) == CHECKS + [
        "Cumulative LCA per layer",  # blocks.0 / blocks.1, from the tensor grouping
        "Cumulative LCA per group: tensor grouping",
        "Interval LCA along training: tensor grouping",
        "Cumulative LCA per group: parts grouping",
        "Interval LCA along training: parts grouping",
    ]
    _check_files(out, CHECK_FILES + ["fig-layers-stacks.png", "fig-groups-tensor.png",
                                     "fig-intervals-tensor.png", "fig-groups-parts.png",
                                     "fig-intervals-parts.png"])
    md = (out / "summary.md").read_text()
    tables = [line for line in md.splitlines() if line.startswith("## Groups by total LCA")]
    assert tables == ["## Groups by total LCA: parts grouping (all groups)",
                      "## Groups by total LCA: tensor grouping (all groups)"]
    tot = cube.lca.grouping("parts").lca.total().sel(dataset="train").load()
    best = str(tot["group"].values[int(np.argmin(tot.values))])
    share = float(tot.min() / tot.sum())
    assert f"parts group {best} contributed most: {100 * share:.0f}% of the loss decrease " \
           "on train." in md


def test_layer_totals_are_the_sums_of_their_tensors(tmp_path):
    """The layer figure's numbers, from the layer grouping, against the tensor grouping."""
    from analysis.stacks import by_layer

    task = TinyCNN(channels=(2, 3))
    traj = record(task, tmp_path / "traj", steps=3, lr=0.1)
    cube = replay_sync(traj, task, tmp_path / "cube.zarr", groups=["tensor", "layer"])
    layers, outside = by_layer(cube.lca.grouping("layer").lca.total().load())
    tensors = cube.lca.grouping("tensor").lca.total().load()
    assert layers["group"].values.tolist() == ["features/0", "features/3", "classifier/1"]
    assert outside.sizes["group"] == 0
    for label, prefix in (("features/0", "features.0."), ("features/3", "features.3."),
                          ("classifier/1", "classifier.1.")):
        names = [g for g in tensors["group"].values if str(g).startswith(prefix)]
        np.testing.assert_allclose(layers.sel(group=label).values,
                                   tensors.sel(group=names).sum("group").values, rtol=1e-12)
        assert int(layers["group_size"].sel(group=label)) == int(
            tensors["group_size"].sel(group=names).sum())
