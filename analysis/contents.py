"""Which figures a report holds, planned from the groupings a cube (and its reference) carry.

Every cube gets the replay checks (loss reconstruction, residual, helped fraction). Every
grouping gets its cumulative LCA per group (totals and per parameter; Zhu et al.'s Fig. 5
lines for a grouping of frequency buckets) and its interval LCA along training (Eq. 3 windows:
lines for up to :data:`LINES_MAX` groups, a group × step heat map beyond) and, with a
reference cube holding the same grouping, its occupation ratios with Kendall's τ (bars for up
to :data:`BARS_MAX` groups, a scatter beyond). A model with layer stacks gets a layer-wise
figure; the ``transformer`` and ``sparse-dense`` groupings are drawn as Zhu et al.'s Figs. 1–4.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import xarray as xr

from analysis import diagnostics, figures, group_figures
from analysis.ops import as_str, groupings, select_grouping
from analysis.stacks import has_stacks

LINES_MAX = 10
BARS_MAX = group_figures.BARS_MAX
PAPER = ("transformer", "sparse-dense", "frequency")  # Zhu et al.'s groupings
CHECKS = "Replay checks"


@dataclass(frozen=True)
class Planned:
    """One figure of the report: ``draw(fig)`` fills a matplotlib Figure of ``size`` inches."""

    stem: str
    section: str
    title: str
    caption: str
    draw: Callable
    size: tuple[float, float] = (7.5, 4.2)


def is_bucketed(labels) -> bool:
    """A grouping of row buckets (``<param>:fNN`` labels, as the ``frequency`` preset makes)."""
    return sum(bool(figures.BUCKET.match(str(g))) for g in labels) >= 2


def _slug(name: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower() or "grouping"
    out, i = slug, 2
    while out in taken:
        out, i = f"{slug}-{i}", i + 1
    taken.add(out)
    return out


def _one(draw, *args, **kw):
    def render(fig):
        draw(*args, ax=fig.subplots(), **kw)
    return render


def _two(draw, *args, across: bool, **kw):
    """Totals and per-parameter values drawn by one figure function, side by side or stacked."""
    def render(fig):
        axes = fig.subplots(1, 2, sharey=True) if across else fig.subplots(2, 1, sharex=True)
        draw(*args, ax=axes[0], per_param=False, **kw)
        draw(*args, ax=axes[1], per_param=True, **kw)
        if axes[1].get_legend() is not None:  # the first panel's legend serves both
            axes[1].get_legend().remove()
        if across:
            axes[1].set_ylabel("")
        else:
            axes[0].set_xlabel("")
    return render


def _height(rows: int, per_row: float, base: float, cap: float = 14.0) -> float:
    return min(cap, base + per_row * rows)


def _checks(cube) -> list[Planned]:
    return [
        Planned("loss", CHECKS, "Loss and its reconstruction",
                "Measured loss (solid) and loss[0] + cumulative Σ LCA (dashed) per dataset.",
                _one(diagnostics.fig_loss, cube)),
        Planned("residual", CHECKS, "Residual per step",
                "ΔL − Σ LCA per interval: the quadrature error of the path integral.",
                _one(diagnostics.fig_residual, cube)),
        Planned("helped", CHECKS, "Parameters that helped",
                "Share of parameters with LCA < 0 in each interval.",
                _one(diagnostics.fig_helped, cube)),
    ]


def _layer_source(cube) -> str | None:
    for name in ("layer", "tensor"):
        if name in groupings(cube) and has_stacks(
                as_str(select_grouping(cube["group"], name)["group"].values)):
            return name
    return None


def _cumulative(cube, g: str, labels: list[str], stem: str, section: str) -> list[Planned]:
    n = len(labels)
    shown = min(n, BARS_MAX + 1)
    rows = shown * max(1, cube.sizes["dataset"] / 2)
    many = (f" The {BARS_MAX} groups of largest |total| on the main dataset are shown, most "
            f"negative first; the other {n - BARS_MAX} are summed into one bar."
            if n > BARS_MAX + 1 else "")
    if is_bucketed(labels):
        return [Planned(f"frequency-{stem}", section, f"Cumulative LCA by frequency bucket: {g}",
                        "Cumulative LCA per parameter of embedding rows by word-frequency "
                        "bucket, 1 = most frequent words (Zhu et al. Fig. 5).",
                        _one(figures.fig_frequency, cube, grouping=g))]
    paper = " The per-parameter panel is Zhu et al.'s Fig. 2." if g == "sparse-dense" else ""
    order = figures.SPARSE_DENSE if g == "sparse-dense" else None
    return [Planned(f"groups-{stem}", section, f"Cumulative LCA per group: {g} grouping",
                    "Σ LCA over the done steps per group: totals (left), which add up to the "
                    "loss change, and per parameter (right, Zhu et al. Eq. 4)." + many + paper,
                    _two(group_figures.fig_groups, cube, g, across=True, order=order),
                    size=(11.0, _height(rows, 0.28, 1.6)))]


def _intervals(cube, g: str, labels: list[str], stem: str, section: str) -> Planned:
    n = len(labels)
    title = f"Interval LCA along training: {g} grouping"
    if n <= LINES_MAX:
        paper = " (Zhu et al. Fig. 4)" if g == "transformer" else ""
        return Planned(f"intervals-{stem}", section, title,
                       "LCA per parameter of each group averaged over windows of steps "
                       f"(Zhu et al. Eq. 3){paper}, main dataset.",
                       _one(figures.fig_intervals, cube, grouping=g), size=(9.0, 4.6))
    rows = min(n, group_figures.ROWS_MAX + 1)
    many = (f" The {group_figures.ROWS_MAX} groups of largest |total| are rows of their own; "
            f"the other {n - group_figures.ROWS_MAX} are summed into one row."
            if n > group_figures.ROWS_MAX + 1 else "")
    return Planned(f"intervals-{stem}", section, title,
                   "LCA per parameter of each group averaged over windows of steps (Zhu et al. "
                   "Eq. 3), main dataset; blue lowered the loss, red raised it." + many,
                   _one(group_figures.fig_interval_heatmap, cube, g),
                   size=(9.0, _height(rows, 0.22, 1.8)))


def _occupation(cube, ref, g: str, labels: list[str], stem: str, section: str) -> Planned:
    title = f"Occupation ratio vs the reference: {g} grouping"
    paper = " (Zhu et al. Fig. 1)" if g == "transformer" else ""
    caption = (f"Each group's share of the total LCA in this cube and in the reference; τ = "
               f"Kendall's rank correlation of the two rankings{paper}.")
    if len(labels) <= BARS_MAX:
        wide = max(map(len, labels)) > 12  # rotated tensor names need room below the bars
        return Planned(f"occupation-{stem}", section, title, caption,
                       _one(figures.fig_occupation, cube, ref, grouping=g),
                       size=(9.0, 5.6) if wide else (7.5, 4.2))
    return Planned(f"occupation-{stem}", section, title, caption + " One point per group.",
                   _one(group_figures.fig_occupation_scatter, cube, ref, grouping=g),
                   size=(6.0, 5.4))


def plan(cube: xr.Dataset, ref: xr.Dataset | None) -> tuple[list[Planned], list[tuple[str, str]]]:
    """The figures for ``cube`` (done steps, loaded) and optional ``ref``, in report order, and
    ``(title, reason)`` for each figure left out."""
    have = groupings(cube)
    shared = groupings(ref) if ref is not None else []
    out, omitted, taken = _checks(cube), [], {"loss", "residual", "helped"}
    source = _layer_source(cube)
    if source is not None:
        out.append(Planned(
            "layers-stacks", "Layer stacks", "Cumulative LCA per layer",
            f"Σ LCA per layer of each layer stack ({source} grouping; a layer's groups add up), "
            "stack by stack in layer order, the other modules on the right: totals (top) and "
            "per parameter (bottom).", _two(group_figures.fig_layer_stacks, cube,
                                            grouping=source, across=False),
            size=(10.0, 7.0)))
    elif "layer" in have or "tensor" in have:
        omitted.append(("Cumulative LCA per layer", "no layer stack in the group labels (a "
                        "stack is a numbered name component, e.g. encoder.layers.3)"))
    for g in have:
        labels = as_str(select_grouping(cube["group"], g)["group"].values).tolist()
        stem, section = _slug(g, taken), f"{g} grouping"
        if g != source or g != "layer":  # the layer-wise figure shows every layer group
            out += _cumulative(cube, g, labels, stem, section)
        if g == "transformer" and any(figures.LAYER.match(x) for x in labels):
            out.append(Planned(f"layers-{stem}", section, "Layer-wise cumulative LCA",
                               "Cumulative LCA per parameter of each encoder and decoder layer "
                               "(Zhu et al. Fig. 3).", _one(figures.fig_layers, cube,
                                                            grouping=g)))
        out.append(_intervals(cube, g, labels, stem, section))
        if ref is not None and g in shared:
            out.append(_occupation(cube, ref, g, labels, stem, section))
        elif ref is not None:
            omitted.append((f"Occupation ratio vs the reference: {g} grouping",
                            f"the reference has no {g!r} grouping"))
    if ref is None:
        omitted.append(("Occupation ratios vs a reference", "needs a reference cube "
                        "(--compare OTHER)"))
    if any(g in have for g in PAPER):
        omitted += [(f"Zhu et al. figures of the {g!r} grouping", f"the cube has no {g!r} "
                     "grouping") for g in PAPER if g not in have]
    return out, omitted
