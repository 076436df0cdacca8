"""Kendall's τ-b and compare(a, b) on constructed rankings with hand-computed answers."""

import numpy as np
import pytest

from analysis import compare, kendall_tau_b
from replay.errors import CubeError


def test_tau_without_ties():
    # y order 3,4,1,2,5: 6 concordant and 4 discordant of 10 pairs
    assert kendall_tau_b([1, 2, 3, 4, 5], [3, 4, 1, 2, 5]) == pytest.approx(0.2)


def test_tau_b_with_ties_on_both_sides():
    # pairs: C = 4, D = 0, one pair tied in x only, one in y only: 4 / sqrt(5 * 5)
    assert kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    # S = -4, 5 pairs untied in x, 5 untied in y
    assert kendall_tau_b([1, 2, 2, 3], [3, 1, 2, 1]) == pytest.approx(-0.8)


def test_tau_b_pair_tied_on_both_sides_counts_in_neither():
    # (0,1) tied in x and y; others concordant: S = 5, untied x = 5, untied y = 5
    assert kendall_tau_b([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)


def test_tau_extremes_and_degenerate_inputs():
    x = np.arange(10.0)
    assert kendall_tau_b(x, 2 * x + 1) == pytest.approx(1.0)
    assert kendall_tau_b(x, -x) == pytest.approx(-1.0)
    assert np.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert np.isnan(kendall_tau_b([1], [2]))
    # NaN drops its pair: same as the tau of the rest
    assert kendall_tau_b([1, 2, np.nan, 3], [1, 3, 0, 2]) == pytest.approx(
        kendall_tau_b([1, 2, 3], [1, 3, 2]))
    with pytest.raises(ValueError, match="equal lengths, got 3 and 2"):
        kendall_tau_b([1, 2, 3], [1, 2])


def test_tau_in_blocks_matches_the_dense_formula():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, 2100), rng.integers(0, 30, 2100)  # many ties; 2 row blocks
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    ref = (sx * sy).sum() / np.sqrt(np.abs(sx).sum() * np.abs(sy).sum())
    assert kendall_tau_b(x, y) == pytest.approx(ref)


GROUPS = ["m/a", "m/b", "m/c", "m/d"]


def test_compare_known_answers(cube_from_arrays):
    a = cube_from_arrays([[-4.0, -3.0, -2.0, 1.0]], GROUPS, [1] * 4)
    b = cube_from_arrays([[-4.0, -2.0, -3.0, -1.0]], GROUPS, [1] * 4)
    cmp = compare(a, b)
    tau = float(cmp["tau"].sel(grouping_name="m", dataset="train"))
    # occupation orders a: a > b > c > d, b: a > c > b > d -> one discordant pair of 6
    assert tau == pytest.approx(4 / 6)
    np.testing.assert_array_equal(cmp["sign_agree"].sel(dataset="train").values,
                                  [True, True, True, False])
    assert float(cmp["sign_agreement"].sel(grouping_name="m", dataset="train")) == 0.75
    np.testing.assert_allclose(cmp["relative_error"].sel(dataset="train").values,
                               [0.0, 0.5, 1 / 3, 2.0])
    assert int(cmp["n_groups"].sel(grouping_name="m")) == 4
    assert "reference" in cmp.attrs["b"] and "exact gradient" in cmp.attrs["a"]
    assert "tau" in repr(cmp)


def test_compare_inner_joins_groups_datasets_and_steps(cube_from_arrays):
    a = cube_from_arrays(np.array([[[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]]] * 3),
                         ["m/a", "m/b", "m/c"], [1] * 3, datasets=("train", "test"))
    b = cube_from_arrays(np.array([[[-1.0], [-2.0]]] * 2), ["m/a", "m/b"], [1] * 2,
                         datasets=("test",))
    cmp = compare(a, b)
    assert cmp["group"].values.tolist() == ["m/a", "m/b"]
    assert cmp["dataset"].values.tolist() == ["test"]
    assert cmp.attrs["steps"].startswith("0..2 (2 common")
    np.testing.assert_allclose(cmp["lca_a"].values.ravel(), [-2.0, -4.0])  # 2 common steps
    # occupation within a's whole grouping (a, b, c) before the join
    np.testing.assert_allclose(cmp["occupation_a"].values.ravel(), [1 / 6, 2 / 6])


def test_compare_refuses_cubes_with_nothing_in_common(cube_from_arrays):
    a = cube_from_arrays([[-1.0]], ["m/a"], [1])
    with pytest.raises(CubeError, match="the two cubes have no groups in common"):
        compare(a, cube_from_arrays([[-1.0]], ["m/x"], [1]))
    with pytest.raises(CubeError, match="no datasets in common"):
        compare(a, cube_from_arrays([[-1.0]], ["m/a"], [1], datasets=("test",)))
    with pytest.raises(CubeError, match="no done steps in common"):
        compare(a, cube_from_arrays([[-1.0]], ["m/a"], [1], steps=[5]))
    with pytest.raises(CubeError, match="replay different intervals"):
        compare(cube_from_arrays([[-1.0]], ["m/a"], [1], every=2),
                cube_from_arrays([[-1.0]], ["m/a"], [1], every=3))


def test_compare_sampled_toy_with_exact(make_cube):
    exact = make_cube(steps=10)
    sampled = make_cube(steps=10, seed=7, mode="sampled")
    cmp = sampled.lca.compare(exact)
    assert set(cmp["grouping_name"].values.tolist()) == {
        "transformer", "sparse-dense", "frequency", "layer", "tensor"}
    assert (cmp["tau"] > 0.5).all()
    assert "sampled (batches=4" in cmp.attrs["a"]
