"""A cube still being filled (a replay of the first steps only: the others are NaN, not done):
the accessor computes over the done steps exactly as over a complete cube cut there, and the
report says how many steps are done."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import analysis
import replay
from replay.cli import main
from replay.errors import CubeError
from replay.tasks.tiny_mlp import TinyMLP
from tests.helpers_analysis import figure_titles, record, replay_sync

pytestmark = pytest.mark.slow
GROUPS = ["tensor", "layer"]


@pytest.fixture(scope="module")
def cubes(tmp_path_factory):
    root = tmp_path_factory.mktemp("partial")
    task = TinyMLP(train_size=48, test_size=16)
    traj = record(task, root / "traj", steps=8)
    replay_sync(traj, task, root / "full.zarr", groups=GROUPS)
    replay_sync(traj, task, root / "part.zarr", groups=GROUPS, steps="0:5")
    return str(root / "full.zarr"), str(root / "part.zarr")


def test_accessor_on_a_partly_filled_cube(cubes):
    full = analysis.open_cube(cubes[0])
    part = analysis.open_cube(cubes[1])
    assert part.sizes["step"] == 8 and int(part["done"].sum()) == 5
    assert bool(part["lca"].isel(step=slice(5, None)).isnull().all())  # not done: NaN
    head = full.isel(step=slice(0, 5))

    def same(a, b):
        xr.testing.assert_allclose(a.load(), b.load(), rtol=1e-12, atol=0)

    same(part.lca.total(), head.lca.total())
    same(part["lca"].lca.total(), head.lca.total())  # the DataArray path skips the NaN steps
    same(part.lca.interval(1, 4), full.lca.interval(1, 4))
    same(part.lca.grouping("layer").lca.per_param(), head.lca.grouping("layer").lca.per_param())
    cumulative = part.lca.cumulative().load()
    assert cumulative.sizes["step"] == 5 and not bool(cumulative.isnull().any())
    assert part.lca.smooth(2).sizes["step"] == 2
    recon = part.lca.loss_reconstruction().load()
    assert recon["step"].values.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(recon.sel(step=5).values,
                               full["loss"].sel(step=5).values, rtol=0, atol=1e-5)
    occ = part.lca.total().lca.occupation().load()
    np.testing.assert_allclose(occ.groupby("grouping").sum().values, 1.0, rtol=1e-12)
    with pytest.raises(CubeError, match=r"per-parameter LCA of .*part.zarr is not complete "
                                         r"\(3 steps missing\); run `lca replay` on it again"):
        replay.load_param_lca(cubes[1])


def test_report_on_a_partly_filled_cube_says_how_much_is_done(cubes, tmp_path):
    out_part, out_full = tmp_path / "part", tmp_path / "full"
    assert main(["report", cubes[1], "-o", str(out_part)]) == 0
    assert main(["report", cubes[0], "-o", str(out_full)]) == 0
    md = (out_part / "summary.md").read_text()
    assert "> **Partial cube: 5 of 8 intervals are done; everything below covers the done " \
           "steps only. Run `lca replay` on the cube again to finish it.**" in md
    assert "- **steps**: 0..5: 5 of 8 intervals done" in md
    assert "nan" not in md.lower()
    assert "Partial cube" in (out_part / "index.html").read_text()
    assert "Partial cube" not in (out_full / "summary.md").read_text()
    assert figure_titles(out_part) == figure_titles(out_full)
    assert len(figure_titles(out_part)) == 7
