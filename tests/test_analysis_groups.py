"""Figures and summaries for any grouping: layer stacks from labels, the largest groups with the
rest summed, heat maps for many groups, the main grouping of the findings."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

import analysis
from analysis.condense import condense, top
from analysis.findings import main_grouping
from analysis.group_figures import (fig_groups, fig_interval_heatmap, fig_layer_stacks,
                                    fig_occupation_scatter)
from analysis.stacks import Layer, by_layer, has_stacks, parse_layer
from replay.errors import CubeError


@pytest.mark.parametrize("label, expected", [
    ("encoder.layers.3", Layer("encoder.layers", 3)),
    ("transformer.h.0", Layer("transformer.h", 0)),
    ("features.1", Layer("features", 1)),
    ("layer1.0.conv1", Layer("layer1", 0)),          # a ResNet block
    ("0", Layer("", 0)),                             # a top-level nn.Sequential
    ("encoder.block.2.layer.0", Layer("encoder.block", 2)),  # the outer stack counts
    ("decoder.output_projection", None),
    ("embed_tokens.weight:f01", None),
    ("conv1", None),
])
def test_layers_are_read_from_labels(label, expected):
    assert parse_layer(label) == expected


def test_a_stack_needs_two_layers():
    assert has_stacks(["features.0", "features.3", "classifier.1"])
    assert not has_stacks(["classifier.1", "embed", "head"])


def _many(cube_from_arrays, n_groups=50, steps=12):
    rng = np.random.default_rng(0)
    lca = -np.abs(rng.standard_normal((steps, n_groups))) * np.linspace(1, 0.01, n_groups)
    lca[:, 7] = 0.5  # one group that hurts
    labels = [f"tensor/blocks.{i // 2}.w{i % 2}" for i in range(n_groups)]
    sizes = np.arange(1, n_groups + 1) * 10
    return cube_from_arrays(lca, labels, sizes), lca, sizes


def test_condense_sums_the_rest_values_and_sizes(cube_from_arrays):
    cube, lca, sizes = _many(cube_from_arrays)
    tot = cube.lca.total().sel(dataset="train")
    short = top(tot, 5)
    keep = np.sort(np.argsort(-np.abs(lca.sum(0)))[:5])
    assert short["group"].values.tolist()[:5] == [f"tensor/blocks.{i // 2}.w{i % 2}" for i in keep]
    assert short["group"].values[-1] == "45 other groups"
    rest = np.setdiff1d(np.arange(50), keep)
    np.testing.assert_allclose(float(short[-1]), lca.sum(0)[rest].sum(), rtol=1e-12)
    assert int(short["group_size"][-1]) == int(sizes[rest].sum())
    np.testing.assert_allclose(float(short.sum()), lca.sum(), rtol=1e-12)  # nothing lost
    np.testing.assert_allclose(float(analysis.per_param(short)[-1]),
                               lca.sum(0)[rest].sum() / sizes[rest].sum(), rtol=1e-12)
    assert top(tot, 49) is tot  # a rest of one group is not worth a bar
    assert condense(tot, np.arange(50)).sizes["group"] == 50


def test_many_groups_stay_readable(cube_from_arrays):
    cube, lca, _ = _many(cube_from_arrays)
    ax = fig_groups(cube, "tensor")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 21 and labels[-1] == "30 other groups"
    shown = [np.argsort(lca.sum(0))[0]]  # most negative first
    assert labels[0] == f"blocks.{shown[0] // 2}.w{shown[0] % 2}"
    plt.close(ax.figure)
    ax = fig_interval_heatmap(cube, "tensor", n=3)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert len(rows) == 41 and rows[-1] == "10 other groups"
    mesh = ax.collections[0]
    assert mesh.get_array().shape == (41, 4)  # 12 steps in windows of 3
    vmin, vmax = mesh.get_clim()
    assert vmin == -vmax > -np.inf and vmax > 0
    assert "blocks.3.w1" in rows  # the group that hurt is among the largest
    plt.close(ax.figure)


def test_layer_figure_lists_stacks_then_other_modules(make_cube):
    cube = make_cube(steps=6)
    ax = fig_layer_stacks(cube)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["0", "1", "0", "1", "encoder.embed_tokens", "decoder.embed_tokens",
                     "decoder.output_projection", "encoder.layer_norm"]
    top_axis = [c for c in ax.child_axes][0]
    assert [t.get_text() for t in top_axis.get_xticklabels()] == [
        "encoder.layers", "decoder.layers", "outside stacks"]
    assert "per parameter" in ax.get_ylabel() and ax.get_title()
    plt.close(ax.figure)
    layers, outside = by_layer(cube.lca.grouping("layer").lca.total())
    tensors = cube.lca.grouping("tensor").lca.total()
    enc0 = [g for g in tensors["group"].values if str(g).startswith("encoder.layers.0.")]
    np.testing.assert_allclose(layers.sel(group="encoder.layers/0").values,
                               tensors.sel(group=enc0).sum("group").values, rtol=1e-12)
    assert outside.sizes["group"] == 4


def test_layer_figure_without_stacks_says_why(cube_from_arrays):
    cube = cube_from_arrays(np.ones((3, 2)), ["layer/embed", "layer/head"], [4, 4])
    with pytest.raises(CubeError, match=r"fig_layer_stacks found no layer stack in the 'layer' "
                                        r"grouping \(a stack is a label with a numbered "
                                        r"component, e.g. encoder.layers.3"):
        fig_layer_stacks(cube)


def test_occupation_scatter_shows_tau(make_cube):
    a, b = make_cube(steps=8, seed=1, mode="sampled"), make_cube(steps=8)
    ax = fig_occupation_scatter(a, b, grouping="tensor")
    tau = float(analysis.compare(a, b)["tau"].sel(grouping_name="tensor", dataset="train"))
    assert ax.get_title().endswith(f"Kendall's τ = {tau:.3f}")
    assert len(ax.collections[0].get_offsets()) == 12
    plt.close(ax.figure)


def test_main_grouping_prefers_the_users_own(cube_from_arrays):
    labels = ["tensor/a.w", "tensor/b.w", "parts/front", "parts/back", "freq/e:f01",
              "freq/e:f02", "freq/rest"]
    cube = cube_from_arrays(np.ones((2, 7)), labels, [1] * 7)
    assert main_grouping(cube) == "parts"
    assert main_grouping(cube.isel(group=[0, 1, 4, 5, 6])) == "tensor"


@pytest.mark.parametrize("method, args", [("groups", ("tensor",)), ("heatmap", ("layer",)),
                                          ("layer_stacks", ()), ("occupation_scatter", None)])
def test_accessor_plots_any_grouping(make_cube, method, args):
    cube = make_cube(steps=6)
    if args is None:
        args = (make_cube(steps=6, seed=3),)
    ax = getattr(cube.lca.plot, method)(*args)
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and ax.has_data()
    plt.close(ax.figure)
