"""Keeping many groups readable: the largest few groups, the others summed into one "rest" group.

A grouping can hold hundreds of groups (one per tensor, 25 frequency buckets per embedding
matrix). Figures and tables show the ``k`` groups of largest |total LCA| and one group that
adds up all the others, values and ``group_size`` alike, so totals still sum to the loss change
and per-parameter values of the rest are Σ lca / Σ |g|.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.ops import as_str


def largest(values, k: int) -> np.ndarray:
    """Positions of the ``k`` largest |values| (1-D, NaN counts as 0), in their original order."""
    v = np.abs(np.nan_to_num(np.asarray(values, dtype=np.float64)))
    if v.size <= k:
        return np.arange(v.size)
    return np.sort(np.argsort(-v, kind="stable")[:k])


def rest_label(n: int) -> str:
    return f"{n} other group{'s' if n != 1 else ''}"


def condense(a: xr.DataArray, keep) -> xr.DataArray:
    """``a`` (…, group, …) reduced to the groups at positions ``keep`` plus one group labelled
    ``N other groups`` holding the sum over the others (values and ``group_size``).

    Other group coordinates (``grouping``) are kept for the kept groups and taken from the first
    summed group for the rest. With nothing left over, ``a`` at ``keep`` is returned.
    """
    keep = np.asarray(keep, dtype=int)
    others = np.setdiff1d(np.arange(a.sizes["group"]), keep)
    kept = a.isel(group=keep)
    if others.size == 0:
        return kept
    drop = [c for c in a.coords if "group" in a[c].dims and c != "group"]
    summed = a.isel(group=others).drop_vars(drop).sum("group", keep_attrs=True, min_count=1)
    summed = summed.expand_dims(group=[rest_label(others.size)])
    coords = {}
    if "group_size" in a.coords:
        coords["group_size"] = ("group", [int(a["group_size"].values[others].sum())])
    for c in drop:
        if c != "group_size":
            coords[c] = ("group", [a[c].values[others[0]]])
    summed = summed.assign_coords(coords)
    kept = kept.assign_coords(group=as_str(kept["group"].values))
    out = xr.concat([kept, summed], "group", coords="minimal", compat="override")
    return out.transpose(*a.dims)


def top(a: xr.DataArray, k: int, by: xr.DataArray | None = None) -> xr.DataArray:
    """``a`` with at most ``k`` groups plus a rest group: the ``k`` of largest |``by``|
    (a 1-D (group,) array; default: ``a`` itself, which must then be 1-D over group)."""
    ranking = a if by is None else by
    if ranking.dims != ("group",):
        raise ValueError(f"top() ranks by a 1-D (group,) array, got dims {ranking.dims}")
    if a.sizes["group"] <= k + 1:  # a rest of one group says less than the group itself
        return a
    return condense(a, largest(ranking.values, k))
