"""Figures for any grouping of any model, each ``fig_xxx(cube, ..., ax=None) -> Axes``.

- :func:`fig_groups` — cumulative LCA per group (totals or per parameter), one bar colour
  per dataset; beyond ``top`` groups the largest are shown and the rest summed.
- :func:`fig_interval_heatmap` — interval LCA along training (Zhu et al. Eq. 3 windows) as a
  group × step heat map, for groupings with too many groups for lines
  (:func:`analysis.figures.fig_intervals` draws the lines).
- :func:`fig_layer_stacks` — cumulative LCA per layer of every layer stack
  (:mod:`analysis.stacks`), modules outside the stacks on the right.
- :func:`fig_occupation_scatter` — occupation ratio of every group in two cubes against each
  other, Kendall's τ in the title (the bar version is :func:`analysis.figures.fig_occupation`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis import condense
from analysis.compare import compare
from analysis.ops import as_str, groupings, per_param as _per_param, select_done, smooth, total
from analysis.plotting import (OKABE_ITO, SIGN_NOTE, grouped_hbars, lca_label, main_dataset,
                               new_axes, pick_datasets, require_grouping)
from analysis.stacks import by_layer, has_stacks, stack_name
from replay.errors import CubeError

BARS_MAX = 20  # groups drawn as bars; beyond, the largest BARS_MAX and one summed rest
ROWS_MAX = 40  # heat-map rows, likewise
OUTSIDE_MAX = 8  # modules outside the layer stacks drawn beside them


def default_window(steps: int, columns: int) -> int:
    """Eq. 3 window length giving at most about ``columns`` windows over ``steps`` steps."""
    return max(1, -(-steps // columns))


def _ranking_dataset(cube, names: list[str]) -> str:
    main = main_dataset(cube)
    return main if main in names else names[0]


def fig_groups(cube: xr.Dataset, grouping: str, ax=None, *, per_param: bool = False,
               datasets=None, top: int = BARS_MAX, order=None):
    """Cumulative LCA of each group of ``grouping`` over the done steps, one bar colour per
    dataset. With more than ``top`` groups, the ``top`` of largest |total| on the main dataset
    are shown, most negative first, and the others summed into ``N other groups``; otherwise
    groups keep the cube's order (or ``order``, a list of labels to put first)."""
    sub = require_grouping(cube, grouping, "fig_groups")
    names = pick_datasets(cube, datasets)
    tot = total(sub).sel(dataset=names).load()
    by = tot.sel(dataset=_ranking_dataset(cube, names))
    shown = condense.top(tot, top, by=by)
    labels = as_str(shown["group"].values).tolist()
    if shown.sizes["group"] < tot.sizes["group"]:  # truncated: rank, rest last
        head = np.argsort(shown.sel(dataset=by["dataset"].item()).values[:-1], kind="stable")
        shown = shown.isel(group=np.append(head, shown.sizes["group"] - 1))
    elif order is not None:
        first = [g for g in order if g in labels]
        shown = shown.sel(group=first + [g for g in labels if g not in first])
    values = _per_param(shown) if per_param else shown
    ax = new_axes(ax, figsize=(7.5, 1.2 + 0.28 * shown.sizes["group"] * max(1, len(names) / 2)))
    grouped_hbars(ax, values.transpose("group", "dataset").values,
                  as_str(values["group"].values), names)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    ax.set_xlabel(lca_label(per_param=per_param))
    ax.set_ylabel(f"group ({grouping} grouping)")
    what = "per parameter" if per_param else "total"
    ax.set_title(f"Cumulative LCA, {what}")
    return ax


