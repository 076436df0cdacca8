"""Every figure renders on a small cube (Agg), with a title and labelled axes."""

import matplotlib.pyplot as plt
import pytest

import analysis
from analysis.plotting import OKABE_ITO
from replay.errors import CubeError

SINGLE = ["fig_sparse_dense", "fig_layers", "fig_intervals", "fig_frequency", "fig_loss",
          "fig_residual", "fig_helped"]


@pytest.fixture(scope="module")
def cubes(make_cube):
    return make_cube(steps=12), make_cube(steps=12, seed=5, mode="sampled")


def _check(ax):
    assert ax.get_title()
    assert ax.get_xlabel()
    assert ax.get_ylabel()
    assert ax.has_data()
    plt.close(ax.figure)


@pytest.mark.parametrize("name", SINGLE)
def test_figure_renders_with_title_and_labels(cubes, name):
    ax = getattr(analysis, name)(cubes[1])
    _check(ax)


def test_occupation_figure_shows_tau(cubes):
    sampled, exact = cubes[1], cubes[0]
    ax = analysis.fig_occupation(sampled, exact)
    tau = float(analysis.compare(sampled, exact)["tau"].sel(grouping_name="transformer",
                                                            dataset="train"))
    assert f"τ = {tau:.3f}" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sampled", "exact"]
    _check(ax)


def test_figures_draw_into_given_axes(cubes):
    fig, ax = plt.subplots()
    try:
        assert analysis.fig_layers(cubes[0], ax=ax) is ax
        assert ax.get_xticklabels()[0].get_text() == "en_1"
    finally:
        plt.close(fig)


def test_bars_use_the_colour_blind_safe_palette(cubes):
    ax = analysis.fig_sparse_dense(cubes[0], per_param=False)
    colours = {patch.get_facecolor()[:3] for patch in ax.patches}
    import matplotlib.colors as mcolors
    assert colours <= {mcolors.to_rgb(c) for c in OKABE_ITO}
    assert "per parameter" not in ax.get_ylabel() and "loss units" in ax.get_ylabel()
    _check(ax)


@pytest.mark.parametrize("name, grouping", [
    ("fig_sparse_dense", "sparse-dense"), ("fig_layers", "transformer"),
    ("fig_intervals", "transformer"), ("fig_frequency", "frequency")])
def test_figure_without_its_grouping_says_which(make_cube, name, grouping):
    cube = make_cube(steps=3, groupings=("tensor",))
    with pytest.raises(CubeError, match=f"{name} needs the '{grouping}' grouping; the cube "
                                        "has: tensor"):
        getattr(analysis, name)(cube)


def test_figure_refuses_unknown_dataset(cubes):
    with pytest.raises(CubeError, match=r"dataset 'valid' is not in the cube \(it has: train, "
                                        r"test\)"):
        analysis.fig_loss(cubes[0], datasets="valid")


def test_plot_accessor(cubes):
    cube = cubes[0]
    for name in ("sparse_dense", "layers", "intervals", "frequency", "loss", "residual",
                 "helped"):
        _check(getattr(cube.lca.plot, name)())
    _check(cube.lca.plot.occupation(cubes[1]))
    _check(cube["lca"].lca.plot.lines(top=3))
    _check(cube.lca.total().lca.plot.bars())
    with pytest.raises(CubeError, match="bars\\(\\) needs a 'group' dimension and no 'step'"):
        cube["lca"].lca.plot.bars()


def test_figure_takes_a_renamed_grouping(make_cube):
    cube = make_cube(steps=3)  # rename its 'frequency' grouping to 'freq3'
    names = cube["grouping"].values.astype(object)
    names[names == "frequency"] = "freq3"
    labels = [g.replace("frequency/", "freq3/") for g in cube["group"].values.tolist()]
    cube = cube.assign_coords(group=labels, grouping=("group", names))
    _check(analysis.fig_frequency(cube, grouping="freq3"))
