"""The LCA cube on disk (docs/design.md §7): a zarr store that xarray opens as
step × group × dataset, in the schema of :mod:`replay.cube.schema`.

The cube is created once with every variable empty (NaN / 0 / False); replay tasks then fill
whole step chunks, and ``done`` is set after a chunk's data, so a crash never leaves a step
marked done without its numbers. The per-parameter cumulative LCA beside the variables is
:mod:`replay.cube.param_lca`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid

import numpy as np

from replay.cube import zarr_docs, zarr_files
from replay.cube.schema import (COORDS, FLOAT_VARIABLES, VARIABLES, Coords, build,
                                coordinate_values, coordinates_attribute, quiet,
                                variable_shapes)
from replay.errors import CubeError

# Settings that do not change any number in the cube, so a cube may be resumed with another
# value: ``nonfinite`` only decides whether a non-finite step stops the run or is marked.
FREE_SETTINGS = ("nonfinite",)


def create(path: str, layout: Coords, attrs: dict) -> bool:
    """Write an empty cube; never touches an existing store. The groups of per-parameter
    partial sums are made by their first write (:mod:`replay.cube.param_lca`).

    A local cube is built in a hidden directory beside ``path`` and renamed into place (atomic),
    so no reader sees half a cube, a failed write (disk full) leaves nothing behind, and of two
    replays racing to create it one wins: the other gets False and resumes the winner's cube.
    """
    if "://" in path:
        _write_empty(path, layout, attrs)
        return True
    _refuse_foreign(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.creating")
    os.mkdir(tmp)
    try:
        _write_empty(tmp, layout, attrs)
        try:
            os.rename(tmp, path)   # replaces nothing but a missing path or an empty directory
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            if exists(path):
                return False
            _refuse_foreign(path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _refuse_foreign(path: str) -> None:
    if os.path.lexists(path) and not exists(path) and not (
            os.path.isdir(path) and not os.listdir(path)):
        raise CubeError(f"{path} exists and is not an LCA cube; choose another --cube "
                        "(or remove it if it is yours)")


# A remote cube up to this many values is created from numpy arrays: quicker than building the
# dask graph that keeps a bigger one from being held in memory (zarr skips the empty chunks
# either way).
_EAGER_VALUES = 1 << 22
# How xarray marks a float variable's fill value (little-endian NaN, base64), kept in the
# files written here so that a cube reads the same whichever way it was made.
_NAN_FILL = "AAAAAAAA+H8="


def _write_empty(path: str, layout: Coords, attrs: dict) -> None:
    (_write_files if zarr_files.is_local(path) else _write_xarray)(path, layout, attrs)


def _write_xarray(path: str, layout: Coords, attrs: dict) -> None:
    """The empty cube through xarray and zarr (a remote store)."""
    shapes = variable_shapes(layout)
    eager = sum(int(np.prod(s)) for s in shapes.values()) <= _EAGER_VALUES
    data = {name: np.full(shapes[name], var.empty, dtype=var.dtype)
            for name, var in VARIABLES.items()} if eager else None
    ds = build(layout, data, attrs)
    c = layout.chunk
    encoding = {v: {"chunks": (c,) + ds[v].shape[1:]} for v in ds.data_vars}
    for v in FLOAT_VARIABLES:
        encoding[v]["fill_value"] = np.nan
    ctx = quiet()
    try:
        ds.to_zarr(path, mode="w-", compute=eager, encoding=encoding, zarr_format=3,
                   consolidated=True)
    except FileExistsError:
        raise CubeError(f"{path} already exists; pass it to resume, or choose another --cube") from None
    finally:
        ctx.__exit__(None, None, None)


def _write_files(path: str, layout: Coords, attrs: dict) -> None:
    """The empty cube as files: the documents xarray's ``to_zarr`` writes for the schema
    (coordinates in one chunk each, every variable empty so without chunk files)."""
    root = zarr_files.Group.create(path, attributes=attrs)
    for name, (dim, values) in coordinate_values(layout).items():
        dtype = "str" if COORDS[name][1] == "str" else values.dtype
        root.create_array(name, shape=values.shape, dtype=dtype, chunks=values.shape,
                          compressors="zstd", dimension_names=[dim])[:] = values
    for name, shape in variable_shapes(layout).items():
        var = VARIABLES[name]
        along = coordinates_attribute(var.dims)
        extra = {"coordinates": along} if along else {}
        if name in FLOAT_VARIABLES:
            extra["_FillValue"] = _NAN_FILL
        root.create_array(name, shape=shape, dtype=var.dtype, chunks=(layout.chunk,) + shape[1:],
                          compressors="zstd", fill_value=var.empty, dimension_names=var.dims,
                          attributes={**var.attrs, **extra})
    zarr_docs.consolidate(path)


def exists(path: str) -> bool:
    """True if a zarr group can be opened at ``path`` (a damaged one counts as absent)."""
    try:
        zarr_files.open_root(path)
    except Exception:  # missing, or metadata that zarr cannot parse: not a cube either way
        return False
    return True


def read_attrs(path: str) -> dict:
    try:
        return dict(zarr_files.open_root(path).attrs)
    except Exception as err:  # a cube is data: whatever is wrong with it, say so in one line
        raise CubeError(f"{path} is not an LCA cube ({err}); run `lca replay` to make one") from None


def check_compatible(path: str, layout: Coords, settings: dict) -> None:
    """Refuse to resume a cube made from another trajectory or with other settings."""
    attrs = read_attrs(path)
    if "settings" not in attrs:
        raise CubeError(f"{path} is not an LCA cube (no 'settings' attribute); choose another --cube")
    try:
        theirs = json.loads(attrs["settings"])
        root = zarr_files.open_root(path)
        steps = np.asarray(root["step"][:])
        labels = tuple(str(x) for x in root["group"][:])
        chunk = root["done"].chunks[0]
        if not isinstance(theirs, dict):
            raise ValueError("settings is not a JSON object")
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise CubeError(f"{path} is not a readable LCA cube ({type(err).__name__}: {err}); "
                        "choose another --cube, or delete it and replay again") from None
    keys = sorted((set(theirs) | set(settings)) - set(FREE_SETTINGS))
    diff = [k for k in keys if theirs.get(k) != settings.get(k)]
    if diff:
        k = diff[0]
        raise CubeError(
            f"cube {path} was made with other settings ({', '.join(diff)} differ; e.g. {k}: "
            f"cube has {theirs.get(k)!r}, this run {settings.get(k)!r}); "
            "use another --cube or the cube's settings"
        )
    if not np.array_equal(steps, layout.steps) or labels != layout.labels:
        raise CubeError(
            f"cube {path} covers other steps or groups than this run; use another --cube"
        )
    if chunk != layout.chunk:
        raise CubeError(f"cube {path} is chunked by {chunk} steps, this run asked for "
                        f"{layout.chunk}; drop chunk_size or pass {chunk}")


def cube_chunk(path: str) -> int:
    try:
        return int(zarr_files.open_root(path)["done"].chunks[0])
    except Exception as err:
        raise CubeError(f"{path} is not a readable LCA cube ({type(err).__name__}: {err}); "
                        "choose another --cube, or delete it and replay again") from None


class CubeWriter:
    """Region writes into an existing cube (the driver is the only writer of its steps)."""

    def __init__(self, path: str):
        self.path = path
        self.root = zarr_files.open_root(path, mode="r+")
        self._arrays: dict = {}

    def _array(self, name: str):
        # Opening an array reads its metadata from the store; the per-step arrays keep their
        # shape for the cube's lifetime, so each is opened once per writer.
        if name not in self._arrays:
            self._arrays[name] = self.root[name]
        return self._arrays[name]

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._array("done")[:], dtype=bool)

    def write(self, i0: int, i1: int, result: dict) -> None:
        """``result`` arrays cover intervals [i0, i1); ``done`` goes last."""
        for name in VARIABLES:
            if name != "done":
                self._array(name)[i0:i1] = result[name]
        self._array("done")[i0:i1] = True
