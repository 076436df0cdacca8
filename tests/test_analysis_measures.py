"""Occupation, rank, helped fraction, loss reconstruction and relative error (analysis.measures)."""

import numpy as np
import pytest
import xarray as xr

from analysis import measures, ops
from replay.errors import CubeError


@pytest.fixture
def signed(cube_from_arrays):
    """One step: grouping g = {a: -3, b: -1, c: +2} (total -2), grouping h = {z: -2}."""
    return cube_from_arrays([[-3.0, -1.0, 2.0, -2.0]], ["g/a", "g/b", "g/c", "h/z"],
                            [1, 1, 2, 4])


def test_occupation_with_a_negative_total_sums_to_one_per_grouping(signed):
    occ = measures.occupation(ops.total(signed)).sel(dataset="train")
    # share = lca / grouping total: helped groups positive, the hurting group negative
    np.testing.assert_allclose(occ.values, [1.5, 0.5, -1.0, 1.0])
    assert occ.name == "occupation"


def test_occupation_with_a_positive_total(cube_from_arrays):
    cube = cube_from_arrays([[3.0, -1.0]], ["g/a", "g/b"], [1, 1])
    occ = measures.occupation(ops.total(cube)).sel(dataset="train")
    np.testing.assert_allclose(occ.values, [1.5, -0.5])


def test_occupation_of_a_zero_total_is_nan(cube_from_arrays):
    cube = cube_from_arrays([[1.0, -1.0]], ["g/a", "g/b"], [1, 1])
    assert np.isnan(measures.occupation(ops.total(cube)).values).all()


def test_occupation_per_step_on_a_dataset(make_cube):
    occ = measures.occupation(make_cube(steps=4))
    sums = occ.groupby("grouping").sum("group")
    np.testing.assert_allclose(sums.values, 1.0)
    assert occ.sizes["step"] == 4


def test_rank_min_handles_ties_and_nan():
    v = np.array([[-3.0, -1.0, 2.0, -1.0], [np.nan, 0.0, -5.0, 0.0]])
    np.testing.assert_array_equal(measures.rank_min(v), [[1, 2, 4, 2], [np.nan, 2, 1, 2]])


def test_rank_within_each_grouping(signed):
    r = measures.rank(ops.total(signed)).sel(dataset="train")
    assert r["group"].values.tolist() == ["g/a", "g/b", "g/c", "h/z"]
    np.testing.assert_array_equal(r.values, [1, 2, 3, 1])


def test_rank_keeps_order_when_groupings_interleave(cube_from_arrays):
    cube = cube_from_arrays([[5.0, 1.0, -1.0, 2.0]], ["g/a", "h/x", "g/b", "h/y"], [1] * 4)
    r = measures.rank(ops.total(cube)).sel(dataset="train")
    np.testing.assert_array_equal(r.values, [2, 1, 1, 2])


def test_rank_on_a_dask_array(make_cube):
    cube = make_cube(steps=4).chunk({"group": 5})
    lazy = measures.rank(cube)
    assert lazy.chunks is not None
    xr.testing.assert_equal(lazy.compute(), measures.rank(cube.compute()))


def test_helped_fraction_counts_one_grouping(cube_from_arrays):
    helped = [[1, 1, 4, 6], [0, 2, 0, 2]]
    cube = cube_from_arrays(np.zeros((2, 4)), ["g/a", "g/b", "g/c", "h/z"], [2, 2, 6, 10],
                            helped=helped)
    frac = measures.helped_fraction(cube).sel(dataset="train")
    np.testing.assert_allclose(frac.values, [6 / 10, 2 / 10])  # grouping g only
    np.testing.assert_allclose(measures.helped_fraction(cube, "h").values.ravel(), [0.6, 0.2])
    np.testing.assert_allclose(measures.helped_fraction(cube["helped"]).values.ravel(),
                               [0.6, 0.2])


def test_helped_fraction_needs_helped(make_cube):
    with pytest.raises(CubeError, match=r"needs the cube or its 'helped' variable, got 'lca'"):
        measures.helped_fraction(make_cube(steps=2)["lca"])


def test_loss_reconstruction_sums_one_grouping_and_aligns_to_step_end(cube_from_arrays):
    lca = [[-0.5, -0.25, -0.75], [-0.1, -0.1, -0.2]]  # g = {a, b}, h = {z}, same totals
    cube = cube_from_arrays(lca, ["g/a", "g/b", "h/z"], [1, 1, 2], loss0=2.0, every=10)
    rec = measures.loss_reconstruction(cube).sel(dataset="train")
    assert rec["step"].values.tolist() == [10, 20]
    np.testing.assert_allclose(rec.values, [1.25, 1.05])
    np.testing.assert_allclose(rec.values, cube["loss_next"].sel(dataset="train").values)


def test_relative_error_as_lan_et_al(cube_from_arrays):
    # Σ lca = -1.0, Σ residual = -0.01: measured change -1.01
    cube = cube_from_arrays([[-0.6], [-0.4]], ["g/a"], [1], residual=[[-0.004], [-0.006]])
    err = float(measures.relative_error(cube).sel(dataset="train"))
    assert err == pytest.approx(0.01 / 1.01)
    assert float(measures.relative_error(cube, "g")[0]) == pytest.approx(0.01 / 1.01)


def test_relative_error_of_no_change_is_nan(cube_from_arrays):
    cube = cube_from_arrays([[0.0]], ["g/a"], [1])
    assert np.isnan(measures.relative_error(cube).values).all()


def test_reconstruction_warns_about_gaps(make_cube):
    cube = make_cube(steps=5, not_done=[2])
    with pytest.warns(UserWarning, match=r"cube skips 1 interval\(s\) \(first after step 1: "
                                         r"ends at 2, next starts at 3\)"):
        measures.loss_reconstruction(cube)


def test_reconstruction_needs_the_whole_cube(make_cube):
    with pytest.raises(CubeError, match="needs the whole cube"):
        measures.loss_reconstruction(make_cube(steps=2)["lca"])
    with pytest.raises(CubeError, match="needs the whole cube"):
        measures.relative_error(make_cube(steps=2)["lca"])


def test_actual_loss_adds_the_final_point(make_cube):
    cube = make_cube(steps=4, every=3)
    loss = measures.actual_loss(cube)
    assert loss["step"].values.tolist() == [0, 3, 6, 9, 12]
    assert float(loss.isel(step=-1, dataset=0)) == float(cube["loss_next"].isel(step=-1,
                                                                                 dataset=0))


def test_toy_cube_reconstructs_its_loss(make_cube):
    cube = make_cube(steps=20)
    rec = measures.loss_reconstruction(cube)
    actual = cube["loss_next"].assign_coords(step=cube["step_end"].values)
    np.testing.assert_allclose(rec.values, actual.values, atol=1e-3)
    assert (measures.relative_error(cube) < 1e-3).all()
