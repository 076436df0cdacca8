"""Comparing two cubes: Kendall's τ of group rankings, per-group error, sign agreement.

Zhu et al. §3.2 validate sampled LCA against the exact computation by the rank correlation of
the modules' occupation ratios (τ = 0.905). ``compare(a, b)`` gives that number per grouping
and dataset, with ``b`` as the reference (e.g. ``a`` sampled, ``b`` exact).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.cube import describe
from analysis.measures import occupation
from analysis.ops import as_str, grouping_labels, groupings, select_done, total
from replay.errors import CubeError


def kendall_tau_b(x, y) -> float:
    """Kendall's τ-b of two equal-length 1-D sequences (pairs with a NaN are dropped).

    τ_b = (n_c − n_d) / sqrt((n_0 − n_1)(n_0 − n_2)), where n_1, n_2 count pairs tied in x,
    in y. Returns NaN when fewer than 2 pairs remain or one side is constant. O(n²) pairs,
    taken in blocks of rows so memory stays O(block · n).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau_b needs equal lengths, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = x.size
    if n < 2:
        return float("nan")
    s = untied_x = untied_y = 0
    block = max(1, 2**22 // n)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sx = np.sign(x[lo:hi, None] - x[None, :])  # (block, n): sign of every pair (i, j)
        sy = np.sign(y[lo:hi, None] - y[None, :])
        upper = np.arange(lo, hi)[:, None] < np.arange(n)[None, :]  # each pair once: i < j
        s += int((sx * sy)[upper].sum())
        untied_x += int(np.abs(sx)[upper].sum())
        untied_y += int(np.abs(sy)[upper].sum())
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return s / float(np.sqrt(float(untied_x) * float(untied_y)))


def _common(a: xr.DataArray, b: xr.DataArray) -> list[str]:
    """Labels of ``a`` also in ``b``, in ``a``'s order."""
    other = set(as_str(b.values).tolist())
    return [v for v in as_str(a.values).tolist() if v in other]


def _align(a: xr.Dataset, b: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    a, b = select_done(a), select_done(b)
    steps = np.intersect1d(a["step"].values, b["step"].values)
    groups = _common(a["group"], b["group"])
    datasets = _common(a["dataset"], b["dataset"])
    for what, common in (("done steps", steps), ("groups", groups), ("datasets", datasets)):
        if len(common) == 0:
            raise CubeError(f"the two cubes have no {what} in common: compare cubes replayed "
                            "from the same trajectory with the same groupings and datasets")
    a = a.sel(step=steps)
    b = b.sel(step=steps)
    if not np.array_equal(a["step_end"].values, b["step_end"].values):
        raise CubeError("the two cubes replay different intervals (step_end differs on common "
                        "steps): compare cubes made from the same trajectory")
    return a, b


def compare(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Compare cube ``a`` with the reference cube ``b`` over their common done steps.

    Aligns on step, group and dataset (inner join; CubeError if one has nothing in common).
    Occupation ratios are taken within each cube's whole grouping before the join.
    Returns a Dataset with
      lca_a, lca_b (group, dataset): total LCA over the common steps (loss units);
      occupation_a, occupation_b (group, dataset): shares of each grouping's total;
      relative_error (group, dataset): |lca_a − lca_b| / |lca_b| (NaN where lca_b = 0);
      sign_agree (group, dataset): both totals have the same sign;
      tau (grouping_name, dataset): Kendall's τ-b of the occupation rankings;
      sign_agreement (grouping_name, dataset): fraction of groups whose signs agree;
      n_groups (grouping_name): groups compared.
    (``grouping_name`` is a dimension of its own: ``grouping`` stays the per-group coordinate.)
    Attributes ``a`` and ``b`` describe the two runs.
    """
    a_al, b_al = _align(a, b)
    ta, tb = total(a_al), total(b_al)  # totals over the common steps, whole groupings
    oa, ob = occupation(ta), occupation(tb)
    common = _common(ta["group"], tb["group"])
    datasets = _common(ta["dataset"], tb["dataset"])

    def pick(arr):
        return arr.sel(group=common, dataset=datasets).load()

    ta, tb, oa, ob = pick(ta), pick(tb), pick(oa), pick(ob)
    labels = grouping_labels(ta)
    names = groupings(ta)
    tau = np.full((len(names), len(datasets)), np.nan)
    agree_frac = np.full_like(tau, np.nan)
    sign_agree = np.sign(ta.values) == np.sign(tb.values)
    for i, name in enumerate(names):
        idx = np.flatnonzero(labels == name)
        for j in range(len(datasets)):
            tau[i, j] = kendall_tau_b(oa.values[idx, j], ob.values[idx, j])
            agree_frac[i, j] = sign_agree[idx, j].mean()
    group_coords = {k: v for k, v in ta.coords.items() if "group" in v.dims}
    gd = ("group", "dataset")
    out = xr.Dataset(
        {
            "lca_a": (gd, ta.values, {"long_name": "total LCA of a", "units": "loss units"}),
            "lca_b": (gd, tb.values, {"long_name": "total LCA of b", "units": "loss units"}),
            "occupation_a": (gd, oa.values, {"long_name": "occupation ratio of a"}),
            "occupation_b": (gd, ob.values, {"long_name": "occupation ratio of b"}),
            "relative_error": (gd, np.abs(ta.values - tb.values)
                               / np.where(tb.values != 0, np.abs(tb.values), np.nan),
                               {"long_name": "|lca_a - lca_b| / |lca_b|"}),
            "sign_agree": (gd, sign_agree),
            "tau": (("grouping_name", "dataset"), tau,
                    {"long_name": "Kendall's tau-b of occupation rankings"}),
            "sign_agreement": (("grouping_name", "dataset"), agree_frac,
                               {"long_name": "fraction of groups whose LCA signs agree"}),
            "n_groups": ("grouping_name", [int((labels == n).sum()) for n in names]),
        },
        coords={**group_coords, "dataset": datasets, "grouping_name": names},
    )
    steps = a_al["step"].values
    out.attrs = {
        "a": describe(a),
        "b": describe(b) + " (reference)",
        "steps": f"{steps.min()}..{a_al['step_end'].values.max()} "
                 f"({steps.size} common done intervals)",
        "note": "lca_* are total LCA over the common steps; tau compares occupation rankings",
    }
    return out
