"""The LCA cube's schema, defined once (docs/design.md §7).

Dimensions ``step`` (the start t of each replayed interval), ``group`` (``grouping/name``
labels) and ``dataset``. The writer builds an empty cube from it (:func:`build` without data),
the reader checks a cube against it (:func:`check`, behind ``analysis.open_cube``) and the test
fixtures build cubes with given values from it (:func:`build` with data), so the three cannot
drift apart.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import xarray as xr

from replay import __version__
from replay.errors import CubeError

SGD, SD, S = ("step", "group", "dataset"), ("step", "dataset"), ("step",)
# Zarr groups of the per-parameter cumulative LCA (replay.cube.param_lca).
PARTS, PARAMS = "param_lca_parts", "param_lca"


@dataclass(frozen=True)
class Variable:
    """One data variable: dims, dtype, the value of a step not yet done, and its attributes."""

    dims: tuple[str, ...]
    dtype: str
    empty: Any
    attrs: dict = field(default_factory=dict)


VARIABLES = {
    "lca": Variable(SGD, "f8", np.nan, {"units": "loss",
                                        "long_name": "loss change allocated to the group"}),
    "helped": Variable(SGD, "i8", 0, {"long_name": "elements with LCA < 0"}),
    "loss": Variable(SD, "f8", np.nan),          # L(θ_step; D), on the step's sample if sampled
    "loss_next": Variable(SD, "f8", np.nan),     # L(θ_step_end; D) on the same data
    "residual": Variable(SD, "f8", np.nan),      # (loss_next - loss) - Σ lca of one grouping
    "splits": Variable(S, "i8", 0, {"long_name": "quadrature sub-intervals; 0 = step skipped "
                                    "for non-finite values (nonfinite='skip'): its lca and "
                                    "losses are NaN"}),
    "done": Variable(S, "bool", False),          # written last: the resume marker
}
FLOAT_VARIABLES = tuple(name for name, v in VARIABLES.items() if v.dtype == "f8")

# coordinate -> (dimension, dtype); labels are strings
COORDS = {"step": ("step", "i8"), "step_end": ("step", "i8"), "group": ("group", "str"),
          "grouping": ("group", "str"), "group_size": ("group", "i8"),
          "dataset": ("dataset", "str")}

# Attributes of a cube written by a replay; JSON strings where marked.
ATTRS = {"lca_replay_version": "version that wrote it", "quadrature": "rule name",
         "gradient": "JSON: mode (+ sample sizes)", "tolerance": "adaptive tolerance",
         "trajectory": "JSON: path, manifest_sha256", "task": "JSON: ref, args",
         "created": "ISO time (UTC)", "precision": "float32 | float64",
         "settings": "JSON: everything a resume must match"}


@dataclass(frozen=True)
class Coords:
    """The coordinates of a cube and its step chunk. ``steps``/``step_ends`` (n,)."""

    steps: np.ndarray
    step_ends: np.ndarray
    labels: tuple[str, ...]  # "grouping/name"
    groupings: tuple[str, ...]  # grouping of each label
    sizes: np.ndarray  # int64 |g| per label
    datasets: tuple[str, ...]
    chunk: int

    @classmethod
    def of(cls, steps, step_ends, groupings: Sequence, datasets: Sequence[str],
           chunk: int) -> Coords:
        """From :class:`~replay.grouping.partition.Grouping` objects, in cube order."""
        labels, owners, sizes = [], [], []
        for g in groupings:
            labels += g.qualified_labels()
            owners += [g.name] * len(g.labels)
            sizes += list(np.asarray(g.sizes, dtype=np.int64))
        return cls(np.asarray(steps), np.asarray(step_ends), tuple(labels), tuple(owners),
                   np.array(sizes, np.int64), tuple(datasets), chunk)


def build(coords: Coords, data: Mapping[str, Any] | None = None,
          attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A cube as an xarray Dataset: each variable from ``data`` (arrays of the schema's dims,
    cast to its dtype) or, when ``data`` is None, lazily filled with its not-done value in
    dask arrays chunked by ``coords.chunk`` along ``step``."""
    import dask.array as da

    out = {}
    for name, shape in variable_shapes(coords).items():
        var = VARIABLES[name]
        if data is None:
            values = da.full(shape, var.empty, dtype=var.dtype,
                             chunks=(coords.chunk,) + shape[1:])
        else:
            values = np.asarray(data[name], dtype=var.dtype)
            if values.shape != shape:
                raise ValueError(f"{name}: shape {values.shape}, the schema needs {shape}")
        out[name] = (var.dims, values, dict(var.attrs))
    return xr.Dataset(out, coords=coordinate_values(coords), attrs=dict(attrs or {}))


def variable_shapes(coords: Coords) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every variable in :data:`VARIABLES` for these coordinates."""
    sizes = {"step": len(coords.steps), "group": len(coords.labels),
             "dataset": len(coords.datasets)}
    return {name: tuple(sizes[d] for d in var.dims) for name, var in VARIABLES.items()}


def coordinate_values(coords: Coords) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (dimension, values)} of every coordinate in :data:`COORDS`."""
    labels = {"group": coords.labels, "grouping": coords.groupings, "dataset": coords.datasets}
    numbers = {"step": coords.steps, "step_end": coords.step_ends, "group_size": coords.sizes}
    out = {}
    for name, (dim, dtype) in COORDS.items():
        values = np.array(labels[name], dtype=object) if dtype == "str" else \
            np.asarray(numbers[name], dtype=np.int64)
        out[name] = (dim, values)
    return out


def coordinates_attribute(dims: tuple[str, ...]) -> str:
    """What xarray stores as a variable's ``coordinates`` attribute: the non-index
    coordinates along its dimensions, sorted."""
    return " ".join(sorted(name for name, (dim, _) in COORDS.items()
                           if name != dim and dim in dims))


def check(ds: xr.Dataset, where: str = "cube") -> None:
    """Raise CubeError naming ``where`` if ``ds`` lacks a variable or coordinate of the schema,
    or has one with other dims."""
    missing = [name for name in VARIABLES if name not in ds.data_vars]
    missing += [name for name in COORDS if name not in ds.coords]
    if missing:
        raise CubeError(f"{where} is not an LCA cube: missing {', '.join(missing)} "
                        "(a cube is written by `lca replay`)")
    for name, var in VARIABLES.items():
        if ds[name].dims != var.dims:
            raise CubeError(f"{where} is not an LCA cube: variable {name!r} has dims "
                            f"{ds[name].dims}, expected {var.dims}")


def attributes(*, trajectory_path: str, manifest_sha256: str, settings: dict,
               gradient: str, quadrature: str, tolerance: float) -> dict:
    """The attributes a replay writes (:data:`ATTRS`), from the cube's ``settings``."""
    return {
        "lca_replay_version": __version__, "quadrature": quadrature, "gradient": gradient,
        "tolerance": tolerance,
        "trajectory": json.dumps({"path": trajectory_path, "manifest_sha256": manifest_sha256}),
        "task": json.dumps({"ref": settings["task"], "args": settings["task_args"]}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "precision": settings["precision"], "settings": json.dumps(settings, sort_keys=True),
    }


def quiet():
    # zarr flags v3 consolidated metadata as outside the spec; xarray reads it fine and it
    # makes open_zarr fast, so the notice is noise for our users.
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
    return ctx
