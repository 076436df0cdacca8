"""replay.cube.zarr_files writes what zarr and xarray write: the same zarr.json documents and
chunk bytes, read back the same by zarr, xarray and itself."""

import json
import os
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from replay.cube import writer, zarr_files
from replay.cube.schema import Coords


def layout(steps=130, chunk=48):
    starts = np.arange(0, 2 * steps, 2)
    labels = tuple(f"tensor/w{i}" for i in range(5)) + ("layer/0", "layer/1")
    return Coords(starts, starts + 2, labels, ("tensor",) * 5 + ("layer",) * 2,
                  np.arange(1, 8, dtype=np.int64) * 10, ("train", "test"), chunk)


ATTRS = {"settings": json.dumps({"a": 1}), "quadrature": "simpson", "tolerance": 0.001}


def nodes(root):
    """{relative path: zarr.json document} of every node under ``root`` but the root."""
    out = {}
    for where, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "c"]
        if "zarr.json" in files and where != root:
            with open(os.path.join(where, "zarr.json")) as f:
                out[os.path.relpath(where, root)] = json.load(f)
    return out


def chunk_files(root):
    out = {}
    for where, _, files in os.walk(root):
        if f"{os.sep}c" in where[len(root):]:
            for name in files:
                with open(os.path.join(where, name), "rb") as f:
                    out[os.path.relpath(os.path.join(where, name), root)] = f.read()
    return out


@pytest.fixture
def pair(tmp_path):
    """The same empty cube written through xarray and as files."""
    ref, ours = str(tmp_path / "ref.zarr"), str(tmp_path / "ours.zarr")
    writer._write_xarray(ref, layout(), ATTRS)
    writer._write_files(ours, layout(), ATTRS)
    return ref, ours


def test_an_empty_cube_is_what_xarray_writes(pair):
    ref, ours = pair
    assert nodes(ours) == nodes(ref)
    assert chunk_files(ours) == chunk_files(ref)          # the coordinates, byte for byte
    for path, doc in nodes(ref).items():       # keys in zarr's order too
        assert list(nodes(ours)[path]) == list(doc), path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr.testing.assert_identical(xr.open_zarr(ours).load(), xr.open_zarr(ref).load())
        xr.testing.assert_identical(xr.open_zarr(ours, consolidated=False).load(),
                                    xr.open_zarr(ref).load())


def test_consolidated_metadata_is_what_zarr_writes(pair):
    _, ours = pair
    with open(os.path.join(ours, "zarr.json")) as f:
        mine = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(ours)
    with open(os.path.join(ours, "zarr.json")) as f:
        theirs = json.load(f)
    assert mine == theirs
    assert "lca" in mine["consolidated_metadata"]["metadata"]


@pytest.mark.parametrize("name", ["lca", "helped", "loss", "splits", "done"])
def test_region_writes_match_zarr_byte_for_byte(pair, name):
    ref, ours = pair
    theirs, mine = zarr.open_group(ref, mode="r+")[name], zarr_files.Group(ours)[name]
    assert isinstance(mine, zarr_files.Array)
    rng = np.random.default_rng(0)
    model = np.asarray(theirs[:]).copy()
    # inside one chunk, across a chunk boundary, the edge chunk, a whole chunk, a rewrite
    for i0, i1 in [(3, 9), (40, 60), (120, 130), (48, 96), (5, 7)]:
        shape = (i1 - i0,) + theirs.shape[1:]
        values = rng.normal(size=shape) if model.dtype.kind == "f" else \
            rng.integers(0, 5, size=shape).astype(model.dtype)
        theirs[i0:i1] = values
        mine[i0:i1] = values
        model[i0:i1] = values
    np.testing.assert_array_equal(mine[:], model)
    np.testing.assert_array_equal(zarr.open_array(os.path.join(ours, name))[:], model)
    np.testing.assert_array_equal(mine[45:100], model[45:100])
    assert chunk_files(os.path.join(ours, name)) == chunk_files(os.path.join(ref, name))


def test_an_all_fill_chunk_is_not_stored_as_zarr_does(pair):
    ref, ours = pair
    for root in (zarr.open_group(ref, mode="r+"), zarr_files.Group(ours)):
        root["loss"][0:48] = np.ones((48, 2))
        root["loss"][0:48] = np.full((48, 2), np.nan)
    assert chunk_files(os.path.join(ours, "loss")) == chunk_files(os.path.join(ref, "loss")) == {}


