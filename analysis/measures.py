"""Measures over groups: occupation, rank, helped fraction, loss reconstruction, relative error.

Plain functions behind ``.lca`` (see :mod:`analysis.ops` for the Dataset/DataArray rules).
Sums over groups are taken within ONE grouping: every grouping partitions all parameters, so
summing across groupings would count each parameter once per grouping.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from analysis.ops import XArray, grouping_labels, groupings, lca_of, one_grouping, select_done
from replay.errors import CubeError


def grouping_total(a: xr.DataArray) -> xr.DataArray:
    """Σ of ``a`` over the groups of each group's own grouping, broadcast back to ``a``'s dims."""
    key = xr.DataArray(grouping_labels(a), dims="group", coords={"group": a["group"]},
                       name="grouping")
    totals = a.drop_vars("grouping", errors="ignore").groupby(key).sum("group")
    back = totals.sel(grouping=key)  # (…, group): each group gets its grouping's total
    return back.drop_vars("grouping").transpose(*a.dims)


def occupation(x: XArray) -> xr.DataArray:
    """Occupation ratio (Zhu et al. Fig. 1): each group's share of its grouping's total.

    share[g] = lca[g] / Σ_{g' in grouping(g)} lca[g'], elementwise over the other dims, so the
    shares of one grouping sum to 1 whatever the sign of the total. When the total is negative
    (the loss went down) a group that helped has a positive share and a group that hurt a
    negative one; when the loss went up the roles swap. A zero total gives NaN. Apply it to
    totals (``total(x)``) for the paper's figure; on a Dataset it is computed per step.
    """
    a = lca_of(x)
    tot = grouping_total(a)
    out = a / tot.where(tot != 0)
    out.attrs = {"long_name": "occupation ratio", "units": "1"}
    return out.rename("occupation")


def rank_min(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1 = smallest; ties share the lowest rank ("1, 2, 2, 4").

    NaN gets rank NaN. Shape is kept; result is float64 (for the NaNs).
    """
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, axis=-1, kind="stable")  # NaN sorts last
    s = np.take_along_axis(v, order, axis=-1)
    pos = np.broadcast_to(np.arange(v.shape[-1]), v.shape)
    new = np.ones(v.shape, dtype=bool)
    new[..., 1:] = s[..., 1:] != s[..., :-1]
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=-1)  # start of each tie run
    ranks_sorted = (first + 1).astype(np.float64)
    ranks_sorted[np.isnan(s)] = np.nan
    out = np.empty_like(ranks_sorted)
    np.put_along_axis(out, order, ranks_sorted, axis=-1)
    return out


def rank(x: XArray) -> xr.DataArray:
    """Rank of each group within its grouping, 1 = most negative LCA (largest loss decrease).

    Elementwise over the other dims (apply to ``total(x)`` for a ranking of the whole run);
    tied groups share the best rank, NaN stays NaN.
    """
    a = lca_of(x)
    labels = grouping_labels(a)
    parts, order = [], []
    for name in groupings(a):
        idx = np.flatnonzero(labels == name)
        sub = a.isel(group=idx)
        if sub.chunks:
            sub = sub.chunk({"group": -1})  # ranking needs all of a grouping's groups at once
        parts.append(xr.apply_ufunc(rank_min, sub, input_core_dims=[["group"]],
                                    output_core_dims=[["group"]], dask="parallelized",
                                    output_dtypes=[np.float64]))
        order.append(idx)
    out = xr.concat(parts, "group").isel(group=np.argsort(np.concatenate(order)))
    out.attrs = {"long_name": "rank within grouping (1 = most loss decrease)"}
    return out.transpose(*a.dims).rename("rank")


