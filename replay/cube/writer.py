"""The LCA cube on disk (DESIGN §7): a zarr store that xarray opens as step × group × dataset.

The layout is created once with every variable empty (NaN / 0 / False); replay tasks then fill
whole step chunks, and ``done`` is set after a chunk's data, so a crash never leaves a step
marked done without its numbers. Per-parameter cumulative LCA is kept beside the variables:
each replayed piece of steps writes its partial sums to ``param_lca_parts``; once every step is
done they are added in step order into ``param_lca/<dataset>``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr

from replay import __version__
from replay.errors import CubeError

FLOAT_VARS = ("loss", "loss_next", "residual")
PARTS, PARAMS = "param_lca_parts", "param_lca"
# Settings that do not change any number in the cube, so a cube may be resumed with another
# value: ``nonfinite`` only decides whether a non-finite step stops the run or is marked.
FREE_SETTINGS = ("nonfinite",)


@dataclass(frozen=True)
class Layout:
    """Coordinates of a cube. ``steps``/``step_ends`` (n,), one entry per replayed interval."""

    steps: np.ndarray
    step_ends: np.ndarray
    labels: tuple[str, ...]  # "grouping/name"
    groupings: tuple[str, ...]  # grouping of each label
    sizes: np.ndarray  # int64 |g| per label
    datasets: tuple[str, ...]
    chunk: int


def _quiet():
    # zarr flags v3 consolidated metadata as outside the spec; xarray reads it fine and it
    # makes open_zarr fast, so the notice is noise for our users.
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
    return ctx


def _template(layout: Layout, attrs: dict) -> xr.Dataset:
    n, g, d, c = len(layout.steps), len(layout.labels), len(layout.datasets), layout.chunk

    def empty(shape, dtype, fill):
        chunks = (c,) + shape[1:]
        return da.full(shape, fill, dtype=dtype, chunks=chunks)

    sgd, sd = ("step", "group", "dataset"), ("step", "dataset")
    data = {
        "lca": (sgd, empty((n, g, d), "f8", np.nan)),
        "helped": (sgd, empty((n, g, d), "i8", 0)),
        "loss": (sd, empty((n, d), "f8", np.nan)),
        "loss_next": (sd, empty((n, d), "f8", np.nan)),
        "residual": (sd, empty((n, d), "f8", np.nan)),
        "splits": (("step",), empty((n,), "i8", 0)),
        "done": (("step",), empty((n,), bool, False)),
    }
    coords = {
        "step": ("step", np.asarray(layout.steps, dtype=np.int64)),
        "step_end": ("step", np.asarray(layout.step_ends, dtype=np.int64)),
        "group": ("group", np.array(layout.labels, dtype=object)),
        "grouping": ("group", np.array(layout.groupings, dtype=object)),
        "group_size": ("group", np.asarray(layout.sizes, dtype=np.int64)),
        "dataset": ("dataset", np.array(layout.datasets, dtype=object)),
    }
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    ds["lca"].attrs.update(units="loss", long_name="loss change allocated to the group")
    ds["helped"].attrs.update(long_name="elements with LCA < 0")
    ds["splits"].attrs.update(long_name="quadrature sub-intervals; 0 = step skipped for "
                              "non-finite values (nonfinite='skip'): its lca and losses are NaN")
    return ds


def create(path: str, layout: Layout, attrs: dict) -> bool:
    """Write an empty cube; never touches an existing store.

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


def _write_empty(path: str, layout: Layout, attrs: dict) -> None:
    ds = _template(layout, attrs)
    c = layout.chunk
    encoding = {v: {"chunks": (c,) + ds[v].shape[1:]} for v in ds.data_vars}
    for v in ("lca",) + FLOAT_VARS:
        encoding[v]["fill_value"] = np.nan
    ctx = _quiet()
    try:
        ds.to_zarr(path, mode="w-", compute=False, encoding=encoding, zarr_format=3,
                   consolidated=True)
        root = zarr.open_group(path, mode="r+", use_consolidated=False)
        for name in layout.datasets:
            root.require_group(f"{PARTS}/{name}")
    except FileExistsError:
        raise CubeError(f"{path} already exists; pass it to resume, or choose another --cube") from None
    finally:
        ctx.__exit__(None, None, None)


def exists(path: str) -> bool:
    """True if a zarr group can be opened at ``path`` (a damaged one counts as absent)."""
    try:
        zarr.open_group(path, mode="r")
    except Exception:  # missing, or metadata that zarr cannot parse: not a cube either way
        return False
    return True


def read_attrs(path: str) -> dict:
    try:
        return dict(zarr.open_group(path, mode="r").attrs)
    except Exception as err:  # a cube is data: whatever is wrong with it, say so in one line
        raise CubeError(f"{path} is not an LCA cube ({err}); run `lca replay` to make one") from None


def check_compatible(path: str, layout: Layout, settings: dict) -> None:
    """Refuse to resume a cube made from another trajectory or with other settings."""
    attrs = read_attrs(path)
    if "settings" not in attrs:
        raise CubeError(f"{path} is not an LCA cube (no 'settings' attribute); choose another --cube")
    try:
        theirs = json.loads(attrs["settings"])
        root = zarr.open_group(path, mode="r", use_consolidated=False)
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
        return int(zarr.open_group(path, mode="r")["done"].chunks[0])
    except Exception as err:
        raise CubeError(f"{path} is not a readable LCA cube ({type(err).__name__}: {err}); "
                        "choose another --cube, or delete it and replay again") from None


