"""The report's tables as ``(headers, rows)`` of formatted strings (:data:`analysis.findings.Table`),
rendered as Markdown and HTML alike by :mod:`analysis.render`."""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.findings import Table
from analysis.measures import helped_fraction, occupation, relative_error
from analysis.ops import as_str, groupings, per_param, select_grouping, total
from analysis.plotting import main_dataset


def reconstruction_table(cube: xr.Dataset) -> Table:
    """Per dataset: measured loss change, Σ LCA, relative error, worst residual, helped %."""
    err = relative_error(cube)
    helped = helped_fraction(cube).mean("step")
    first = groupings(cube)[0]
    lca_sum = select_grouping(cube["lca"], first, strip=False).sum(["group", "step"])
    rows = []
    for d in cube["dataset"].values:
        loss = cube["loss"].sel(dataset=d).values
        change = float((cube["loss_next"] - cube["loss"]).sel(dataset=d).sum())
        rows.append([
            str(d), f"{loss[0]:.4f}", f"{float(cube['loss_next'].sel(dataset=d)[-1]):.4f}",
            f"{change:+.4g}", f"{float(lca_sum.sel(dataset=d)):+.4g}",
            f"{100 * float(err.sel(dataset=d)):.3f}%",
            f"{float(abs(cube['residual'].sel(dataset=d)).max()):.2e}",
            f"{100 * float(helped.sel(dataset=d)):.1f}%",
        ])
    headers = ["dataset", "loss at start", "loss at end", "measured change ΣΔL", "Σ LCA",
               "relative error", "max |residual|", "mean % helped"]
    return headers, rows


def groups_table(cube: xr.Dataset, grouping: str, helped: int = 5, hurt: int = 3) -> Table:
    """The ``helped`` groups of most negative total LCA on the main dataset and the ``hurt``
    groups of most positive (all groups when that is as many), ranked on the main dataset
    (1 = most loss decrease), with their totals on every dataset, share and per-parameter LCA."""
    tot = total(select_grouping(cube, grouping))
    d = main_dataset(cube)
    main = tot.sel(dataset=d).values
    order = np.argsort(main, kind="stable")
    if order.size > helped + hurt:
        worst = [i for i in order[::-1][:hurt] if main[i] > 0]
        order = np.concatenate([order[:helped], np.array(worst[::-1], dtype=int)])
    share = occupation(tot).sel(dataset=d).values
    per = per_param(tot).sel(dataset=d).values
    ranks = np.empty(main.size, dtype=int)
    ranks[np.argsort(main, kind="stable")] = np.arange(1, main.size + 1)
    names = as_str(cube["dataset"].values).tolist()
    rows = []
    for i in order:
        rows.append([str(ranks[i]), str(tot["group"].values[i]), str(int(tot["group_size"][i])),
                     *(f"{float(tot.sel(dataset=n)[i]):+.4g}" for n in names),
                     f"{100 * share[i]:.1f}%", f"{per[i]:+.3g}"])
    headers = ["rank", "group", "parameters", *(f"total LCA on {n}" for n in names),
               f"share of net change on {d}", f"LCA per parameter on {d}"]
    return headers, rows


def comparison_table(cmp: xr.Dataset) -> Table:
    """Per grouping and dataset: Kendall's τ, sign agreement, median per-group relative error."""
    rows = []
    for g in cmp["grouping_name"].values:
        idx = np.flatnonzero(as_str(cmp["grouping"].values) == str(g))
        for d in cmp["dataset"].values:
            rel = cmp["relative_error"].sel(dataset=d).values[idx]
            rel = rel[np.isfinite(rel)]  # a zero reference total has no relative error
            med = f"{100 * float(np.median(rel)):.1f}%" if rel.size else "n/a"
            at = {"grouping_name": g, "dataset": d}
            rows.append([str(g), str(d), str(int(cmp["n_groups"].sel(grouping_name=g))),
                         f"{float(cmp['tau'].sel(at)):.3f}",
                         f"{100 * float(cmp['sign_agreement'].sel(at)):.0f}%", med])
    headers = ["grouping", "dataset", "groups", "Kendall's τ", "sign agreement",
               "median relative error"]
    return headers, rows
