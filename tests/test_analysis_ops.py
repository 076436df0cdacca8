"""Selections and sums over steps (analysis.ops) on hand-made cubes with known answers."""

import numpy as np
import pytest
import xarray as xr

import analysis
from analysis import ops
from replay.errors import CubeError

GROUPS = ["g/a", "g/b", "g/c", "h/z"]
SIZES = [2, 4, 10, 16]


@pytest.fixture
def small(cube_from_arrays):
    """7 steps, groupings g = {a, b, c} and h = {z}; z carries the same total as g."""
    s = np.arange(7.0)[:, None]
    lca = np.concatenate([-1.0 * s, -2.0 * s, 0.5 * s, -2.5 * s], axis=1)  # (7, 4)
    return cube_from_arrays(lca, GROUPS, SIZES)


def test_done_keeps_done_steps_only(make_cube):
    cube = make_cube(steps=6, not_done=[1, 4])
    done = ops.select_done(cube)
    assert done["step"].values.tolist() == [0, 2, 3, 5]
    assert not np.isnan(done["lca"].values).any()


def test_done_on_dataarray_drops_all_nan_steps(make_cube):
    cube = make_cube(steps=5, not_done=[0])
    assert ops.select_done(cube["lca"])["step"].values.tolist() == [1, 2, 3, 4]


def test_done_refuses_a_cube_with_no_done_step(make_cube):
    cube = make_cube(steps=3, not_done=[0, 1, 2])
    with pytest.raises(CubeError, match=r"cube has no done steps \(0 of 3\): run or resume"):
        ops.select_done(cube)
    with pytest.raises(CubeError, match="no done steps"):
        ops.total(cube)


def test_measures_on_a_dataset_ignore_steps_not_done(make_cube):
    full = make_cube(steps=6)
    partial = make_cube(steps=6, not_done=[2])
    expected = full["lca"].drop_sel(step=2).sum("step")
    xr.testing.assert_allclose(ops.total(partial), expected)


def test_groupings_in_cube_order(make_cube):
    cube = make_cube(groupings=("frequency", "transformer"))
    assert ops.groupings(cube) == ["frequency", "transformer"]


def test_select_grouping_strips_prefix_and_keeps_grouping_coord(small):
    g = ops.select_grouping(small, "g")
    assert g["group"].values.tolist() == ["a", "b", "c"]
    assert set(g["grouping"].values.tolist()) == {"g"}
    full = ops.select_grouping(small, "h", strip=False)
    assert full["group"].values.tolist() == ["h/z"]


def test_select_grouping_names_what_exists(small):
    with pytest.raises(CubeError, match=r"grouping 'frequency' is not in the cube "
                                        r"\(it has: g, h\)"):
        ops.select_grouping(small, "frequency")


def test_grouping_from_label_prefix_when_coord_missing(small):
    arr = small["lca"].drop_vars("grouping")
    assert ops.groupings(arr) == ["g", "h"]
    assert ops.select_grouping(arr, "h")["group"].values.tolist() == ["z"]


def test_cumulative_is_cumsum_over_steps(small):
    cum = ops.cumulative(small).sel(group="g/a", dataset="train")
    np.testing.assert_allclose(cum.values, -np.cumsum(np.arange(7.0)))


def test_interval_is_half_open(small):
    # steps 2, 3, 4 of group a: -(2 + 3 + 4)
    assert float(ops.interval(small, 2, 5).sel(group="g/a", dataset="train")) == -9.0
    assert float(ops.interval(small, None, 2).sel(group="g/b", dataset="train")) == -2.0
    assert float(ops.total(small).sel(group="g/c", dataset="train")) == 0.5 * 21


def test_interval_refuses_an_empty_range(small):
    with pytest.raises(CubeError, match=r"no done steps in \[10, 20\): the cube has steps 0..6"):
        ops.interval(small, 10, 20)


def test_smooth_means_full_windows_labelled_by_start(small):
    sm = ops.smooth(small, 3).sel(group="g/a", dataset="train")
    # windows {0,1,2} and {3,4,5}; the trailing {6} is dropped (Eq. 3 uses whole windows)
    np.testing.assert_allclose(sm.values, [-1.0, -4.0])
    assert sm["step"].values.tolist() == [0, 3]
    assert sm["step_end"].values.tolist() == [3, 6]


def test_smooth_with_sparse_recording_keeps_step_numbers(cube_from_arrays):
    cube = cube_from_arrays(np.ones((4, 1)), ["g/a"], [1], every=5)
    sm = ops.smooth(cube, 2)
    assert sm["step"].values.tolist() == [0, 10]
    assert sm["step_end"].values.tolist() == [10, 20]


def test_smooth_rejects_bad_windows(small):
    with pytest.raises(ValueError, match="positive integer window, got 0"):
        ops.smooth(small, 0)
    with pytest.raises(CubeError, match=r"smooth\(n=8\) needs at least 8 done steps; the cube "
                                        r"has 7"):
        ops.smooth(small, 8)


def test_per_param_divides_by_group_size(small):
    per = ops.per_param(ops.total(small)).sel(dataset="train")
    np.testing.assert_allclose(per.values, np.array([-21.0, -42.0, 10.5, -52.5]) / SIZES)


def test_functions_stay_lazy_on_dask_cubes(make_cube):
    cube = make_cube(steps=6).chunk({"step": 2})
    assert ops.cumulative(cube).chunks is not None
    assert ops.smooth(cube, 2).chunks is not None
    xr.testing.assert_allclose(ops.total(cube).compute(), ops.total(cube.compute()))


def test_public_api_is_explicit():
    assert "open_cube" in analysis.__all__ and "compare" in analysis.__all__
    for name in analysis.__all__:
        assert getattr(analysis, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        analysis.nope  # noqa: B018
