"""Numbers and one-sentence findings for the report, computed from a (done, loaded) cube.

Tables are ``(headers, rows)`` of already formatted strings, rendered by :mod:`analysis.report`
as Markdown and HTML alike.
"""

from __future__ import annotations

import re

import numpy as np
import xarray as xr

from analysis.measures import helped_fraction, occupation, relative_error
from analysis.ops import as_str, groupings, per_param, select_grouping, total
from analysis.plotting import main_dataset

Table = tuple[list[str], list[list[str]]]
PREFERRED = ("transformer", "sparse-dense", "layer", "tensor")


def main_grouping(cube: xr.Dataset) -> str:
    """The grouping findings are stated in: transformer if present (the paper's modules)."""
    have = groupings(cube)
    return next((g for g in PREFERRED if g in have), have[0])


def _direction(total_change: float) -> str:
    return "decrease" if total_change < 0 else "increase"


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


def top_groups_table(cube: xr.Dataset, grouping: str, k: int = 5) -> Table:
    """The ``k`` groups with the most negative total LCA per dataset, with their shares."""
    sub = select_grouping(cube, grouping)
    tot = total(sub)
    share = occupation(tot)
    per = per_param(tot)
    rows = []
    for d in cube["dataset"].values:
        order = np.argsort(tot.sel(dataset=d).values, kind="stable")[:k]
        for r, i in enumerate(order, start=1):
            g = tot["group"].values[i]
            rows.append([str(d), str(r), str(g), f"{float(tot.sel(dataset=d)[i]):+.4g}",
                         f"{100 * float(share.sel(dataset=d)[i]):.1f}%",
                         f"{float(per.sel(dataset=d)[i]):+.3g}"])
    headers = ["dataset", "rank", "group", "total LCA (loss units)", "share of net change",
               "LCA per parameter"]
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


def _top_sentence(cube: xr.Dataset, grouping: str, d: str) -> str:
    tot = total(select_grouping(cube, grouping)).sel(dataset=d)
    net = float(tot.sum())
    i = int(np.argmin(tot.values) if net < 0 else np.argmax(tot.values))
    share = float(tot[i]) / net if net else float("nan")
    return (f"{tot['group'].values[i]} contributed most: {100 * share:.0f}% of the loss "
            f"{_direction(net)} on {d} ({grouping} grouping).")


def _hurt_sentence(cube: xr.Dataset, grouping: str, d: str) -> str | None:
    tot = total(select_grouping(cube, grouping)).sel(dataset=d)
    hurt = [str(g) for g, v in zip(tot["group"].values, tot.values, strict=True) if v > 0]
    if not hurt:
        return f"Every {grouping} group lowered the loss on {d} over the run."
    return (f"{len(hurt)} of {tot.sizes['group']} {grouping} groups raised the loss on {d} "
            f"over the run: {', '.join(hurt[:5])}{' …' if len(hurt) > 5 else ''}.")


def _sparse_sentence(cube: xr.Dataset, d: str) -> str | None:
    sub = select_grouping(cube, "transformer")
    tot = total(sub).sel(dataset=d)
    sparse = [g for g in ("en_emb", "de_emb", "de_softmax") if g in as_str(tot["group"].values)]
    if not sparse:
        return None
    net = float(tot.sum())
    part = float(tot.sel(group=sparse).sum())
    params = float(sub["group_size"].sel(group=sparse).sum() / sub["group_size"].sum())
    return (f"Embeddings and softmax ({', '.join(sparse)}) account for {100 * part / net:.0f}% "
            f"of the loss {_direction(net)} on {d} while holding {100 * params:.0f}% of the "
            "parameters.")


def _layer_sentence(cube: xr.Dataset, d: str) -> str | None:
    per = per_param(total(select_grouping(cube, "transformer"))).sel(dataset=d)
    parts = []
    for side, name in (("en", "encoder"), ("de", "decoder")):
        layers = [g for g in per["group"].values if re.fullmatch(rf"{side}_\d+", str(g))]
        if len(layers) > 1:
            best = layers[int(np.argmin(per.sel(group=layers).values))]
            parts.append(f"{best} contributed most per parameter among {name} layers")
    return f"On {d}, " + " and ".join(parts) + "." if parts else None


def _frequency_sentence(cube: xr.Dataset, d: str) -> str | None:
    per = per_param(total(select_grouping(cube, "frequency"))).sel(dataset=d)
    found = {}
    for g in per["group"].values:
        m = re.fullmatch(r"(.+):f(\d+)", str(g))
        if m:
            found.setdefault(m.group(1), []).append((int(m.group(2)), str(g)))
    if not found:
        return None
    param, buckets = next(iter(found.items()))
    (lo, g_lo), (hi, g_hi) = min(buckets), max(buckets)
    return (f"On {d}, the most frequent words' rows of {param} (f{lo:02d}) contributed "
            f"{float(per.sel(group=g_lo)):+.3g} per parameter, the rarest (f{hi:02d}) "
            f"{float(per.sel(group=g_hi)):+.3g}.")


def findings(cube: xr.Dataset, cmp: xr.Dataset | None = None) -> list[str]:
    """One-sentence findings computed from ``cube`` (done steps, loaded) and a comparison."""
    have = groupings(cube)
    grouping, d = main_grouping(cube), main_dataset(cube)
    out = [_top_sentence(cube, grouping, name) for name in map(str, cube["dataset"].values)]
    out.append(_hurt_sentence(cube, grouping, d))
    if "transformer" in have:
        out += [_sparse_sentence(cube, d), _layer_sentence(cube, d)]
    if "frequency" in have:
        out.append(_frequency_sentence(cube, d))
    helped = float(helped_fraction(cube).sel(dataset=d).mean())
    out.append(f"On average {100 * helped:.1f}% of parameters helped (LCA < 0) per step on {d}.")
    err = float(relative_error(cube).sel(dataset=d))
    out.append(f"Σ LCA reproduces the measured loss change on {d} within {100 * err:.3f}% "
               "(relative error of the total).")
    if cmp is not None and d in as_str(cmp["dataset"].values).tolist():
        names = as_str(cmp["grouping_name"].values).tolist()
        g = grouping if grouping in names else names[0]
        tau = float(cmp["tau"].sel(grouping_name=g, dataset=d))
        out.append(f"Group rankings vs the reference: Kendall's τ = {tau:.3f} on {d} "
                   f"({g} grouping; Zhu et al. report 0.905).")
    return [s for s in out if s]
