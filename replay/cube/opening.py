"""The cube as an xarray Dataset, opened without zarr-python where the cube is local.

``xr.open_zarr`` spends about ten milliseconds of Python on a cube of a dozen arrays (zarr's
metadata objects, its event-loop hop for every coordinate read, xarray's generic decoding), a
cost every ``replay.run`` paid on return and that a short replay of a fast model notices. A
local cube of the cube's own codecs (:mod:`replay.cube.zarr_files`) is opened here from its
consolidated ``zarr.json`` instead: index coordinates read into memory, every other array a
dask array reading its chunk files when computed, and the variables, attributes, coordinates
and encodings ``xr.open_zarr`` gives (tests/test_opening.py compares the two on cubes of every
kind). A remote cube, one without consolidated metadata or with another codec goes through
``xr.open_zarr``.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import xarray as xr

from replay.cube import zarr_files
from replay.cube.zarr_docs import ZARR_JSON, read_json

_STRING = np.dtypes.StringDType()
_NAN_BASE64 = "AAAAAAAA+H8="  # float64 NaN, little-endian


def open_dataset(path: str) -> xr.Dataset:
    """``xr.open_zarr(path)``, lazily (dask-backed) as it is, cheaper for a local cube."""
    ds = open_local(path)
    return xr.open_zarr(path) if ds is None else ds


def open_local(path) -> xr.Dataset | None:
    """What ``xr.open_zarr(path)`` returns, for a local cube of the cube's own codecs with
    consolidated metadata; None for any other store, which ``xr.open_zarr`` must open."""
    path = os.fspath(path)
    found = _local_arrays(path) if zarr_files.is_local(path) else None
    if found is None:
        return None
    root, arrays = found
    # Variables named by another's ``coordinates`` attribute are coordinates, as xarray's
    # CF decoding makes them; the attribute moves to the encoding.
    named = {c for arr in arrays.values()
             for c in str(arr.doc["attributes"].get("coordinates", "")).split()}
    token = uuid.uuid4().hex  # a fresh name per opening: files may change between two
    variables, coords = {}, {}
    for name, arr in arrays.items():
        dims = tuple(arr.doc["dimension_names"])
        attrs = {k: v for k, v in arr.doc["attributes"].items()
                 if k not in ("coordinates", "_FillValue")}
        index = dims == (name,)
        data = _as_stored(arr[:]) if index else _lazy(arr, f"open_cube-{name}-{token}")
        var = xr.Variable(dims, data, attrs, encoding=_encoding(arr))
        (coords if index or name in named else variables)[name] = var
    ds = xr.Dataset(variables, coords=coords, attrs=root["attributes"])
    ds.encoding = {"source": path}
    return ds


def _local_arrays(path: str) -> tuple[dict, dict] | None:
    """The root's document and its arrays by name, from its consolidated metadata; None where
    ``xr.open_zarr`` must open the cube (no consolidated metadata, another codec, a foreign
    layout)."""
    try:
        root = read_json(os.path.join(path, ZARR_JSON))
        meta = root["consolidated_metadata"]["metadata"]
        arrays = {name: zarr_files.Array(os.path.join(path, name), doc)
                  for name, doc in sorted(meta.items())
                  if "/" not in name and doc.get("node_type") == "array"}
    except (FileNotFoundError, KeyError, TypeError, ValueError, NotImplementedError):
        return None
    if not arrays or any(a.ndim == 0 or len(a.doc.get("dimension_names") or ()) != a.ndim or
                         "_ARRAY_DIMENSIONS" in a.doc["attributes"] or
                         _fill_attribute(a) not in (None, "nan") for a in arrays.values()):
        return None
    return root, arrays


def _fill_attribute(arr: zarr_files.Array) -> str | None:
    """The ``_FillValue`` attribute xarray wrote for a float array (NaN, base64-encoded as
    xarray stores it), as "nan"; anything else would make xarray mask values, so it is
    reported as found for :func:`xr.open_zarr` to decode."""
    value = arr.doc["attributes"].get("_FillValue")
    if value is None:
        return None
    if arr.dtype.kind == "f" and value == _NAN_BASE64:
        return "nan"
    return "other"


def _as_stored(values: np.ndarray) -> np.ndarray:
    # Strings come back as numpy's variable-width string dtype, as xarray decodes them.
    return values.astype(_STRING) if values.dtype == object else values


def _lazy(arr: zarr_files.Array, name: str):
    import dask.array as da

    chunks = tuple(tuple(min(c, n - i) for i in range(0, n, c)) if n else (0,)
                   for n, c in zip(arr.shape, arr.chunks))
    graph = {(name,) + idx: (_read_block, arr.path, arr.doc, idx)
             for idx in np.ndindex(*(len(c) for c in chunks))}
    meta = np.empty((0,) * arr.ndim, dtype=_STRING if arr.dtype == object else arr.dtype)
    return da.Array(graph, name, chunks, meta=meta)


def _read_block(path: str, doc: dict, idx: tuple) -> np.ndarray:
    """Chunk ``idx`` of the array at ``path``, cut to the array's extent (a dask task)."""
    return _as_stored(zarr_files.Array(path, doc).block(idx))


def _encoding(arr: zarr_files.Array) -> dict:
    """The variable's encoding as ``xr.open_zarr`` reports it (what ``to_zarr`` reuses)."""
    from zarr.codecs import BytesCodec, VLenUTF8Codec, ZstdCodec

    doc = arr.doc
    codecs = doc["codecs"]
    if codecs[0]["name"] == "vlen-utf8":
        serializer = VLenUTF8Codec()
    else:
        serializer = BytesCodec(endian=codecs[0].get("configuration", {}).get("endian"))
    dims = doc["dimension_names"]
    if arr.dtype == object:
        dtype = _STRING
    else:  # zarr reports multi-byte types with their byte order spelled out
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
    enc = {"chunks": arr.chunks, "preferred_chunks": dict(zip(dims, arr.chunks))}
    if arr.dtype == object:
        enc["dtype"] = dtype
    enc.update(compressors=tuple(ZstdCodec(**c["configuration"]) for c in codecs[1:]),
               filters=(), shards=None, serializer=serializer)
    fill = arr.fill_value
    enc["fill_value"] = fill if arr.dtype == object else dtype.type(fill)
    if _fill_attribute(arr) == "nan":
        enc["_FillValue"] = np.nan
    enc["dtype"] = dtype
    if "coordinates" in doc["attributes"]:
        enc["coordinates"] = doc["attributes"]["coordinates"]
    return enc