def fig_interval_heatmap(cube: xr.Dataset, grouping: str, ax=None, *, dataset: str | None = None,
                         n: int | None = None, per_param: bool = True, rows: int = ROWS_MAX):
    """Interval LCA of each group of ``grouping`` along training on one dataset, averaged over
    windows of ``n`` steps (Eq. 3; default: at most about 100 windows), as a heat map: blue
    lowered the loss, red raised it. Beyond ``rows`` groups the largest by |total| are kept and
    the others summed into one row. The colour scale is symmetric and clipped at the 99th
    percentile of |value|, so a few large early steps do not wash out the rest."""
    sub = require_grouping(cube, grouping, "fig_interval_heatmap")
    name = main_dataset(cube, dataset)
    lca = select_done(sub)["lca"].sel(dataset=name).load()  # (S, G)
    lca = condense.top(lca, rows, by=lca.sum("step"))
    n = n or default_window(lca.sizes["step"], 100)
    windows = smooth(lca, n)  # (W, G)
    values = (_per_param(windows) if per_param else windows).transpose("group", "step")
    starts = values["step"].values
    end = values["step_end"].values[-1] if "step_end" in values.coords else starts[-1] + 1
    edges = np.append(starts, end).astype(float)
    finite = np.abs(values.values[np.isfinite(values.values)])
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    vmax = vmax or float(finite.max(initial=0.0)) or 1.0
    ax = new_axes(ax, figsize=(9.0, 1.6 + 0.22 * values.sizes["group"]))
    mesh = ax.pcolormesh(edges, np.arange(values.sizes["group"] + 1) - 0.5, values.values,
                         cmap="RdBu_r", vmin=-vmax, vmax=vmax, shading="flat")
    ax.set_yticks(np.arange(values.sizes["group"]), as_str(values["group"].values),
                  fontsize="small")
    ax.set_ylim(values.sizes["group"] - 0.5, -0.5)  # first group on top
    clipped = bool(finite.size and finite.max() > vmax)
    bar = ax.figure.colorbar(mesh, ax=ax, extend="both" if clipped else "neither", pad=0.01)
    per = " per parameter" if per_param else ""
    bar.set_label(f"mean interval LCA{per}\n(loss units; {SIGN_NOTE})")
    ax.set_xlabel(f"training step ({n}-step windows)" if n > 1 else "training step")
    ax.set_ylabel(f"group ({grouping} grouping)")
    ax.set_title(f"Interval LCA along training on {name}")
    return ax


def _layer_values(cube, grouping, names, others):
    sub = require_grouping(cube, grouping, "fig_layer_stacks")
    tot = total(sub).sel(dataset=names).load()
    if not has_stacks(as_str(tot["group"].values)):
        raise CubeError(f"fig_layer_stacks found no layer stack in the {grouping!r} grouping "
                        "(a stack is a label with a numbered component, e.g. encoder.layers.3, "
                        "with at least two layers); its groups: "
                        f"{', '.join(as_str(tot['group'].values)[:6])}")
    layers, outside = by_layer(tot)
    if outside.sizes["group"]:
        outside = condense.top(outside, others,
                               by=outside.sel(dataset=_ranking_dataset(cube, names)))
    return layers, outside


