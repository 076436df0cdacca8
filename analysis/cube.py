"""Opening, checking and describing LCA cubes (docs/design.md §7), and exporting them to netCDF.

A cube is an xarray Dataset with dims ``step`` (start t of each replayed interval), ``group``
and ``dataset``, in the schema of :mod:`replay.cube.schema`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import xarray as xr

from replay.cube import opening, schema
from replay.errors import CubeError, LCAError

def _is_url(path: str) -> bool:
    return "://" in path


def open_cube(path: str | os.PathLike) -> xr.Dataset:
    """Open the cube at ``path`` lazily (dask-backed) and check its schema.

    Raises CubeError, naming ``path``, when it is missing, not a zarr store, or not an LCA cube.
    """
    path = os.fspath(path)
    if not _is_url(path) and not Path(path).exists():
        raise CubeError(f"cube {path} does not exist: give the directory `lca replay` wrote")
    try:
        ds = opening.open_local(path)
        if ds is None:
            try:
                ds = xr.open_zarr(path, consolidated=True)
            except (ValueError, KeyError):
                # No consolidated metadata (e.g. a cube still being written): array by array.
                ds = xr.open_zarr(path, consolidated=False)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CubeError(f"cube {path} is not a readable zarr store ({first}); "
                        "give the directory `lca replay` wrote") from None
    check_cube(ds, path)
    return ds


def check_cube(ds: xr.Dataset, where: str = "cube") -> None:
    """Raise CubeError naming ``where`` if ``ds`` lacks a variable or coordinate of the schema
    (:func:`replay.cube.schema.check`)."""
    schema.check(ds, where)


def _json_attr(ds: xr.Dataset, key: str) -> dict:
    raw = ds.attrs.get(key)
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {"value": str(raw)}
    return value if isinstance(value, dict) else {"value": value}


def provenance(ds: xr.Dataset) -> dict:
    """The cube's run provenance as plain Python values (JSON attributes parsed).

    Keys: version, created, quadrature, tolerance, gradient (dict), trajectory (dict),
    task (dict); a missing attribute gives None or {}.
    """
    return {
        "version": ds.attrs.get("lca_replay_version"),
        "created": ds.attrs.get("created"),
        "quadrature": ds.attrs.get("quadrature"),
        "tolerance": ds.attrs.get("tolerance"),
        "gradient": _json_attr(ds, "gradient"),
        "trajectory": _json_attr(ds, "trajectory"),
        "task": _json_attr(ds, "task"),
    }


def gradient_text(gradient: dict) -> str:
    """``{"mode": "sampled", "batches": 4, ...}`` -> ``"sampled (batches=4, ...)"``."""
    mode = gradient.get("mode", "unknown")
    rest = ", ".join(f"{k}={v}" for k, v in gradient.items() if k != "mode")
    return f"{mode} ({rest})" if rest else str(mode)


def describe(ds: xr.Dataset) -> str:
    """One line saying which run a cube replays and how, e.g. for compare() attributes."""
    prov = provenance(ds)
    traj = prov["trajectory"]
    sha = str(traj.get("sha256") or traj.get("manifest_sha256") or "")[:12]
    where = traj.get("path", "?") + (f" (manifest {sha})" if sha else "")
    return (f"{prov['quadrature'] or '?'} quadrature, {gradient_text(prov['gradient'])} "
            f"gradient, trajectory {where}")


def export_netcdf(ds: xr.Dataset, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``ds`` (all steps, done or not) to the netCDF file ``out``.

    Refuses to replace an existing file unless ``force``; writes a temporary file beside ``out``
    and renames it, so a failure never leaves a half-written ``out``.
    """
    out = Path(out)
    if out.exists() and not force:
        raise LCAError(f"{out} already exists: choose another name or pass --force to replace it")
    if not out.parent.is_dir():
        raise LCAError(f"cannot write {out}: directory {out.parent} does not exist")
    ds = ds.copy()
    # Encodings read from zarr (chunks, codecs) mean nothing to netCDF; keep NaN as fill value.
    for name in ds.variables:
        ds[name].encoding = {}
        if np.issubdtype(ds[name].dtype, np.floating):
            ds[name].encoding["_FillValue"] = np.nan
        elif ds[name].dtype.kind in "TUO":
            # numpy 2 StringDType (zarr) and fixed-width strings become netCDF strings; labels
            # are small, so read them here rather than let netCDF guess from a dask array.
            var = ds[name].variable
            labels = np.array([str(v) for v in np.asarray(var.values).ravel().tolist()],
                              dtype=object).reshape(var.shape)
            ds[name] = xr.Variable(var.dims, labels, var.attrs, encoding={"dtype": str})
    ds.encoding = {}
    tmp = out.with_name(out.name + ".partial")
    try:
        ds.to_netcdf(tmp, engine="netcdf4")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
