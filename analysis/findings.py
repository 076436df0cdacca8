"""One-sentence findings for the report, computed from a (done, loaded) cube of any model.

Generic findings speak of the report's *main grouping* (a user's own grouping first, then the
presets from the coarsest): which groups lowered the loss most overall and per parameter,
which raised it, when the loss change happened, which layer of each layer stack contributed
most; the Transformer groupings add Zhu et al.'s observations. ``Table`` is the report's table
type: ``(headers, rows)`` of formatted strings (see :mod:`analysis.tables`).
"""

from __future__ import annotations

import re

import numpy as np
import xarray as xr

from analysis.measures import helped_fraction, relative_error
from analysis.ops import as_str, groupings, per_param, select_grouping, total
from analysis.plotting import main_dataset
from analysis.stacks import by_layer, has_stacks, stack_name

Table = tuple[list[str], list[list[str]]]
PRESETS = ("transformer", "sparse-dense", "layer", "tensor")  # coarsest first
BUCKET = re.compile(r"(.+):f(\d+)")


def _bucketed(cube, name: str) -> bool:
    labels = as_str(select_grouping(cube["group"], name)["group"].values)
    return sum(bool(BUCKET.fullmatch(g)) for g in labels) >= 2


def main_grouping(cube: xr.Dataset) -> str:
    """The grouping the findings speak of: the first user grouping (not a preset, not row
    buckets), else the coarsest preset present, else the cube's first grouping."""
    have = groupings(cube)
    user = [g for g in have if g not in PRESETS and g != "frequency" and not _bucketed(cube, g)]
    return next(iter(user), None) or next((g for g in PRESETS if g in have), have[0])


def _direction(total_change: float) -> str:
    return "decrease" if total_change < 0 else "increase"


def _values(items, fmt="+.3g") -> str:
    return ", ".join(f"{g} ({v:{fmt}})" for g, v in items)


def _top_sentence(cube: xr.Dataset, grouping: str, d: str) -> str:
    tot = total(select_grouping(cube, grouping)).sel(dataset=d)
    net = float(tot.sum())
    i = int(np.argmin(tot.values) if net < 0 else np.argmax(tot.values))
    share = float(tot[i]) / net if net else float("nan")
    return (f"{grouping} group {tot['group'].values[i]} contributed most: {100 * share:.0f}% "
            f"of the loss {_direction(net)} on {d}.")


def _helped_sentence(cube: xr.Dataset, grouping: str, d: str, k: int = 3) -> str | None:
    tot = total(select_grouping(cube, grouping)).sel(dataset=d)
    order = [i for i in np.argsort(tot.values, kind="stable")[:k] if tot.values[i] < 0]
    if tot.sizes["group"] < 2 or not order:
        return None
    return (f"The {grouping} groups that lowered the loss on {d} most (total LCA): "
            f"{_values((tot['group'].values[i], float(tot[i])) for i in order)}.")


def _per_param_sentence(cube: xr.Dataset, grouping: str, d: str) -> str | None:
    tot = total(select_grouping(cube, grouping)).sel(dataset=d)
    if tot.sizes["group"] < 2:
        return None
    per = per_param(tot)
    i = int(np.argmin(per.values))
    mean = float(tot.sum()) / float(tot["group_size"].sum())
    ratio = f", {float(per[i]) / mean:.1f}× the {grouping} average" if mean < 0 else ""
    return (f"Per parameter, {grouping} group {tot['group'].values[i]} lowered the loss on {d} "
            "most: "
            f"{float(per[i]):+.3g} per parameter ({int(tot['group_size'][i])} parameters"
            f"{ratio}).")


def _hurt_sentence(cube: xr.Dataset, grouping: str, d: str) -> str | None:
    tot = total(select_grouping(cube, grouping)).sel(dataset=d)
    order = np.argsort(-tot.values, kind="stable")
    hurt = [(str(tot["group"].values[i]), float(tot[i])) for i in order if tot.values[i] > 0]
    if not hurt:
        return f"Every {grouping} group lowered the loss on {d} over the run."
    return (f"{len(hurt)} of {tot.sizes['group']} {grouping} groups raised the loss on {d} "
            f"over the run: {_values(hurt[:5])}{' …' if len(hurt) > 5 else ''}.")


def _when_sentence(cube: xr.Dataset, grouping: str, d: str) -> str | None:
    """When the net change (Σ LCA) happened: the steps by which half and 90% of it were made."""
    per_step = select_grouping(cube["lca"], grouping).sel(dataset=d).sum("group").values  # (S,)
    net = float(per_step.sum())
    if per_step.size < 2 or net == 0:
        return None
    frac = np.cumsum(per_step) / net
    ends = cube["step_end"].values
    at = [int(ends[int(np.argmax(frac >= q))]) for q in (0.5, 0.9)]
    big = int(np.argmax(np.abs(per_step)))
    return (f"Half of the net loss {_direction(net)} on {d} (Σ LCA {net:+.4g}) was reached by "
            f"step {at[0]}, 90% by step {at[1]} (steps {int(cube['step'].values[0])}.."
            f"{int(ends[-1])}); the largest change in one interval was "
            f"{per_step[big]:+.3g}, at steps {int(cube['step'].values[big])}→{int(ends[big])}.")


