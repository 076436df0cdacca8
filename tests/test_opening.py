"""replay.cube.opening opens a local cube as ``xr.open_zarr`` does: the same variables, values,
coordinates, indexes, attributes and encodings, lazily, and hands every other store to it."""

from __future__ import annotations

import json
import os
import shutil

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import replay
from analysis import open_cube
from replay.cube import opening
from tests.test_engine import TASK, record


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return record(str(tmp_path_factory.mktemp("opening") / "traj"), steps=10)


def assert_as_xarray(path) -> xr.Dataset:
    ours, ref = opening.open_local(path), xr.open_zarr(path)
    assert ours is not None
    xr.testing.assert_identical(ours, ref)                  # values, coords, attributes
    for name, var in ref.variables.items():
        assert type(ours[name].data) is type(var.data), name   # dask where xarray is lazy
        assert ours[name].dtype == var.dtype, name
        assert repr(ours[name].encoding) == repr(var.encoding), name  # keys, order, codecs
        if isinstance(var.data, da.Array):
            assert ours[name].data.chunks == var.data.chunks, name
    for name, index in ref.indexes.items():
        assert ours.indexes[name].dtype == index.dtype, name
    assert ours.encoding == ref.encoding
    return ours


@pytest.mark.parametrize("kw", [
    dict(quadrature="simpson", datasets=["train", "test"], groups=["tensor", "layer"]),
    dict(gradient=replay.Sampled(batches=1, batch_size=16), quadrature="first-order",
         param_lca=False),
    dict(quadrature="adaptive", precision="float64", chunk_size=3),
], ids=["simpson-two-groupings", "sampled-no-param-lca", "adaptive-chunked"])
def test_a_replay_cube_opens_as_xarray_opens_it(store, tmp_path, kw):
    out = str(tmp_path / "cube.zarr")
    ds = replay.run(store, task=TASK, scheduler="sync", progress=False, out=out, **kw)
    assert ds["lca"].data.name.startswith("open_cube-")  # replay.run returns this opening
    assert_as_xarray(out)


def test_a_partial_cube_reads_its_missing_chunks_as_fill(store, tmp_path):
    out = str(tmp_path / "part.zarr")
    replay.run(store, task=TASK, scheduler="sync", progress=False, out=out, chunk_size=2,
               steps="2:4")
    assert not any(os.path.exists(os.path.join(out, "lca", "c", str(k))) for k in (0, 2, 4))
    ds = assert_as_xarray(out)
    assert ds.done.values.tolist() == [2 <= t < 4 for t in range(10)]
    assert np.isnan(ds["lca"].values[0]).all() and np.isfinite(ds["lca"].values[2:4]).all()
    assert open_cube(out).identical(xr.open_zarr(out))


def test_every_opening_reads_the_files_as_they_are_when_computed(store, tmp_path):
    out = str(tmp_path / "late.zarr")
    kw = dict(task=TASK, scheduler="sync", progress=False, out=out, chunk_size=2)
    early = replay.run(store, steps="0:2", **kw)
    later = replay.run(store, **kw)                  # the same cube, resumed to the end
    assert early["lca"].data.name != later["lca"].data.name   # no dask key shared between openings
    assert early.done.values.all()                   # read now: the whole cube is written
    # Computed in worker processes too: the graph holds only paths, documents and indices.
    with dask.config.set(scheduler="processes", num_workers=2):
        assert np.array_equal(later["lca"].values, xr.open_zarr(out)["lca"].values, equal_nan=True)


@pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata")
@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
def test_other_stores_go_to_xarray(store, tmp_path):
    out = str(tmp_path / "cube.zarr")
    replay.run(store, task=TASK, scheduler="sync", progress=False, out=out)
    assert opening.open_local("memory://cube") is None        # not a local path
    assert opening.open_local(str(tmp_path / "missing.zarr")) is None

    plain = str(tmp_path / "plain.zarr")                     # no consolidated metadata
    shutil.copytree(out, plain)
    root = os.path.join(plain, "zarr.json")
    with open(root) as f:
        doc = json.load(f)
    del doc["consolidated_metadata"]
    with open(root, "w") as f:
        json.dump(doc, f)
    assert opening.open_local(plain) is None
    xr.testing.assert_identical(opening.open_dataset(plain), xr.open_zarr(plain))

    other = str(tmp_path / "blosc.zarr")                     # an array of another codec
    shutil.copytree(out, other)
    group = zarr.open_group(other, mode="r+")
    extra = group.create_array("extra", shape=(10,), dtype="float64", chunks=(10,),
                               compressors=zarr.codecs.BloscCodec(), dimension_names=["step"])
    extra[:] = np.arange(10.0)
    zarr.consolidate_metadata(other)
    assert opening.open_local(other) is None
    assert opening.open_dataset(other).extra.values.tolist() == list(range(10))
