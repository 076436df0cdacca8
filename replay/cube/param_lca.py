"""Per-parameter cumulative LCA, kept in the cube beside its variables (docs/design.md §7).

Each replayed piece of steps writes its partial sums (Σ over its steps, per element and
dataset) to ``param_lca_parts/<dataset>/<i0>-<i1>``; once every step is done they are added in
step order into ``param_lca/<dataset>``, flat in the trajectory's parameter order, with the
names and shapes as attributes. :func:`load_param_lca` gives them back as tensors.

These arrays are stored uncompressed: float64 sums of products barely compress, and on a
model of tens of millions of parameters compressing them cost more than its replay's
gradient evaluations.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from replay.cube import zarr_files
from replay.cube.schema import PARAMS, PARTS, quiet
from replay.errors import CubeError

# Most values per chunk of these arrays (32 MB of float64): a chunk is what the finish holds
# in memory besides the total while it adds a task's sums.
CHUNK = 1 << 22


def chunk_length(size: int) -> int:
    """Values per chunk of a flat array of ``size``: at most CHUNK, and as even as the chunks
    can be. zarr stores an edge chunk at full length, so chunks of exactly CHUNK would pad a
    big model's last one with up to 32 MB of fill, written and first built in memory each time."""
    if size <= CHUNK:
        return max(1, size)
    return -(-size // -(-size // CHUNK))


def drop_stale_parts(writer, datasets, pieces, done: np.ndarray | None = None) -> None:
    """Rows of partial sums inside one of ``pieces`` ([i0, i1) each) whose steps are not done
    belong to an interrupted run: they are dropped (an array whose rows are all dropped is
    deleted; otherwise its ``valid`` attribute stops naming them). Rows elsewhere may be
    another live replay's, written just before its ``done`` flags."""
    done = writer.done_mask() if done is None else done
    for name in datasets:
        group = _parts(writer.root, name)
        for key in list(group.array_keys()) if group is not None else ():
            arr = group[key]
            rows = _rows(key, arr)
            stale = {j for j, (a, b) in rows.items()
                     if not done[a:b].all() and any(a >= i0 and b <= i1 for i0, i1 in pieces)}
            if not stale:
                continue
            keep = sorted(set(rows) - stale)
            if keep:
                arr.attrs["valid"] = keep
            else:
                del group[key]


def _rows(key: str, arr) -> dict[int, tuple[int, int]]:
    """The valid rows of one array of partial sums: {row index: (i0, i1)}. An array written by
    a worker is one flat row named by its steps; the driver's hold a row per piece."""
    if arr.ndim == 1:
        return {0: _part_range(key)}
    edges = [tuple(e) for e in arr.attrs["edges"]]
    valid = arr.attrs.get("valid", range(len(edges)))
    return {int(j): edges[int(j)] for j in valid}


def finalize(writer, datasets, names, shapes) -> bool:
    """Add the partials in step order into ``param_lca/<dataset>``; False if incomplete.

    Crash-safe: an array is marked ``complete`` only after its data, and the partials are
    deleted only after every dataset's array is complete, so an interrupted finalisation
    (killed, disk full) is simply redone by the next run. Callers serialise it
    (``CubeLock.exclusive``) when several replays may finish at once.
    """
    n = writer.root["done"].shape[0]
    if not writer.done_mask().all():
        return False
    if all(_complete(writer.root, d) for d in datasets) and not _leftover_parts(writer.root):
        return True
    ctx = quiet()
    try:
        for name in datasets:
            if _complete(writer.root, name):
                continue
            group = _parts(writer.root, name)
            rows, arrays = [], {}  # (i0, i1, array key, row index); the arrays by key
            for key in group.array_keys() if group is not None else ():
                arrays[key] = group[key]
                rows += [(a, b, key, j) for j, (a, b) in _rows(key, arrays[key]).items()]
            rows.sort()
            edges = [(a, b) for a, b, _, _ in rows]
            if not edges or edges[0][0] != 0 or edges[-1][1] != n or any(
                    a[1] != b[0] for a, b in zip(edges, edges[1:])):
                raise CubeError(
                    f"per-parameter LCA parts of {writer.path} for {name!r} do not tile the "
                    f"steps ({edges[:4]}…); delete the cube and replay again"
                )
            total, loaded, buf = None, {}, None
            for _, _, key, j in rows:
                arr = arrays[key]
                if total is None:
                    total = np.zeros(arr.shape[-1], dtype=np.float64)
                if arr.ndim == 1:  # a task's own sums (a big model): a chunk at a time
                    step = arr.chunks[0]
                    buf = np.empty(min(step, total.size)) if buf is None else buf
                    for a in range(0, total.size, step):
                        part = buf[:min(step, total.size - a)]
                        zarr_files.read_rows(arr, a, part)
                        total[a:a + step] += part
                    continue
                if key not in loaded:  # the driver's rows: one array at a time
                    loaded = {key: np.asarray(arr[:])}
                total += loaded[key][j]
            _write_total(writer.root, name, total, names, shapes)
        _drop_parts(writer, datasets)
    finally:
        ctx.__exit__(None, None, None)
    return True


def write_totals(writer, datasets, names, shapes, edges: list[tuple[int, int]],
                 rows: list[list[np.ndarray]]) -> None:
    """The finish of a replay whose driver holds every step's partial sums (``rows[k][d]``,
    pieces ``edges`` tiling the steps, in order): each dataset's total, added in step order as
    :func:`finalize` adds them, written without the partial sums going through the cube.
    Called before the steps' ``done`` flags are written: an interrupted run leaves complete
    totals and unfinished steps, which a resume completes (:func:`finalize` keeps the totals
    and removes the partial sums the resume wrote)."""
    n = writer.root["done"].shape[0]
    if not edges or edges[0][0] != 0 or edges[-1][1] != n or any(
            a[1] != b[0] for a, b in zip(edges, edges[1:])):
        raise ValueError(f"pieces {edges[:4]}… do not tile the {n} steps")
    ctx = quiet()
    try:
        for d, name in enumerate(datasets):
            total = np.zeros(rows[0][d].size, dtype=np.float64)
            for parts in rows:
                total += parts[d]
            _write_total(writer.root, name, total, names, shapes)
    finally:
        ctx.__exit__(None, None, None)


def drop_parts(writer, datasets) -> None:
    """After :func:`write_totals` and the steps' ``done`` flags: any groups of partial sums
    removed, the metadata consolidated."""
    ctx = quiet()
    try:
        _drop_parts(writer, datasets)
    finally:
        ctx.__exit__(None, None, None)


def _write_total(root, name: str, total: np.ndarray, names, shapes) -> None:
    # Marked complete only after its data: an interrupted write is redone by the next run.
    arr = root.require_group(PARAMS).create_array(
        name, shape=total.shape, dtype="f8", chunks=(chunk_length(total.size),),
        compressors=None, overwrite=True, attributes={"complete": False})
    arr[:] = total
    arr.attrs.update(names=list(names), shapes=[list(shapes[k]) for k in names], complete=True)


def _drop_parts(writer, datasets) -> None:
    parts = writer.root[PARTS] if PARTS in writer.root else None
    for name in datasets:
        if parts is not None and name in parts:
            del writer.root[f"{PARTS}/{name}"]
    zarr_files.consolidate(writer.path)


def _parts(root, dataset: str):
    """The group of ``dataset``'s partial sums, or None before its first write."""
    return root[f"{PARTS}/{dataset}"] if PARTS in root and dataset in root[PARTS] else None


def _leftover_parts(root) -> list[str]:
    return sorted(root[PARTS].group_keys()) if PARTS in root else []


def _complete(root, dataset: str) -> bool:
    # Cubes written before the "complete" flag have no such attribute: complete once written.
    return PARAMS in root and dataset in root[PARAMS] and \
        root[f"{PARAMS}/{dataset}"].attrs.get("complete", True) is True


def write_param_part(path: str, dataset: str, i0: int, i1: int, values: np.ndarray) -> None:
    """Called by a replay task: its steps' per-element LCA sums (D,) for one dataset."""
    # The group is made by the first write (several tasks may make it at once: a directory
    # and the same document, written atomically).
    group = zarr_files.open_root(path, mode="r+").require_group(f"{PARTS}/{dataset}")
    arr = group.create_array(f"{i0:09d}-{i1:09d}", shape=values.shape, dtype="f8",
                             chunks=(chunk_length(values.size),), compressors=None,
                             overwrite=True)
    arr[:] = values


def write_param_rows(root, dataset: str, edges: list[tuple[int, int]],
                     rows: list[np.ndarray]) -> None:
    """Called by the driver: the partial sums (D,) of the contiguous pieces ``edges``, one row
    each, as one array."""
    group = root.require_group(f"{PARTS}/{dataset}")
    size = rows[0].size
    # Rows share a chunk up to CHUNK values: on a small model, creating a file per row would
    # cost more than writing the piece's sums.
    chunks = (min(len(rows), max(1, CHUNK // size)), chunk_length(size))
    arr = group.create_array(f"{edges[0][0]:09d}-{edges[-1][1]:09d}", shape=(len(rows), size),
                             dtype="f8", chunks=chunks, compressors=None,
                             overwrite=True,
                             attributes={"edges": [list(e) for e in edges]})
    arr[:] = np.stack(rows)


def _settings(root) -> dict:
    try:
        return json.loads(root.attrs.get("settings", "{}"))
    except (TypeError, ValueError):
        return {}


def _part_range(key: str) -> tuple[int, int]:
    a, b = key.split("-")
    return int(a), int(b)


def load_param_lca(cube_path: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter cumulative LCA: {dataset: {parameter name: float64 tensor of its shape}}.

    Σ over every element of every parameter equals Σ_step Σ_group lca of any one grouping.
    """
    try:
        root = zarr_files.open_root(cube_path)
    except (OSError, ValueError):
        raise CubeError(f"{cube_path} is not an LCA cube; run `lca replay` to make one") from None
    if _settings(root).get("param_lca", True) is False:
        raise CubeError(f"{cube_path} was replayed with param_lca=False (CLI --no-param-lca) and "
                        "holds no per-parameter LCA; replay into another cube without it")
    missing = int((~np.asarray(root["done"][:], dtype=bool)).sum()) if "done" in root else -1
    if PARAMS not in root or _leftover_parts(root) or missing:
        why = f"{missing} steps missing" if missing else "all steps done, not yet added up"
        raise CubeError(
            f"per-parameter LCA of {cube_path} is not complete ({why}); "
            "run `lca replay` on it again to finish"
        )
    out = {}
    for dataset in sorted(root[PARAMS].array_keys()):
        arr = root[f"{PARAMS}/{dataset}"]
        if not _complete(root, dataset):
            raise CubeError(f"per-parameter LCA of {cube_path} for {dataset!r} was interrupted "
                            "while being written; run `lca replay` on the cube again to finish")
        flat = np.asarray(arr[:])
        names, shapes = arr.attrs["names"], arr.attrs["shapes"]
        tensors, off = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape, dtype=np.int64))
            tensors[name] = torch.from_numpy(flat[off:off + size].reshape(shape).copy())
            off += size
        out[dataset] = tensors
    return out
