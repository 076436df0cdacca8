"""The ``.lca`` accessor: thin methods over the plain functions of ops, measures and figures.

Registered on ``xr.Dataset`` and ``xr.DataArray`` by ``import analysis``::

    cube = analysis.open_cube("runs/x/cube.zarr")
    cube.lca.grouping("transformer").lca.total().lca.occupation()   # (group, dataset)
    cube.lca.loss_reconstruction()                                   # (step, dataset)
    cube.lca.plot.layers()                                           # matplotlib Axes

On a Dataset, methods returning numbers act on its ``lca`` variable over the done steps;
on a DataArray they act on the array as it is (see :mod:`analysis.ops`). Because ``cube.lca``
is the accessor, the cube's ``lca`` variable is reached as ``cube["lca"]``.
"""

from __future__ import annotations

import xarray as xr

from analysis import measures, ops


class _Common:
    """Methods shared by the Dataset and DataArray accessors."""

    def __init__(self, obj):
        self._obj = obj

    def done(self):
        """Only the steps whose replay finished (same type)."""
        return ops.select_done(self._obj)

    def grouping(self, name: str, *, strip: bool = True):
        """Only the groups of grouping ``name``; ``strip`` drops the ``name/`` label prefix."""
        return ops.select_grouping(self._obj, name, strip=strip)

    @property
    def groupings(self) -> list[str]:
        """Names of the groupings present, in cube order."""
        return ops.groupings(self._obj)

    def cumulative(self) -> xr.DataArray:
        """Cumulative LCA over steps (step, group, dataset)."""
        return ops.cumulative(self._obj)

    def interval(self, start: int | None = None, stop: int | None = None) -> xr.DataArray:
        """Σ LCA over steps in [start, stop) (group, dataset)."""
        return ops.interval(self._obj, start, stop)

    def total(self) -> xr.DataArray:
        """Σ LCA over all steps (group, dataset)."""
        return ops.total(self._obj)

    def smooth(self, n: int) -> xr.DataArray:
        """Mean over windows of n steps, labelled by window start (Zhu et al. Eq. 3)."""
        return ops.smooth(self._obj, n)

    def per_param(self) -> xr.DataArray:
        """LCA ÷ group size (Zhu et al. Eq. 4)."""
        return ops.per_param(self._obj)

    def occupation(self) -> xr.DataArray:
        """Each group's share of its grouping's total (shares sum to 1 per grouping)."""
        return measures.occupation(self._obj)

    def rank(self) -> xr.DataArray:
        """Rank within grouping, 1 = most negative LCA (most loss decrease)."""
        return measures.rank(self._obj)

    def helped_fraction(self, grouping: str | None = None) -> xr.DataArray:
        """Fraction of parameters with LCA < 0 per step (step, dataset)."""
        return measures.helped_fraction(self._obj, grouping)


@xr.register_dataset_accessor("lca")
class LCADatasetAccessor(_Common):
    """``cube.lca``: LCA analysis of a whole cube (docs/design.md §9)."""

    def loss_reconstruction(self, grouping: str | None = None) -> xr.DataArray:
        """loss[0] + cumsum of Σ_group LCA, indexed by step_end (step, dataset)."""
        return measures.loss_reconstruction(self._obj, grouping)

    def relative_error(self, grouping: str | None = None) -> xr.DataArray:
        """|reconstructed − actual total loss change| / |actual| per dataset."""
        return measures.relative_error(self._obj, grouping)

    def actual_loss(self) -> xr.DataArray:
        """Measured loss at every visited step (step, dataset)."""
        return measures.actual_loss(self._obj)

    def compare(self, reference: xr.Dataset) -> xr.Dataset:
        """``analysis.compare(self, reference)``: τ, per-group error, sign agreement."""
        from analysis.compare import compare

        return compare(self._obj, reference)

    @property
    def plot(self) -> DatasetPlots:
        """Figures of this cube, each returning a matplotlib Axes."""
        return DatasetPlots(self._obj)