def fig_layer_stacks(cube: xr.Dataset, ax=None, *, per_param: bool = True, datasets=None,
                     grouping: str | None = None, others: int = OUTSIDE_MAX):
    """Cumulative LCA of every layer of every layer stack, stack by stack in layer order, one
    bar colour per dataset; the groups outside the stacks (embeddings, heads) on the right,
    at most ``others`` of them plus their summed rest. ``grouping`` defaults to ``layer`` if
    the cube has it, else ``tensor`` (a layer's tensors add up)."""
    grouping = grouping or ("layer" if "layer" in groupings(cube) else "tensor")
    names = pick_datasets(cube, datasets)
    layers, outside = _layer_values(cube, grouping, names, others)
    if per_param:
        layers, outside = _per_param(layers), _per_param(outside)
    blocks = [(stack_name(s), layers.isel(group=np.flatnonzero(as_str(layers["stack"].values)
                                                               == s)))
              for s in dict.fromkeys(as_str(layers["stack"].values))]
    if outside.sizes["group"]:
        blocks.append(("outside stacks", outside))
    ax = new_axes(ax, figsize=(9.0, 4.2))
    x0, ticks, tick_labels, centres, width = 0, [], [], [], 0.8 / len(names)
    for b, (title, block) in enumerate(blocks):
        x = x0 + np.arange(block.sizes["group"])
        for j, d in enumerate(names):
            ax.bar(x + (j - (len(names) - 1) / 2) * width, block.sel(dataset=d).values, width,
                   color=OKABE_ITO[j % len(OKABE_ITO)], edgecolor="white", linewidth=0.5,
                   label=d if b == 0 else None)
        is_layers = "number" in block.coords
        ticks += list(x)
        tick_labels += ([str(v) for v in block["number"].values] if is_layers
                        else as_str(block["group"].values).tolist())
        centres.append(((x[0] + x[-1]) / 2, title))
        if b:
            ax.axvline(x0 - 1, color="0.5", linewidth=0.8, linestyle="--")
        x0 = x[-1] + 2
    ax.set_xticks(ticks, tick_labels)
    stacks_axis = ax.secondary_xaxis("top")  # stack names above their blocks
    stacks_axis.set_xticks([c for c, _ in centres], [t for _, t in centres], fontsize="small")
    stacks_axis.tick_params(length=0)
    for label in ax.get_xticklabels():
        if not label.get_text().isdigit():
            label.set(rotation=35, ha="right", fontsize="small")
    ax.set_xlim(-0.7, x0 - 1.3)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel(f"layer number within its stack ({grouping} grouping)")
    ax.set_ylabel(lca_label(per_param=per_param))
    ax.set_title("Cumulative LCA per layer" + (" per parameter" if per_param else ""))
    if len(names) > 1:
        ax.legend(title="dataset", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return ax


def fig_occupation_scatter(cube: xr.Dataset, reference: xr.Dataset, ax=None, *,
                           grouping: str = "tensor", dataset: str | None = None,
                           labels: tuple[str, str] = ("this cube", "reference")):
    """Occupation ratio (share of the grouping's total LCA) of every group in ``cube`` against
    ``reference``, one point per group, the diagonal for agreement, Kendall's τ-b of the two
    rankings in the title: the readable form of Zhu et al.'s Fig. 1 for many groups."""
    require_grouping(cube, grouping, "fig_occupation_scatter")
    require_grouping(reference, grouping, "fig_occupation_scatter")
    name = main_dataset(cube, dataset)
    cmp = compare(cube, reference)
    if name not in as_str(cmp["dataset"].values).tolist():
        raise CubeError(f"dataset {name!r} is not in both cubes")
    picked = cmp.sel(dataset=name).isel(
        group=np.flatnonzero(as_str(cmp["grouping"].values) == grouping))
    a, b = picked["occupation_a"].values, picked["occupation_b"].values
    tau = float(cmp["tau"].sel(grouping_name=grouping, dataset=name))
    ax = new_axes(ax, figsize=(5.5, 5.0))
    ax.scatter(b, a, s=14, color=OKABE_ITO[0], alpha=0.8, label=f"{a.size} groups")
    both = np.concatenate([a, b])
    both = both[np.isfinite(both)]
    scale = ""
    if both.size:
        lo, hi = float(both.min()), float(both.max())
        line = np.linspace(lo, hi, 200)
        ax.plot(line, line, color="0.4", linestyle=":", linewidth=1, label="equal shares")
        top_share = float(np.abs(both).max())
        if top_share > 0:
            # A few groups usually hold most of the change; a symmetric log scale (linear
            # within 1% of the largest share) spreads the many small ones apart.
            ax.set_xscale("symlog", linthresh=top_share / 100)
            ax.set_yscale("symlog", linthresh=top_share / 100)
            scale = " (symmetric log scale)"
    ax.set_xlabel(f"occupation ratio, {labels[1]}{scale}")
    ax.set_ylabel(f"occupation ratio, {labels[0]}{scale}")
    ax.set_title(f"Occupation ratio per group on {name}: Kendall's τ = {tau:.3f}")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