def helped_fraction(x: XArray, grouping: str | None = None) -> xr.DataArray:
    """Fraction of parameters whose LCA < 0 per step and dataset, (S, D).

    Σ helped / Σ group_size over ``grouping`` (None: the cube's first; all give the same).
    ``x`` is a cube or its ``helped`` variable.
    """
    if isinstance(x, xr.Dataset):
        helped = select_done(x)["helped"]
    elif x.name == "helped":
        helped = x
    else:
        raise CubeError(f"helped_fraction() needs the cube or its 'helped' variable, "
                        f"got {x.name!r}")
    sub = one_grouping(helped, grouping)
    out = sub.sum("group") / float(sub["group_size"].sum())
    out.attrs = {"long_name": "fraction of parameters that helped", "units": "1"}
    return out.rename("helped_fraction")


def _check_chain(ds: xr.Dataset) -> None:
    steps = ds["step"].values
    ends = ds["step_end"].values
    gaps = np.flatnonzero(ends[:-1] != steps[1:])
    if gaps.size:
        warnings.warn(f"cube skips {gaps.size} interval(s) (first after step {steps[gaps[0]]}: "
                      f"ends at {ends[gaps[0]]}, next starts at {steps[gaps[0] + 1]}); the "
                      "reconstruction leaves out their loss change", UserWarning, stacklevel=3)


def loss_reconstruction(ds: xr.Dataset, grouping: str | None = None) -> xr.DataArray:
    """Loss rebuilt from LCA (Lan et al.): loss[0] + cumsum over steps of Σ_group lca, (S, D).

    Indexed by ``step`` = the ``step_end`` of each interval, i.e. the step whose parameters the
    value estimates, so it lines up with ``loss_next``. Warns when done steps do not chain.
    """
    if not isinstance(ds, xr.Dataset):
        raise CubeError("loss_reconstruction() needs the whole cube (it uses 'loss'), "
                        "not one of its arrays")
    ds = select_done(ds)
    _check_chain(ds)
    change = one_grouping(ds["lca"], grouping).sum("group").cumsum("step")
    start = ds["loss"].isel(step=0).drop_vars(["step", "step_end"], errors="ignore")
    out = (start + change).drop_vars("step_end", errors="ignore")
    out = out.assign_coords(step=ds["step_end"].values).transpose("step", ...)
    out.attrs = {"long_name": "loss reconstructed from LCA", "units": "loss units"}
    return out.rename("loss_reconstruction")


def relative_error(ds: xr.Dataset, grouping: str | None = None) -> xr.DataArray:
    """Relative error of the total loss change (Lan et al.'s "err"), per dataset (D,).

    |Σ_t Σ_g lca − Σ_t (loss_next − loss)| / |Σ_t (loss_next − loss)| over done steps. In exact
    mode the actual change telescopes to L(θ_end) − L(θ_start); in sampled mode each step's
    change is measured on that step's own sample, which is what its LCA decomposes.
    """
    if not isinstance(ds, xr.Dataset):
        raise CubeError("relative_error() needs the whole cube (it uses 'loss'), "
                        "not one of its arrays")
    ds = select_done(ds)
    recon = one_grouping(ds["lca"], grouping).sum(["group", "step"])
    actual = (ds["loss_next"] - ds["loss"]).sum("step")
    out = abs(recon - actual) / abs(actual).where(actual != 0)
    out.attrs = {"long_name": "relative error of the reconstructed loss change", "units": "1"}
    return out.rename("relative_error")


def actual_loss(ds: xr.Dataset) -> xr.DataArray:
    """Measured loss at each visited step, (S + 1, D): ``loss`` at every interval start, then
    ``loss_next`` at the last interval's end (the curve loss_reconstruction approximates)."""
    ds = select_done(ds)
    last = ds["loss_next"].isel(step=[-1]).drop_vars("step_end", errors="ignore")
    last = last.assign_coords(step=ds["step_end"].values[-1:])
    out = xr.concat([ds["loss"].drop_vars("step_end", errors="ignore"), last], "step")
    out.attrs = {"long_name": "loss", "units": "loss units"}
    return out.rename("loss")
