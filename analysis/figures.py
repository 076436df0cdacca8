"""The five figures of Zhu et al., each ``fig_xxx(cube, ax=None, ...) -> Axes``.

1. :func:`fig_occupation` — occupation ratio per module, cube vs reference, τ in the title.
2. :func:`fig_sparse_dense` — cumulative LCA of sparse vs dense weights per side and dataset.
3. :func:`fig_layers` — cumulative LCA per encoder and decoder layer.
4. :func:`fig_intervals` — smoothed interval LCA along training per module.
5. :func:`fig_frequency` — embedding LCA by word-frequency bucket.

A figure whose grouping is absent raises CubeError naming the grouping to replay with;
``grouping=`` picks a grouping made with the same preset under another name, and draws
:func:`fig_occupation` and :func:`fig_intervals` for any grouping (the report does so for
every grouping with few enough groups; :mod:`analysis.group_figures` has the forms for many).
Figures 2–5 show LCA per parameter by default (Eq. 4, as the paper does); ``per_param=False``
shows group totals, which add up to the loss change.
"""

from __future__ import annotations

import re

import numpy as np
import xarray as xr

from analysis.compare import compare
from analysis.ops import per_param as _per_param
from analysis.ops import as_str, select_done, smooth, total
from analysis.plotting import (OKABE_ITO, LINESTYLES, grouped_bars, lca_label, main_dataset,
                               new_axes, pick_datasets, require_grouping, style)
from replay.errors import CubeError

LAYER = re.compile(r"^(en|de)_(\d+)$")
BUCKET = re.compile(r"^(?P<param>.+):f(?P<bucket>\d+)$")
SPARSE_DENSE = ("en_sparse", "en_dense", "de_sparse", "de_dense", "other")  # display order


def _totals(sub: xr.Dataset, per_param: bool) -> xr.DataArray:
    t = total(sub)
    return _per_param(t) if per_param else t


def _run_name(cube: xr.Dataset, fallback: str) -> str:
    from analysis.cube import provenance

    mode = provenance(cube)["gradient"].get("mode")
    return str(mode) if mode else fallback


def fig_occupation(cube: xr.Dataset, reference: xr.Dataset, ax=None, *,
                   grouping: str = "transformer", dataset: str | None = None,
                   labels: tuple[str, str] | None = None):
    """Occupation ratio of each module's cumulative LCA in ``cube`` and in ``reference``
    (e.g. sampled vs exact), with Kendall's τ-b of the two rankings in the title (Fig. 1)."""
    require_grouping(cube, grouping, "fig_occupation")
    require_grouping(reference, grouping, "fig_occupation")
    name = main_dataset(cube, dataset)
    cmp = compare(cube, reference)
    if name not in as_str(cmp["dataset"].values).tolist():
        raise CubeError(f"dataset {name!r} is not in both cubes")
    picked = cmp.sel(dataset=name).isel(
        group=np.flatnonzero(as_str(cmp["grouping"].values) == grouping))
    short = [str(g).split("/", 1)[-1] for g in picked["group"].values]
    if labels is None:
        a, b = _run_name(cube, "a"), _run_name(reference, "b")
        labels = (a, b) if a != b else ("a", "b (reference)")
    values = np.stack([picked["occupation_a"].values, picked["occupation_b"].values], axis=1)
    ax = new_axes(ax)
    grouped_bars(ax, values, short, list(labels), legend_title=None)
    tau = float(cmp["tau"].sel(grouping_name=grouping, dataset=name))
    ax.set_xlabel(f"group ({grouping} grouping)")
    ax.set_ylabel("occupation ratio (share of total LCA)")
    ax.set_title(f"Occupation ratio per group on {name}: Kendall's τ = {tau:.3f}")
    return ax


def fig_sparse_dense(cube: xr.Dataset, ax=None, *, per_param: bool = True, datasets=None,
                     grouping: str = "sparse-dense"):
    """Cumulative LCA of sparse (embeddings, softmax) vs dense weights of encoder and decoder,
    one bar colour per dataset (Fig. 2)."""
    sub = require_grouping(cube, grouping, "fig_sparse_dense")
    labels = as_str(sub["group"].values).tolist()
    order = [g for g in SPARSE_DENSE if g in labels] + [g for g in labels if g not in SPARSE_DENSE]
    names = pick_datasets(cube, datasets)
    values = _totals(sub, per_param).sel(group=order, dataset=names).load()
    ax = new_axes(ax)
    grouped_bars(ax, values.values, order, names)
    ax.set_xlabel(f"weights ({grouping} grouping)")
    ax.set_ylabel(lca_label(per_param=per_param))
    ax.set_title("Cumulative LCA of sparse and dense weights")
    return ax