class CubeWriter:
    """Region writes into an existing cube (the driver is the only writer of its steps)."""

    def __init__(self, path: str):
        self.path = path
        self.root = zarr.open_group(path, mode="r+", use_consolidated=False)
        self._arrays: dict = {}

    def _array(self, name: str):
        # Opening an array reads its metadata from the store (3 ms here); the per-step arrays
        # keep their shape for the cube's lifetime, so each is opened once per writer.
        if name not in self._arrays:
            self._arrays[name] = self.root[name]
        return self._arrays[name]

    def done_mask(self) -> np.ndarray:
        return np.asarray(self._array("done")[:], dtype=bool)

    def write(self, i0: int, i1: int, result: dict) -> None:
        """``result`` arrays cover intervals [i0, i1); ``done`` goes last."""
        for name in ("lca", "helped", "splits") + FLOAT_VARS:
            self._array(name)[i0:i1] = result[name]
        self._array("done")[i0:i1] = True

    # -- per-parameter cumulative LCA --------------------------------------------------------
    def drop_stale_parts(self, datasets, pieces) -> None:
        """Partials inside one of ``pieces`` ([i0, i1) each) whose steps are not done belong to
        an interrupted run."""
        done = self.done_mask()
        for name in datasets:
            group = self.root[f"{PARTS}/{name}"]
            for key in list(group.array_keys()):
                a, b = _part_range(key)
                if not done[a:b].all() and any(a >= i0 and b <= i1 for i0, i1 in pieces):
                    del group[key]

    def finalize_params(self, datasets, names, shapes) -> bool:
        """Add the partials in step order into ``param_lca/<dataset>``; False if incomplete.

        Crash-safe: an array is marked ``complete`` only after its data, and the partials are
        deleted only after every dataset's array is complete, so an interrupted finalisation
        (killed, disk full) is simply redone by the next run. Callers serialise it
        (``CubeLock.exclusive``) when several replays may finish at once.
        """
        n = self.root["done"].shape[0]
        if not self.done_mask().all():
            return False
        if all(_complete(self.root, d) for d in datasets) and not _leftover_parts(self.root):
            return True
        ctx = _quiet()
        try:
            for name in datasets:
                if _complete(self.root, name):
                    continue
                group = self.root[f"{PARTS}/{name}"]
                keys = sorted(group.array_keys(), key=_part_range)
                edges = [_part_range(k) for k in keys]
                if not edges or edges[0][0] != 0 or edges[-1][1] != n or any(
                        a[1] != b[0] for a, b in zip(edges, edges[1:])):
                    raise CubeError(
                        f"per-parameter LCA parts of {self.path} for {name!r} do not tile the "
                        f"steps ({edges[:4]}…); delete the cube and replay again"
                    )
                total = np.zeros(group[keys[0]].shape, dtype=np.float64)
                for key in keys:
                    total += group[key][:]
                arr = self.root.require_group(PARAMS).create_array(
                    name, shape=total.shape, dtype="f8", chunks=(min(total.size, 1 << 22),),
                    overwrite=True, attributes={"complete": False})
                arr[:] = total
                arr.attrs.update(names=list(names), shapes=[list(shapes[k]) for k in names],
                                 complete=True)
            parts = self.root[PARTS] if PARTS in self.root else None
            for name in datasets:
                if parts is not None and name in parts:
                    del self.root[f"{PARTS}/{name}"]
            zarr.consolidate_metadata(self.path)
        finally:
            ctx.__exit__(None, None, None)
        return True


def _leftover_parts(root) -> list[str]:
    return sorted(root[PARTS].group_keys()) if PARTS in root else []


def _complete(root, dataset: str) -> bool:
    # Cubes written before the "complete" flag have no such attribute: complete once written.
    return PARAMS in root and dataset in root[PARAMS] and \
        root[f"{PARAMS}/{dataset}"].attrs.get("complete", True) is True


def write_param_part(path: str, dataset: str, i0: int, i1: int, values: np.ndarray) -> None:
    """Called by a replay task: its steps' per-element LCA sums (D,) for one dataset."""
    group = zarr.open_group(path, mode="r+", path=f"{PARTS}/{dataset}", use_consolidated=False)
    arr = group.create_array(f"{i0:09d}-{i1:09d}", shape=values.shape, dtype="f8",
                             chunks=(min(values.size, 1 << 22),), overwrite=True)
    arr[:] = values


def _part_range(key: str) -> tuple[int, int]:
    a, b = key.split("-")
    return int(a), int(b)


def load_param_lca(cube_path: str) -> dict[str, dict[str, torch.Tensor]]:
    """Per-parameter cumulative LCA: {dataset: {parameter name: float64 tensor of its shape}}.

    Σ over every element of every parameter equals Σ_step Σ_group lca of any one grouping.
    """
    try:
        root = zarr.open_group(cube_path, mode="r", use_consolidated=False)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        raise CubeError(f"{cube_path} is not an LCA cube; run `lca replay` to make one") from None
    if PARAMS not in root or _leftover_parts(root):
        missing = int((~np.asarray(root["done"][:], dtype=bool)).sum()) if "done" in root else -1
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


def version_attrs() -> dict:
    return {"lca_replay_version": __version__}
