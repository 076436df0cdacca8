"""The zarr v3 documents of the cube's nodes (docs/design.md §7): array and group ``zarr.json``
as zarr writes them for the cube's arrays, atomic file writes, and consolidated metadata.
:mod:`replay.cube.zarr_files` reads and writes the arrays themselves.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np

ZARR_JSON = "zarr.json"
ZSTD = {"name": "zstd", "configuration": {"level": 0, "checksum": False}}
TYPES = {"float64": np.dtype("<f8"), "int64": np.dtype("<i8"), "bool": np.dtype("bool"),
         "string": np.dtype(object)}
SPECIAL = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}


def type_name(dtype) -> str:
    """The zarr v3 ``data_type`` of a numpy dtype (or ``"str"``) the cube stores."""
    if dtype in ("str", str):
        return "string"
    dt = np.dtype(dtype)
    for name, known in TYPES.items():
        if dt == known and name != "string":
            return name
    raise TypeError(f"the cube stores no arrays of dtype {dt}")


def array_doc(shape, chunks, dtype, fill_value, *, dims=None, attributes=None,
              compressed: bool = True) -> dict:
    """The ``zarr.json`` of an array, as zarr writes it for these parameters."""
    name = type_name(dtype)
    if name == "string":
        serializer = {"name": "vlen-utf8", "configuration": {}}
    elif TYPES[name].itemsize == 1:
        serializer = {"name": "bytes"}
    else:
        serializer = {"name": "bytes", "configuration": {"endian": "little"}}
    doc = {"shape": [int(s) for s in shape], "data_type": name,
           "chunk_grid": {"name": "regular",
                          "configuration": {"chunk_shape": [int(c) for c in chunks]}},
           "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
           "fill_value": _fill_json(name, fill_value),
           "codecs": [serializer] + ([dict(ZSTD)] if compressed else []),
           "attributes": dict(attributes or {})}
    if dims is not None:
        doc["dimension_names"] = list(dims)
    doc.update(zarr_format=3, node_type="array", storage_transformers=[])
    return doc


def group_doc(attributes=None) -> dict:
    return {"attributes": dict(attributes or {}), "zarr_format": 3, "node_type": "group"}


def _fill_json(name: str, value):
    if name == "float64":
        value = float(value)
        if np.isnan(value):
            return "NaN"
        return "Infinity" if value == np.inf else "-Infinity" if value == -np.inf else value
    return {"int64": int, "bool": bool, "string": str}[name](value)


def read_json(path: str) -> dict:
    with open(path, "rb") as f:
        doc = json.loads(f.read())
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
        raise ValueError(f"{path} is not zarr v3 metadata")
    return doc


def write_file(path: str, data) -> None:
    """Atomically, as zarr's local store does: a reader sees the old file or the new one.
    ``data``: bytes-like, or a list of them written one after the other."""
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            for part in data if isinstance(data, list) else (data,):
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, doc: dict) -> None:
    # Compact: zarr indents its documents, but json's C encoder only runs without indent, and
    # a replay writes dozens of these documents on its short critical path.
    write_file(path, json.dumps(doc, allow_nan=True).encode())


def consolidate(path: str) -> None:
    """Write every node's metadata into the root's ``zarr.json``, as
    ``zarr.consolidate_metadata`` does: xarray then opens the cube with one read."""
    found = {}
    for where, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "c")
        if where == path or ZARR_JSON not in files:
            continue
        doc = read_json(os.path.join(where, ZARR_JSON))
        if doc.get("node_type") == "group":
            doc = {"attributes": doc.get("attributes", {}), "zarr_format": 3,
                   "consolidated_metadata": {"kind": "inline", "must_understand": False,
                                             "metadata": {}},
                   "node_type": "group"}
        else:
            dirs[:] = []
        found[os.path.relpath(where, path).replace(os.sep, "/")] = doc
    root = read_json(os.path.join(path, ZARR_JSON))
    root["consolidated_metadata"] = {
        "kind": "inline", "must_understand": False,
        "metadata": {k: found[k] for k in sorted(found, key=lambda k: (k.count("/"), k))}}
    write_json(os.path.join(path, ZARR_JSON), root)
