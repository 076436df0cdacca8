"""Figures that check a replay (Lan et al.): loss vs its LCA reconstruction, the residual per
step, and the fraction of parameters that helped. Each ``fig_xxx(cube, ax=None) -> Axes``."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from analysis.cube import provenance
from analysis.measures import actual_loss, helped_fraction, loss_reconstruction, relative_error
from analysis.ops import select_done
from analysis.plotting import OKABE_ITO, new_axes, pick_datasets


def fig_loss(cube: xr.Dataset, ax=None, *, datasets=None, grouping: str | None = None):
    """Measured loss (solid) and loss[0] + cumulative Σ LCA (dashed) per dataset; the legend
    gives each dataset's relative error of the total change."""
    names = pick_datasets(cube, datasets)
    measured = actual_loss(cube).sel(dataset=names).load()
    recon = loss_reconstruction(cube, grouping).sel(dataset=names).load()
    err = relative_error(cube, grouping).sel(dataset=names).load()
    # Sampled gradients measure each step's loss on that step's own sample.
    sampled = provenance(cube)["gradient"].get("mode") == "sampled"
    ax = new_axes(ax)
    for i, name in enumerate(names):
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        ax.plot(measured["step"].values, measured.sel(dataset=name).values, color=colour,
                label=f"{name}: measured" + (" (per-step samples)" if sampled else ""))
        # The reconstruction starts where the measured curve does: prepend its anchor point.
        x = np.concatenate([measured["step"].values[:1], recon["step"].values])
        y = np.concatenate([measured.sel(dataset=name).values[:1],
                            recon.sel(dataset=name).values])
        ax.plot(x, y, color=colour, linestyle="--",
                label=f"{name}: from LCA (err {100 * float(err.sel(dataset=name)):.2g}%)")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (loss units)")
    ax.set_title("Loss and its reconstruction from LCA")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def _tolerance(cube: xr.Dataset) -> float | None:
    if cube.attrs.get("quadrature") != "adaptive":
        return None
    tol = cube.attrs.get("tolerance")
    try:
        tol = json.loads(tol) if isinstance(tol, str) else tol
        return float(tol) if tol is not None else None
    except (TypeError, ValueError):
        return None


def fig_residual(cube: xr.Dataset, ax=None, *, datasets=None):
    """Residual (loss_next − loss) − Σ LCA per step and dataset: the quadrature error.
    With adaptive quadrature the ±tolerance band is drawn."""
    names = pick_datasets(cube, datasets)
    res = select_done(cube)["residual"].sel(dataset=names).load()
    ax = new_axes(ax)
    for i, name in enumerate(names):
        ax.plot(res["step"].values, res.sel(dataset=name).values, marker=".", markersize=3,
                linewidth=0.8, color=OKABE_ITO[i % len(OKABE_ITO)], label=name)
    tol = _tolerance(cube)
    if tol:
        for sign in (1, -1):
            ax.axhline(sign * tol, color="0.4", linestyle=":", linewidth=1,
                       label="± tolerance" if sign > 0 else None)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("training step (interval start)")
    ax.set_ylabel("residual ΔL − ΣLCA (loss units)")
    ax.set_title("Residual of the loss change per step")
    ax.legend(fontsize="small", title="dataset")
    ax.grid(alpha=0.3)
    return ax


def fig_helped(cube: xr.Dataset, ax=None, *, datasets=None, grouping: str | None = None):
    """Percentage of parameters whose LCA < 0 (helped) per step, per dataset; 50% marked."""
    names = pick_datasets(cube, datasets)
    frac = helped_fraction(cube, grouping).sel(dataset=names).load()
    ax = new_axes(ax)
    for i, name in enumerate(names):
        ax.plot(frac["step"].values, 100 * frac.sel(dataset=name).values, marker=".",
                markersize=3, linewidth=0.8, color=OKABE_ITO[i % len(OKABE_ITO)], label=name)
    ax.axhline(50, color="0.4", linestyle=":", linewidth=1, label="50%")
    ax.set_xlabel("training step (interval start)")
    ax.set_ylabel("parameters that helped (%)")
    ax.set_title("Fraction of parameters that helped (LCA < 0) per step")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
