"""The ``.lca`` accessor composes the plain functions; open_cube reads real zarr cubes."""

import numpy as np
import pytest
import xarray as xr

import analysis
from analysis import measures, ops
from replay.errors import CubeError


@pytest.fixture
def cube(make_cube):
    return make_cube(steps=9, not_done=[8])


@pytest.mark.parametrize("method, func", [
    ("cumulative", ops.cumulative), ("total", ops.total), ("per_param", ops.per_param),
    ("occupation", measures.occupation), ("rank", measures.rank),
    ("helped_fraction", measures.helped_fraction),
    ("loss_reconstruction", measures.loss_reconstruction),
    ("relative_error", measures.relative_error), ("actual_loss", measures.actual_loss),
])
def test_dataset_methods_are_the_plain_functions(cube, method, func):
    xr.testing.assert_identical(getattr(cube.lca, method)(), func(cube))


def test_methods_with_arguments(cube):
    xr.testing.assert_identical(cube.lca.interval(2, 6), ops.interval(cube, 2, 6))
    xr.testing.assert_identical(cube.lca.smooth(4), ops.smooth(cube, 4))
    xr.testing.assert_identical(cube.lca.grouping("layer"), ops.select_grouping(cube, "layer"))
    xr.testing.assert_identical(cube.lca.done(), ops.select_done(cube))
    assert cube.lca.groupings == ops.groupings(cube)


def test_dataarray_accessor_chains(cube):
    lca = cube["lca"].lca.done()
    occ = lca.lca.grouping("transformer").lca.total().lca.occupation()
    np.testing.assert_allclose(occ.sum("group").values, 1.0)
    assert occ["group"].values.tolist()[:2] == ["en_emb", "en_1"]
    xr.testing.assert_identical(cube.lca.done()["helped"].lca.helped_fraction(),
                                cube.lca.helped_fraction())
    with pytest.raises(CubeError, match="cannot tell done steps from the int64 array 'helped'"):
        cube["helped"].lca.done()


def test_dataset_chain_of_selection_then_measure(cube):
    ranks = cube.lca.grouping("sparse-dense").lca.total().lca.rank()
    assert ranks.sel(dataset="train").min() == 1
    assert ranks.sizes["group"] == 5


def test_open_cube_is_lazy_and_handles_zarr_strings(cube, save_cube, tmp_path):
    path = save_cube(cube, tmp_path / "cube.zarr")
    opened = analysis.open_cube(path)
    assert opened["lca"].chunks is not None
    assert opened.lca.groupings == cube.lca.groupings
    occ = opened.lca.grouping("transformer").lca.total().lca.occupation()
    np.testing.assert_allclose(occ.sum("group").values, 1.0)
    xr.testing.assert_allclose(opened.lca.total(), cube.lca.total())
    xr.testing.assert_allclose(analysis.compare(opened, cube)["tau"],
                               analysis.compare(cube, cube)["tau"])


def test_open_cube_errors_name_the_path(tmp_path, save_cube, cube):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(CubeError, match=f"cube {missing} does not exist"):
        analysis.open_cube(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CubeError, match=f"cube {tmp_path / 'empty'} is not a readable zarr "
                                        "store"):
        analysis.open_cube(tmp_path / "empty")
    other = save_cube(cube.drop_vars(["lca", "done"]), tmp_path / "other.zarr")
    with pytest.raises(CubeError, match=f"{other} is not an LCA cube: missing lca, done"):
        analysis.open_cube(other)