def _stack_sentence(cube: xr.Dataset, d: str) -> str | None:
    source = next((g for g in ("layer", "tensor") if g in groupings(cube)), None)
    if source is None:
        return None
    tot = total(select_grouping(cube, source)).sel(dataset=d)
    if not has_stacks(as_str(tot["group"].values)):
        return None
    layers, _ = by_layer(tot)
    per = per_param(layers)
    parts = []
    for s in list(dict.fromkeys(as_str(layers["stack"].values)))[:3]:
        idx = np.flatnonzero(as_str(layers["stack"].values) == s)
        if idx.size < 2:
            continue
        vals = per.values[idx]
        best, worst = idx[int(np.argmin(vals))], idx[int(np.argmax(vals))]
        parts.append(f"of stack {stack_name(s)}, layer {int(layers['number'][best])} lowered "
                     f"the loss most ({float(per[best]):+.3g}) and layer "
                     f"{int(layers['number'][worst])} least ({float(per[worst]):+.3g})")
    if not parts:
        return None
    return f"Per parameter on {d} ({source} grouping): " + "; ".join(parts) + "."


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


def _frequency_sentence(cube: xr.Dataset, grouping: str, d: str) -> str | None:
    per = per_param(total(select_grouping(cube, grouping))).sel(dataset=d)
    found = {}
    for g in per["group"].values:
        m = BUCKET.fullmatch(str(g))
        if m:
            found.setdefault(m.group(1), []).append((int(m.group(2)), str(g)))
    if not found:
        return None
    param, buckets = next(iter(found.items()))
    (lo, g_lo), (hi, g_hi) = min(buckets), max(buckets)
    return (f"On {d}, the most frequent words' rows of {param} (f{lo:02d}) contributed "
            f"{float(per.sel(group=g_lo)):+.3g} per parameter, the rarest (f{hi:02d}) "
            f"{float(per.sel(group=g_hi)):+.3g} ({grouping} grouping).")


def _tau_sentence(cmp: xr.Dataset, d: str) -> str | None:
    if d not in as_str(cmp["dataset"].values).tolist():
        return None
    taus = [(str(g), float(cmp["tau"].sel(grouping_name=g, dataset=d)))
            for g in as_str(cmp["grouping_name"].values)]
    return (f"Kendall's τ of the group rankings vs the reference on {d}: "
            + ", ".join(f"{g} {t:.3f}" for g, t in taus)
            + " (Zhu et al. report 0.905 for a Transformer's modules).")


def partial_sentence(done: int, of: int) -> str | None:
    """The note a report on a cube still being filled opens with (None when complete)."""
    if done >= of:
        return None
    return (f"Partial cube: {done} of {of} intervals are done; everything below covers the done "
            "steps only. Run `lca replay` on the cube again to finish it.")


def findings(cube: xr.Dataset, cmp: xr.Dataset | None = None, *,
             all_steps: int | None = None) -> list[str]:
    """One-sentence findings computed from ``cube`` (done steps, loaded) and a comparison;
    ``all_steps``: the cube's step count before selecting done steps (for the partial note)."""
    have = groupings(cube)
    grouping, d = main_grouping(cube), main_dataset(cube)
    out = [partial_sentence(cube.sizes["step"], all_steps or cube.sizes["step"])]
    out += [_top_sentence(cube, grouping, name) for name in map(str, cube["dataset"].values)]
    out += [_helped_sentence(cube, grouping, d), _per_param_sentence(cube, grouping, d),
            _hurt_sentence(cube, grouping, d), _when_sentence(cube, grouping, d),
            _stack_sentence(cube, d)]
    if "transformer" in have:
        out += [_sparse_sentence(cube, d), _layer_sentence(cube, d)]
    out += [_frequency_sentence(cube, g, d) for g in have if _bucketed(cube, g)][:1]
    helped = float(helped_fraction(cube).sel(dataset=d).mean())
    out.append(f"On average {100 * helped:.1f}% of parameters helped (LCA < 0) per step on {d}.")
    err = float(relative_error(cube).sel(dataset=d))
    out.append(f"Σ LCA reproduces the measured loss change on {d} within {100 * err:.3f}% "
               "(relative error of the total).")
    if cmp is not None:
        out.append(_tau_sentence(cmp, d))
    return [s for s in out if s]
