"""Shared plotting pieces: the colour-blind-safe palette, axes creation, bars and lines.

matplotlib is imported here (and by the figure modules), never by ``import analysis``. With
``ax=None`` a new pyplot figure is made (so IPython shows it); the report passes axes of
``matplotlib.figure.Figure`` objects it owns, which pyplot never sees.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.ops import groupings, select_grouping
from replay.errors import CubeError

# Okabe & Ito (2008), ordered so the first colours contrast most on white; yellow comes late.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000",
             "#F0E442")
LINESTYLES = ("-", "--", ":", "-.")
SIGN_NOTE = "< 0 = lowered the loss"


def style(i: int) -> dict:
    """Colour and line style of line ``i``: 7 colours, then the next line style (28 distinct).
    Yellow is left out: a thin yellow line is hard to see on white."""
    colours = OKABE_ITO[:7]
    return {"color": colours[i % len(colours)],
            "linestyle": LINESTYLES[(i // len(colours)) % len(LINESTYLES)]}


def new_axes(ax=None, figsize=(7.5, 4.2)):
    """``ax`` itself, or the axes of a new pyplot figure (constrained layout)."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def lca_label(*, per_param: bool, what: str = "cumulative LCA") -> str:
    """Y-axis label with units and the sign convention."""
    per = " per parameter" if per_param else ""
    return f"{what}{per}\n(loss units; {SIGN_NOTE})"


def require_grouping(cube: xr.Dataset | xr.DataArray, name: str, figure: str):
    """The cube's ``name`` grouping with short labels, or CubeError saying what to replay."""
    if name not in groupings(cube):
        have = ", ".join(groupings(cube)) or "none"
        raise CubeError(f"{figure} needs the {name!r} grouping; the cube has: {have}. "
                        f"Replay with the {name!r} grouping to draw it")
    return select_grouping(cube, name, strip=True)


def pick_datasets(cube, datasets=None) -> list[str]:
    """Dataset names to draw: all of the cube's (None), one name, or a list; checked."""
    have = [str(d) for d in cube["dataset"].values]
    if datasets is None:
        return have
    want = [datasets] if isinstance(datasets, str) else list(datasets)
    for d in want:
        if d not in have:
            raise CubeError(f"dataset {d!r} is not in the cube (it has: {', '.join(have)})")
    return want


def main_dataset(cube, dataset=None) -> str:
    """One dataset for single-dataset figures: the one asked for, else "train", else the first."""
    if dataset is not None:
        return pick_datasets(cube, dataset)[0]
    have = pick_datasets(cube)
    return "train" if "train" in have else have[0]


def grouped_bars(ax, values: np.ndarray, labels, series, *, legend_title: str | None = "dataset"):
    """Bars of ``values`` (G, N): G positions labelled ``labels``, one colour per series."""
    values = np.asarray(values, dtype=float).reshape(len(labels), len(series))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(labels))
    for j, name in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        ax.bar(x + offset, values[:, j], width, label=str(name),
               color=OKABE_ITO[j % len(OKABE_ITO)], edgecolor="white", linewidth=0.5)
    ax.axhline(0, color="0.3", linewidth=0.8)
    long = max((len(str(lab)) for lab in labels), default=0) > 8 or len(labels) > 10
    ax.set_xticks(x, [str(lab) for lab in labels], rotation=40 if long else 0,
                  ha="right" if long else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    if len(series) > 1:
        ax.legend(title=legend_title, fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return ax


def grouped_hbars(ax, values: np.ndarray, labels, series, *, legend: bool = True):
    """Horizontal bars of ``values`` (G, N): G rows labelled ``labels`` from the top down, one
    colour per series. Long labels (tensor names) stay readable on the y axis."""
    values = np.asarray(values, dtype=float).reshape(len(labels), len(series))
    height = 0.8 / max(len(series), 1)
    y = np.arange(len(labels))
    for j, name in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * height
        ax.barh(y + offset, values[:, j], height, label=str(name),
                color=OKABE_ITO[j % len(OKABE_ITO)], edgecolor="white", linewidth=0.5)
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_yticks(y, [str(lab) for lab in labels], fontsize="small")
    ax.set_ylim(len(labels) - 0.4, -0.6)  # first label on top
    if legend and len(series) > 1:
        ax.legend(title="dataset", fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    return ax


def _units(da: xr.DataArray) -> str:
    units = da.attrs.get("units") or ("loss units" if da.name in ("lca", "loss") else "")
    name = da.attrs.get("long_name") or da.name or "value"
    return f"{name} ({units})" if units else str(name)


def plot_lines(da: xr.DataArray, ax=None, *, dataset: str | None = None, top: int | None = 10):
    """One line per group along ``step`` for one dataset; only the ``top`` groups by |Σ|."""
    if "step" not in da.dims or "group" not in da.dims:
        raise CubeError(f"lines() needs 'step' and 'group' dimensions; the array has {da.dims}")
    title_ds = ""
    if "dataset" in da.dims:
        name = main_dataset(da, dataset)
        da = da.sel(dataset=name)
        title_ds = f" on {name}"
    da = da.load()
    if top is not None and da.sizes["group"] > top:
        keep = np.argsort(-np.abs(np.nan_to_num(da.sum("step").values)))[:top]
        da = da.isel(group=np.sort(keep))
    ax = new_axes(ax)
    for i, g in enumerate(da["group"].values):
        ax.plot(da["step"].values, da.sel(group=g).values, label=str(g), **style(i))
    ax.set_xlabel("training step")
    ax.set_ylabel(_units(da))
    ax.set_title(f"{da.name or 'value'} per group{title_ds}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    return ax


def plot_bars(da: xr.DataArray, ax=None):
    """Bars per group, one colour per dataset, for an array without ``step`` (e.g. a total)."""
    if "step" in da.dims or "group" not in da.dims:
        raise CubeError(f"bars() needs a 'group' dimension and no 'step' (sum first, e.g. "
                        f".lca.total()); the array has {da.dims}")
    da = da.load()
    series = [str(d) for d in da["dataset"].values] if "dataset" in da.dims else [da.name or ""]
    values = da.transpose("group", ...).values.reshape(da.sizes["group"], -1)
    ax = new_axes(ax)
    grouped_bars(ax, values, da["group"].values, series)
    ax.set_xlabel("group")
    ax.set_ylabel(_units(da))
    ax.set_title(f"{da.name or 'value'} per group")
    return ax