@xr.register_dataarray_accessor("lca")
class LCADataArrayAccessor(_Common):
    """``cube["lca"].lca``: the same operations on one array of a cube.

    (``cube.lca`` is this accessor, not the variable: index the variable as ``cube["lca"]``.)
    """

    @property
    def plot(self) -> DataArrayPlots:
        """Quick line and bar plots of this array, each returning a matplotlib Axes."""
        return DataArrayPlots(self._obj)


class DatasetPlots:
    """``cube.lca.plot.*``: the report's figures (see :mod:`analysis.figures`)."""

    def __init__(self, obj: xr.Dataset):
        self._obj = obj

    def occupation(self, reference: xr.Dataset, ax=None, **kw):
        """Occupation per module, this cube vs ``reference``, τ in the title (Zhu Fig. 1)."""
        from analysis.figures import fig_occupation

        return fig_occupation(self._obj, reference, ax=ax, **kw)

    def occupation_scatter(self, reference: xr.Dataset, ax=None, **kw):
        """Occupation of every group, this cube vs ``reference``, one point each (many groups)."""
        from analysis.group_figures import fig_occupation_scatter

        return fig_occupation_scatter(self._obj, reference, ax=ax, **kw)

    def sparse_dense(self, ax=None, **kw):
        """Cumulative LCA of sparse vs dense weights per side and dataset (Zhu Fig. 2)."""
        from analysis.figures import fig_sparse_dense

        return fig_sparse_dense(self._obj, ax=ax, **kw)

    def layers(self, ax=None, **kw):
        """Cumulative LCA per encoder/decoder layer (Zhu Fig. 3)."""
        from analysis.figures import fig_layers

        return fig_layers(self._obj, ax=ax, **kw)

    def intervals(self, ax=None, **kw):
        """Smoothed interval LCA along training per module (Zhu Fig. 4)."""
        from analysis.figures import fig_intervals

        return fig_intervals(self._obj, ax=ax, **kw)

    def frequency(self, ax=None, **kw):
        """Embedding LCA by word-frequency bucket (Zhu Fig. 5)."""
        from analysis.figures import fig_frequency

        return fig_frequency(self._obj, ax=ax, **kw)

    def groups(self, grouping: str, ax=None, **kw):
        """Cumulative LCA per group of any grouping (``per_param=True``: per parameter)."""
        from analysis.group_figures import fig_groups

        return fig_groups(self._obj, grouping, ax=ax, **kw)

    def heatmap(self, grouping: str, ax=None, **kw):
        """Interval LCA along training as a group × step heat map (many groups)."""
        from analysis.group_figures import fig_interval_heatmap

        return fig_interval_heatmap(self._obj, grouping, ax=ax, **kw)

    def layer_stacks(self, ax=None, **kw):
        """Cumulative LCA per layer of every layer stack (``layer`` or ``tensor`` grouping)."""
        from analysis.group_figures import fig_layer_stacks

        return fig_layer_stacks(self._obj, ax=ax, **kw)

    def loss(self, ax=None, **kw):
        """Loss curve and its reconstruction from LCA."""
        from analysis.diagnostics import fig_loss

        return fig_loss(self._obj, ax=ax, **kw)

    def residual(self, ax=None, **kw):
        """Residual ΔL − ΣLCA per step."""
        from analysis.diagnostics import fig_residual

        return fig_residual(self._obj, ax=ax, **kw)

    def helped(self, ax=None, **kw):
        """Fraction of parameters that helped per step."""
        from analysis.diagnostics import fig_helped

        return fig_helped(self._obj, ax=ax, **kw)


class DataArrayPlots:
    """``array.lca.plot.*``: generic views of one (step|group, …) array."""

    def __init__(self, obj: xr.DataArray):
        self._obj = obj

    def lines(self, ax=None, **kw):
        """One line per group along ``step`` (one dataset: pass ``dataset=``)."""
        from analysis.plotting import plot_lines

        return plot_lines(self._obj, ax=ax, **kw)

    def bars(self, ax=None, **kw):
        """Bars per group, one colour per dataset (for arrays without ``step``)."""
        from analysis.plotting import plot_bars

        return plot_bars(self._obj, ax=ax, **kw)
