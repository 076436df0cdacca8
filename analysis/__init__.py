"""Analysis of LCA cubes: the ``.lca`` accessor, comparisons, figures and reports (docs/design.md §9).

``import analysis`` registers ``.lca`` on xarray Datasets and DataArrays. Public API:

- Cubes: :func:`open_cube`, :func:`check_cube`, :func:`provenance`, :func:`export_netcdf`.
- Selections and sums over steps (:mod:`analysis.ops`): :func:`select_done`,
  :func:`select_grouping`, :func:`groupings`, :func:`cumulative`, :func:`interval`,
  :func:`total`, :func:`smooth`, :func:`per_param`.
- Measures (:mod:`analysis.measures`): :func:`occupation`, :func:`rank`,
  :func:`helped_fraction`, :func:`loss_reconstruction`, :func:`relative_error`,
  :func:`actual_loss`.
- Comparison: :func:`compare`, :func:`kendall_tau_b`.
- Figures (matplotlib Axes; imported on first use): for any grouping :func:`fig_groups`,
  :func:`fig_intervals`, :func:`fig_interval_heatmap`, :func:`fig_occupation`,
  :func:`fig_occupation_scatter`, :func:`fig_layer_stacks`; Zhu et al.'s
  :func:`fig_sparse_dense`, :func:`fig_layers`, :func:`fig_frequency`; replay checks
  :func:`fig_loss`, :func:`fig_residual`, :func:`fig_helped`.
- Report: :func:`write_report` (imported on first use).
"""

from __future__ import annotations

import importlib

from analysis import accessor as _accessor  # noqa: F401  (registers the .lca accessor)
from analysis.compare import compare, kendall_tau_b
from analysis.cube import check_cube, export_netcdf, open_cube, provenance
from analysis.measures import (actual_loss, helped_fraction, loss_reconstruction, occupation,
                               rank, relative_error)
from analysis.ops import (cumulative, groupings, interval, per_param, select_done,
                          select_grouping, smooth, total)

# matplotlib is only imported when a figure or the report is asked for.
_LAZY = {
    "fig_occupation": "analysis.figures",
    "fig_sparse_dense": "analysis.figures",
    "fig_layers": "analysis.figures",
    "fig_intervals": "analysis.figures",
    "fig_frequency": "analysis.figures",
    "fig_groups": "analysis.group_figures",
    "fig_interval_heatmap": "analysis.group_figures",
    "fig_layer_stacks": "analysis.group_figures",
    "fig_occupation_scatter": "analysis.group_figures",
    "fig_loss": "analysis.diagnostics",
    "fig_residual": "analysis.diagnostics",
    "fig_helped": "analysis.diagnostics",
    "write_report": "analysis.report",
}

__all__ = [
    "open_cube", "check_cube", "provenance", "export_netcdf",
    "select_done", "select_grouping", "groupings", "cumulative", "interval", "total", "smooth",
    "per_param",
    "occupation", "rank", "helped_fraction", "loss_reconstruction", "relative_error",
    "actual_loss",
    "compare", "kendall_tau_b",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
