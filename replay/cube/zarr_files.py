"""The cube's zarr arrays read and written as plain files on a local disk (docs/design.md §7).

zarr-python spends milliseconds of Python on every operation (metadata validation, its async
codec pipeline, a hop to its event-loop thread). A replay makes about a hundred of them to
create a cube, write its batches and add up the per-parameter sums, which on a model whose
gradient evaluations take milliseconds cost more than the replay itself. The cube uses a small
part of zarr v3 — regular chunks, the default ``c/…`` chunk keys, the ``bytes`` or
``vlen-utf8`` serializer and an optional ``zstd`` — so on a local disk :class:`Group` and
:class:`Array` handle those arrays directly: the same ``zarr.json`` documents and chunk bytes
zarr writes (tests/test_zarr_files.py compares them), behind the part of zarr's
Group/Array API the cube code uses. A remote store goes through zarr (:func:`open_root`), and
so does a local array with any other codec.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import MutableMapping

import numpy as np
from numcodecs.vlen import VLenUTF8
from numcodecs.zstd import Zstd

from replay.cube import zarr_docs
from replay.cube.zarr_docs import (SPECIAL, TYPES, ZARR_JSON, ZSTD, array_doc, group_doc,
                                   read_json, type_name, write_file, write_json)

_ZSTD = Zstd(level=0, checksum=False)
_VLEN = VLenUTF8()


def is_local(path: str) -> bool:
    return "://" not in str(path)


def open_root(path: str, mode: str = "r"):
    """The cube's root group: a :class:`Group` on a local disk, zarr's own for a URL."""
    if is_local(path):
        return Group(path)
    import zarr

    return zarr.open_group(path, mode=mode, use_consolidated=False)


def consolidate(path: str) -> None:
    """Every node's metadata into the root's ``zarr.json`` (:func:`zarr_docs.consolidate`
    on a local disk, zarr's own for a URL)."""
    if is_local(path):
        zarr_docs.consolidate(path)
        return
    import zarr

    zarr.consolidate_metadata(path)


def read_rows(arr, i0: int, out: np.ndarray) -> None:
    """``arr[i0:i0 + len(out)]`` into ``out``: in place for a local array, by zarr else."""
    if isinstance(arr, Array):
        arr.read_into(i0, i0 + out.shape[0], out)
    else:
        out[...] = arr[i0:i0 + out.shape[0]]


class Attributes(MutableMapping):
    """A node's attributes; every change rewrites its ``zarr.json``."""

    def __init__(self, node):
        self._node = node

    def _doc(self) -> dict:
        return self._node.doc["attributes"]

    def __getitem__(self, key):
        return self._doc()[key]

    def __iter__(self):
        return iter(self._doc())

    def __len__(self) -> int:
        return len(self._doc())

    def __setitem__(self, key, value) -> None:
        self.update({key: value})

    def __delitem__(self, key) -> None:
        del self._doc()[key]
        self._node.save()

    def update(self, other=(), **kw) -> None:  # one rewrite, not one per key
        self._doc().update(dict(other, **kw))
        self._node.save()


class Node:
    def __init__(self, path: str, doc: dict | None = None):
        self.path = path
        self.doc = doc if doc is not None else read_json(os.path.join(path, ZARR_JSON))
        self.attrs = Attributes(self)

    def save(self) -> None:
        write_json(os.path.join(self.path, ZARR_JSON), self.doc)


class Array(Node):
    """A local zarr v3 array of the cube's codecs; ``a[i0:i1]`` reads and writes along the
    first axis (all of the others)."""

    def __init__(self, path: str, doc: dict | None = None):
        super().__init__(path, doc)
        d = self.doc
        codecs = [c["name"] for c in d["codecs"]]
        if d.get("storage_transformers") or d["chunk_grid"]["name"] != "regular" or \
                d["chunk_key_encoding"] != {"name": "default",
                                            "configuration": {"separator": "/"}} or \
                d["data_type"] not in TYPES or codecs[1:] not in ([], ["zstd"]) or \
                codecs[0] != ("vlen-utf8" if d["data_type"] == "string" else "bytes") or \
                (len(codecs) == 2 and d["codecs"][1] != ZSTD) or \
                d["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            raise NotImplementedError(f"{path}: an array outside the cube's codecs")
        self.shape = tuple(d["shape"])
        self.chunks = tuple(d["chunk_grid"]["configuration"]["chunk_shape"])
        self.ndim = len(self.shape)
        self.dtype = TYPES[d["data_type"]]
        self._string = d["data_type"] == "string"
        self._zstd = len(codecs) == 2
        self._dirs: set[str] = set()  # chunk directories known to exist
        fill = d["fill_value"]
        self.fill_value = SPECIAL.get(fill, fill) if d["data_type"] == "float64" else fill

    def _range(self, key) -> tuple[int, int]:
        if key is Ellipsis:
            key = slice(None)
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise IndexError(f"{self.path}: only a[i0:i1] is supported")
        i0, i1, _ = key.indices(self.shape[0])
        return i0, max(i0, i1)

    def _chunk_ids(self, i0: int, i1: int):
        """(chunk index, its region in the array, the part [i0, i1) of it) for each chunk."""
        axes = [range(i0 // self.chunks[0], -(-i1 // self.chunks[0]) if i1 > i0 else 0)]
        axes += [range(-(-n // c)) for n, c in zip(self.shape[1:], self.chunks[1:])]
        for idx in itertools.product(*axes):
            yield (idx, *self._bounds(idx))

    def _file(self, idx) -> str:
        return os.path.join(self.path, "c", *map(str, idx))

    def _decode(self, data: bytes) -> np.ndarray:
        raw = _ZSTD.decode(data) if self._zstd else data
        if self._string:
            return np.asarray(_VLEN.decode(raw), dtype=object).reshape(self.chunks)
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks)

    def _encode(self, block):
        if isinstance(block, tuple):  # consecutive parts of an uncompressed chunk
            return [self._encode(part) for part in block]
        raw = _VLEN.encode(np.asarray(block, dtype=object)) if self._string else \
            memoryview(np.ascontiguousarray(block, dtype=self.dtype)).cast("B")
        return _ZSTD.encode(raw) if self._zstd else raw

    def _read_chunk(self, idx) -> np.ndarray | None:
        try:
            with open(self._file(idx), "rb") as f:
                return self._decode(f.read())
        except FileNotFoundError:
            return None

    def block(self, idx: tuple) -> np.ndarray:
        """Chunk ``idx`` (its index along every axis), cut to the array's extent; the fill
        value where it was never written, as zarr reads it."""
        extent = tuple(b - a for a, b in zip(*self._bounds(idx)))
        chunk = self._read_chunk(idx)
        if chunk is None:
            return np.full(extent, self.fill_value, dtype=self.dtype)
        return chunk[tuple(slice(0, n) for n in extent)].copy()

    def _bounds(self, idx: tuple) -> tuple[list[int], list[int]]:
        lo = [k * c for k, c in zip(idx, self.chunks)]
        return lo, [min(a + c, n) for a, c, n in zip(lo, self.chunks, self.shape)]

    def __getitem__(self, key) -> np.ndarray:
        i0, i1 = self._range(key)
        out = np.empty((i1 - i0,) + self.shape[1:], dtype=self.dtype)
        self.read_into(i0, i1, out)
        return out

    def read_into(self, i0: int, i1: int, out: np.ndarray) -> None:
        """``a[i0:i1]`` into ``out`` (of that shape): reading a big array a chunk at a time
        into one reused buffer spares the page faults of fresh memory for every chunk."""
        for idx, lo, hi in self._chunk_ids(i0, i1):
            a, b = max(lo[0], i0), min(hi[0], i1)
            outer, inner = _trailing(lo, hi)
            where = (slice(a - i0, b - i0),) + outer
            if self._read_into(idx, out[where]):
                continue
            block = self._read_chunk(idx)
            out[where] = self.fill_value if block is None else \
                block[(slice(a - lo[0], b - lo[0]),) + inner]

    def _read_into(self, idx, target: np.ndarray) -> bool:
        """An uncompressed chunk read straight into ``target`` (one copy, no temporary), when
        target has the chunk's shape (so it is the whole chunk) and is contiguous; False
        otherwise, or if the chunk is missing."""
        if self._zstd or self._string or target.shape != self.chunks or \
                not target.flags.c_contiguous:
            return False
        try:
            with open(self._file(idx), "rb", buffering=0) as f:
                view = memoryview(target.reshape(-1)).cast("B")
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            return False
        if got != len(view):
            raise ValueError(f"{self._file(idx)}: {got} bytes, a chunk holds {len(view)}")
        return True

    def __setitem__(self, key, values) -> None:
        i0, i1 = self._range(key)
        values = np.broadcast_to(np.asarray(values, dtype=self.dtype),
                                 (i1 - i0,) + self.shape[1:])
        for idx, lo, hi in self._chunk_ids(i0, i1):
            a, b = max(lo[0], i0), min(hi[0], i1)
            outer, inner = _trailing(lo, hi)
            src = values[(slice(a - i0, b - i0),) + outer]
            whole = a == lo[0] and b == hi[0]
            if whole and src.shape == self.chunks:
                block = src
            elif whole and not (self._zstd or self._string) and src.shape[1:] == self.chunks[1:]:
                # An uncompressed edge chunk along the first axis: its values, then the fill
                # zarr pads it to the chunk's length with, written one after the other rather
                # than copied into a chunk-sized block first (a big array's chunk is 32 MB).
                pad = np.full((self.chunks[0] - src.shape[0],) + self.chunks[1:],
                              self.fill_value, dtype=self.dtype)
                block = (src, pad)
            else:  # a part of the chunk, or an edge chunk: zarr stores the whole chunk shape
                old = None if whole else self._read_chunk(idx)
                block = np.full(self.chunks, self.fill_value, dtype=self.dtype) \
                    if old is None else old.copy()
                block[(slice(a - lo[0], b - lo[0]),) + inner] = src
            path = self._file(idx)
            if self._zstd and _all_fill(block, self.fill_value):  # (block is an array here)
                # zarr's default (write_empty_chunks=False): an all-fill chunk is not stored
                if os.path.exists(path):
                    os.unlink(path)
                continue
            folder = os.path.dirname(path)
            if folder not in self._dirs:
                os.makedirs(folder, exist_ok=True)
                self._dirs.add(folder)
            write_file(path, self._encode(block))


def _trailing(lo, hi) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """A chunk's extent along the axes after the first: in the array, and in the chunk."""
    return (tuple(slice(a, b) for a, b in zip(lo[1:], hi[1:])),
            tuple(slice(0, b - a) for a, b in zip(lo[1:], hi[1:])))


def _all_fill(block: np.ndarray, fill) -> bool:
    if isinstance(fill, float) and np.isnan(fill):
        return bool(np.isnan(block).all())
    return bool((block == fill).all())


class Group(Node):
    """A local zarr v3 group with the part of ``zarr.Group``'s API the cube code uses."""

    def __init__(self, path: str, doc: dict | None = None):
        super().__init__(path, doc)
        if self.doc.get("node_type") != "group":
            raise ValueError(f"{path} is not a zarr group")

    @classmethod
    def create(cls, path: str, attributes=None) -> Group:
        os.makedirs(path, exist_ok=True)
        group = cls(path, group_doc(attributes))
        group.save()
        return group

    def _node(self, key: str):
        path = os.path.join(self.path, *key.split("/"))
        doc = read_json(os.path.join(path, ZARR_JSON))
        if doc.get("node_type") == "group":
            return Group(path, doc)
        try:
            return Array(path, doc)
        except NotImplementedError:  # another codec: zarr reads it
            import zarr

            return zarr.open_array(path, mode="r+")

    def __getitem__(self, key: str):
        try:
            return self._node(key)
        except FileNotFoundError:
            raise KeyError(key) from None

    def __contains__(self, key: str) -> bool:
        return os.path.isfile(os.path.join(self.path, *key.split("/"), ZARR_JSON))

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        shutil.rmtree(os.path.join(self.path, *key.split("/")))

    def _children(self, kind: str) -> list[str]:
        out = []
        for entry in sorted(os.listdir(self.path)):
            meta = os.path.join(self.path, entry, ZARR_JSON)
            if not entry.startswith(".") and os.path.isfile(meta) and \
                    read_json(meta).get("node_type") == kind:
                out.append(entry)
        return out

    def array_keys(self) -> list[str]:
        return self._children("array")

    def group_keys(self) -> list[str]:
        return self._children("group")

    def require_group(self, key: str) -> Group:
        group = self
        for part in key.split("/"):
            path = os.path.join(group.path, part)
            group = group[part] if part in group else Group.create(path)
        return group

    def create_array(self, name: str, *, shape, dtype, chunks, compressors=None,
                     fill_value=None, overwrite: bool = False, attributes=None,
                     dimension_names=None) -> Array:
        """As ``zarr.Group.create_array`` for the cube's arrays: uncompressed
        (``compressors=None``) or zstd (``compressors="zstd"``)."""
        if compressors not in (None, "zstd"):
            raise ValueError(f"{name}: compressors must be None or 'zstd'")
        path = os.path.join(self.path, name)
        if os.path.lexists(path):
            if not overwrite:
                raise FileExistsError(path)
            shutil.rmtree(path)
        kind = type_name(dtype)
        fill = fill_value if fill_value is not None else \
            {"float64": 0.0, "int64": 0, "bool": False, "string": ""}[kind]
        os.makedirs(path)
        arr = Array(path, array_doc(shape, chunks, dtype, fill, dims=dimension_names,
                                    attributes=attributes, compressed=compressors == "zstd"))
        arr.save()
        return arr