def test_group_api_for_partial_sums(tmp_path):
    """What replay.cube.param_lca does with a group: uncompressed arrays in several chunks,
    attributes, listing, deleting."""
    ref, ours = zarr.open_group(str(tmp_path / "ref"), mode="w"), \
        zarr_files.Group.create(str(tmp_path / "ours"))
    rows = np.random.default_rng(1).normal(size=(3, 1000))
    for g in (ref, ours):
        parts = g.require_group("parts/train")
        arr = parts.create_array("000000000-000000009", shape=rows.shape, dtype="f8",
                                 chunks=(1, 384), compressors=None, overwrite=True,
                                 attributes={"edges": [[0, 3], [3, 6], [6, 9]]})
        arr[:] = rows
        arr.attrs["valid"] = [0, 2]
        flat = g.require_group("sums").create_array("train", shape=(1000,), dtype="f8",
                                                    chunks=(384,), compressors=None,
                                                    attributes={"complete": False})
        flat[:] = rows.sum(axis=0)
        flat.attrs.update(names=["w"], shapes=[[10, 100]], complete=True)
    assert nodes(str(tmp_path / "ours")) == nodes(str(tmp_path / "ref"))
    assert chunk_files(str(tmp_path / "ours")) == chunk_files(str(tmp_path / "ref"))
    again = zarr_files.Group(str(tmp_path / "ours"))
    assert again["parts/train"].array_keys() == ["000000000-000000009"]
    assert again.group_keys() == ["parts", "sums"] and "parts/train" in again
    part = again["parts/train"]["000000000-000000009"]
    assert part.ndim == 2 and part.attrs.get("valid") == [0, 2]
    np.testing.assert_array_equal(part[1:3], rows[1:3])
    del again["parts/train"]
    assert "parts/train" not in again and again["parts"].group_keys() == []
    with pytest.raises(KeyError):
        again["parts/train"]
    with pytest.raises(FileExistsError):
        again["sums"].create_array("train", shape=(3,), dtype="f8", chunks=(3,))


@pytest.mark.parametrize("shape,chunks", [((1000,), (384,)), ((10, 3), (4, 3)), ((10, 5), (4, 3))])
def test_an_uncompressed_edge_chunk_is_padded_as_zarr_pads_it(tmp_path, shape, chunks):
    """An edge chunk written whole is stored at the chunk's length, its tail the fill value,
    whether written in parts (along the first axis) or as one block (along another)."""
    values = np.random.default_rng(2).normal(size=shape)
    for g in (zarr.open_group(str(tmp_path / "ref"), mode="w"),
              zarr_files.Group.create(str(tmp_path / "ours"))):
        arr = g.create_array("a", shape=shape, dtype="f8", chunks=chunks, compressors=None,
                             fill_value=np.nan)
        arr[:] = values
    assert chunk_files(str(tmp_path / "ours")) == chunk_files(str(tmp_path / "ref"))
    np.testing.assert_array_equal(zarr_files.Group(str(tmp_path / "ours"))["a"][:], values)


def test_strings_and_missing_chunks_read_back(tmp_path):
    g = zarr_files.Group.create(str(tmp_path / "g"))
    names = np.array(["ä", "", "layer/10", "x" * 300], dtype=object)
    g.create_array("s", shape=(4,), dtype="str", chunks=(3,), compressors="zstd")[:] = names
    assert list(zarr.open_array(str(tmp_path / "g" / "s"))[:]) == list(names)
    assert list(g["s"][:]) == list(names)
    empty = g.create_array("e", shape=(5, 2), dtype="f8", chunks=(2, 2), fill_value=np.nan)
    assert np.isnan(empty[:]).all() and empty[:].shape == (5, 2)


def test_an_array_with_another_codec_is_left_to_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "c"), mode="w")
    root.create_array("b", shape=(10,), dtype="f8", chunks=(5,),
                      compressors=zarr.codecs.BloscCodec())[:] = np.arange(10.0)
    arr = zarr_files.Group(str(tmp_path / "c"))["b"]
    assert not isinstance(arr, zarr_files.Array)
    np.testing.assert_array_equal(arr[:], np.arange(10.0))


def test_a_damaged_or_missing_root_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        zarr_files.Group(str(tmp_path / "none"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError):
        zarr_files.Group(str(tmp_path / "bad"))
    assert not writer.exists(str(tmp_path / "bad"))