def fig_layers(cube: xr.Dataset, ax=None, *, per_param: bool = True, datasets=None,
               grouping: str = "transformer"):
    """Cumulative LCA of each dense encoder and decoder layer (en_1 … de_L), per dataset
    (Fig. 3, a zoom into Fig. 2's dense bars)."""
    sub = require_grouping(cube, grouping, "fig_layers")
    labels = [str(g) for g in sub["group"].values]
    layers = sorted((m.group(1) != "en", int(m.group(2)), g)
                    for g in labels if (m := LAYER.match(g)))
    if not layers:
        raise CubeError(f"fig_layers needs en_N / de_N groups in the {grouping!r} grouping; "
                        f"it has: {', '.join(labels)}")
    order = [g for _, _, g in layers]
    names = pick_datasets(cube, datasets)
    values = _totals(sub, per_param).sel(group=order, dataset=names).load()
    ax = new_axes(ax)
    grouped_bars(ax, values.values, order, names)
    n_en = sum(1 for g in order if g.startswith("en_"))
    if 0 < n_en < len(order):
        ax.axvline(n_en - 0.5, color="0.5", linewidth=0.8, linestyle="--")
    ax.set_xlabel("layer (encoder en_N, decoder de_N; 1 = lowest)")
    ax.set_ylabel(lca_label(per_param=per_param))
    ax.set_title("Cumulative LCA per encoder and decoder layer")
    return ax


def fig_intervals(cube: xr.Dataset, ax=None, *, dataset: str | None = None,
                  n: int | None = None, per_param: bool = True, groups=None,
                  grouping: str = "transformer"):
    """Interval LCA of each module along training, averaged over windows of ``n`` steps
    (Eq. 3; default: about 30 windows), on one dataset (Fig. 4)."""
    sub = require_grouping(cube, grouping, "fig_intervals")
    name = main_dataset(cube, dataset)
    lca = select_done(sub)["lca"].sel(dataset=name)
    if groups is not None:
        lca = lca.sel(group=list(groups))
    n = n or max(1, lca.sizes["step"] // 30)
    values = smooth(_per_param(lca) if per_param else lca, n).load()
    ax = new_axes(ax, figsize=(8.5, 4.5))
    for i, g in enumerate(values["group"].values):
        ax.plot(values["step"].values, values.sel(group=g).values, label=str(g),
                marker="." if values.sizes["step"] < 40 else None, **style(i))
    ax.axhline(0, color="0.3", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"training step (start of {n}-step window)" if n > 1 else "training step")
    ax.set_ylabel(lca_label(per_param=per_param, what="mean interval LCA"))
    ax.set_title(f"Interval LCA per group along training on {name}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1),
              title=f"{grouping} grouping")
    ax.grid(alpha=0.3)
    return ax


def fig_frequency(cube: xr.Dataset, ax=None, *, per_param: bool = True, datasets=None,
                  grouping: str = "frequency"):
    """Cumulative LCA of embedding rows grouped by word-frequency bucket (1 = most frequent),
    one colour per matrix and one line style per dataset (Fig. 5)."""
    sub = require_grouping(cube, grouping, "fig_frequency")
    parsed = [(str(g), BUCKET.match(str(g))) for g in sub["group"].values]
    buckets = [(m.group("param"), int(m.group("bucket")), g) for g, m in parsed if m]
    if not buckets:
        raise CubeError(f"fig_frequency needs '<param>:fNN' groups in the {grouping!r} "
                        "grouping")
    names = pick_datasets(cube, datasets)
    values = _totals(sub, per_param).sel(dataset=names).load()
    params = list(dict.fromkeys(p for p, _, _ in buckets))
    ax = new_axes(ax)
    for i, param in enumerate(params):
        rows = sorted((b, g) for p, b, g in buckets if p == param)
        x = [b for b, _ in rows]
        for j, ds_name in enumerate(names):
            y = values.sel(group=[g for _, g in rows], dataset=ds_name).values
            ax.plot(x, y, marker="o", markersize=3, color=OKABE_ITO[i % len(OKABE_ITO)],
                    linestyle=LINESTYLES[j % len(LINESTYLES)],
                    label=f"{param.removesuffix('.weight')} ({ds_name})")
    ax.axhline(0, color="0.3", linewidth=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("word-frequency bucket (1 = most frequent words)")
    ax.set_ylabel(lca_label(per_param=per_param))
    ax.set_title("Cumulative embedding LCA by word frequency")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
