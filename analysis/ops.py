"""Selections and sums over steps: the plain functions behind ``.lca`` (one concept each).

Every function takes a cube (``xr.Dataset``, docs/design.md §7) or one of its arrays (``xr.DataArray``).
On a Dataset the functions that return numbers act on its ``lca`` variable restricted to the
done steps (:func:`select_done`); on a DataArray they act on the array as given, so select
``.lca.done()`` first when it may hold steps that are not done (their values are NaN).
Shapes below use S steps, G groups, D datasets.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from replay.errors import CubeError

XArray = xr.Dataset | xr.DataArray


def as_str(values) -> np.ndarray:
    """Labels as an object array of Python str (zarr gives numpy 2 StringDType, which does
    not cast with ``astype(str)``)."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=object)


def select_done(x: XArray) -> XArray:
    """The steps whose replay finished (``done``), same type as ``x``.

    A Dataset uses its ``done`` variable; a DataArray uses a ``done`` coordinate when it has one,
    otherwise, if it is float, the steps where it is not all NaN (this computes the array).
    Raises CubeError when no step is done.
    """
    if "step" not in x.dims:
        return x
    if "done" in x.coords or (isinstance(x, xr.Dataset) and "done" in x.data_vars):
        mask = np.asarray(x["done"].values, dtype=bool)
    elif not np.issubdtype(x.dtype, np.floating):
        raise CubeError(f"cannot tell done steps from the {x.dtype} array {x.name!r} (only "
                        "float data is NaN when not done): take it from cube.lca.done()")
    else:
        other = [d for d in x.dims if d != "step"]
        mask = np.asarray(x.notnull().any(other).values, dtype=bool)
    if not mask.any():
        raise CubeError(f"cube has no done steps (0 of {x.sizes['step']}): run or resume "
                        "`lca replay` before analysing it")
    if mask.all():
        return x
    return x.isel(step=np.flatnonzero(mask))


def lca_of(x: XArray) -> xr.DataArray:
    """The LCA array to compute on: a Dataset's done ``lca`` variable, or the DataArray itself."""
    if isinstance(x, xr.Dataset):
        if "lca" not in x.data_vars:
            raise CubeError("dataset has no 'lca' variable: is it an LCA cube (open_cube)?")
        return select_done(x)["lca"]
    return x


def groupings(x: XArray) -> list[str]:
    """Names of the groupings in ``x``, in the order their groups first appear."""
    return list(dict.fromkeys(grouping_labels(x).tolist()))


def grouping_labels(x: XArray) -> np.ndarray:
    """Per-group grouping name (G,): the ``grouping`` coordinate, else the label prefix."""
    if "group" not in x.dims:
        raise CubeError(f"array has no 'group' dimension (dims {x.dims}): group operations "
                        "need the groups, so apply them before summing over 'group'")
    if "grouping" in x.coords:
        return as_str(x["grouping"].values)
    return np.array([g.split("/", 1)[0] for g in as_str(x["group"].values)], dtype=object)


def select_grouping(x: XArray, name: str, *, strip: bool = True) -> XArray:
    """The groups of grouping ``name`` (e.g. "transformer"), same type as ``x``.

    With ``strip`` (default) labels lose their ``"name/"`` prefix ("transformer/de_2" ->
    "de_2"); the ``grouping`` coordinate is kept either way, so later per-grouping sums still
    know where the groups came from.
    """
    labels = grouping_labels(x)
    idx = np.flatnonzero(labels == name)
    if idx.size == 0:
        have = ", ".join(groupings(x)) or "none"
        raise CubeError(f"grouping {name!r} is not in the cube (it has: {have}); "
                        f"replay with groupings including {name!r}")
    out = x.isel(group=idx)
    if "grouping" not in out.coords:
        out = out.assign_coords(grouping=("group", labels[idx]))
    if strip:
        prefix = name + "/"
        short = [g[len(prefix):] if g.startswith(prefix) else g
                 for g in as_str(out["group"].values)]
        out = out.assign_coords(group=np.array(short, dtype=object))
    return out


def one_grouping(x: XArray, grouping: str | None) -> XArray:
    """Restrict ``x`` to one grouping so that sums over groups count each parameter once.

    ``None`` means the first grouping of the cube; since every grouping partitions all the
    parameters, any grouping gives the same totals (up to float rounding).
    """
    names = groupings(x)
    if not names:
        raise CubeError("cube has no groups")
    return select_grouping(x, grouping or names[0], strip=False)


def _need_step(a: xr.DataArray, what: str) -> None:
    if "step" not in a.dims:
        raise CubeError(f"{what} needs a 'step' dimension; this array has dims {a.dims}")


def cumulative(x: XArray) -> xr.DataArray:
    """Cumulative LCA over steps (S, G, D): value at step t = Σ over done steps ≤ t.

    Indexed by interval start; the sum covers the loss change up to ``step_end``.
    """
    a = lca_of(x)
    _need_step(a, "cumulative()")
    return a.cumsum("step", keep_attrs=True)


def interval(x: XArray, start: int | None = None, stop: int | None = None) -> xr.DataArray:
    """Interval LCA (Zhu et al. Eq. 2): Σ over steps t with start ≤ t < stop, (G, D).

    ``None`` leaves that end open. The last interval summed ends at its ``step_end``, which
    can lie past ``stop`` when ``stop`` is not a recorded step.
    """
    a = lca_of(x)
    _need_step(a, "interval()")
    steps = a["step"].values
    keep = np.ones(steps.shape, dtype=bool)
    if start is not None:
        keep &= steps >= start
    if stop is not None:
        keep &= steps < stop
    if not keep.any():
        raise CubeError(f"no done steps in [{start}, {stop}): the cube has steps "
                        f"{steps.min()}..{steps.max()}")
    return a.isel(step=np.flatnonzero(keep)).sum("step", keep_attrs=True)


def total(x: XArray) -> xr.DataArray:
    """Total LCA over all (done) steps, (G, D): each group's share of the whole loss change."""
    return interval(x)


def smooth(x: XArray, n: int) -> xr.DataArray:
    """Mean over consecutive windows of ``n`` steps (Zhu et al. Eq. 3), (S // n, G, D).

    Windows are taken over the cube's rows in order and labelled by the step that starts them
    (``step_end`` becomes the end of the window's last interval). A trailing window shorter
    than ``n`` is dropped, as in Eq. 3. With a recording every k updates each row already
    spans k updates, so a window spans n·k updates.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"smooth(n) needs a positive integer window, got {n!r}")
    a = lca_of(x)
    _need_step(a, "smooth()")
    if a.sizes["step"] < n:
        raise CubeError(f"smooth(n={n}) needs at least {n} done steps; the cube has "
                        f"{a.sizes['step']}: use a smaller n")
    funcs = {"step": "min"}
    if "step_end" in a.coords:
        funcs["step_end"] = "max"
    return a.coarsen(step=int(n), boundary="trim", coord_func=funcs).mean(keep_attrs=True)


def per_param(x: XArray) -> xr.DataArray:
    """LCA per parameter (Zhu et al. Eq. 4): values ÷ ``group_size`` |g|, same dims."""
    a = lca_of(x)
    if "group_size" not in a.coords:
        raise CubeError("per_param() needs the 'group_size' coordinate on the group dimension")
    out = a / a["group_size"]
    out.attrs = dict(a.attrs)
    return out.rename(a.name)
