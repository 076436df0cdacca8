"""The writer process's block-wise delta encoding and its files, against independent references:
the whole-array numpy encoding it replaced, the torch codec, and safetensors itself."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from tests.helpers_record import make_model, train
from tests.test_record_writer import near, numpy_of, random_bits

from replay.record.encoder import (
    NUMPY, DeltaEncoder, Scratch, encode, encode_into, tensor_file, to_safetensors, wide_dtype,
)
from replay.record.recorder import Recorder
from replay.store.codec import apply_delta, bits
from replay.store.files import AlignedBuffer, hexdigest
from replay.store.manifest import file_digest
from replay.store.trajectory import open_trajectory

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@np.errstate(all="ignore")
def whole_array_encode(prev: np.ndarray, nxt: np.ndarray, dtype: str) -> tuple:
    """The writer's previous encoding, pass by pass over whole arrays: the reference."""
    def raw(a):
        return a.view(_UINT[a.dtype.itemsize])

    if dtype in ("float32", "float64"):
        delta = nxt - prev
        recon = prev + delta
        wrong = raw(recon) != raw(nxt)
    else:
        if dtype == "bfloat16":
            start = (prev.astype(np.uint32) << np.uint32(16)).view(np.float32)
            target = (nxt.astype(np.uint32) << np.uint32(16)).view(np.float32)
        else:
            start, target = prev.astype(np.float32), nxt.astype(np.float32)
        delta = target - start
        recon = start + delta
        if dtype == "bfloat16":
            u = recon.view(np.uint32)
            narrow = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                      >> np.uint32(16)).astype(np.uint16)
        else:
            narrow = recon.astype(np.float16).view(np.uint16)
        wrong = narrow != raw(nxt)
    wrong |= np.isnan(recon)
    idx = np.flatnonzero(wrong).astype(np.int64)
    return delta, idx, nxt[idx]


def cases(dtype: torch.dtype, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Any bit pattern to any (NaN payloads, ±Inf, subnormals, ±0), training-like moves with
    sign flips, and special values next to ordinary ones."""
    g = torch.Generator().manual_seed(seed)
    prev = random_bits(dtype, n, g)
    ordinary = torch.randn(n, generator=g, dtype=torch.float64).mul(1e-2).to(dtype)
    special = ordinary.clone()
    pick = torch.randint(0, n, (n // 50,), generator=g)
    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
                           torch.finfo(dtype).tiny / 4, -torch.finfo(dtype).max], dtype=dtype)
    special[pick] = values[torch.randint(0, len(values), pick.shape, generator=g)]
    return [(prev, random_bits(dtype, n, g)), (prev, near(prev, g)),
            (ordinary, near(ordinary, g)), (ordinary, special), (special, ordinary)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("chunk", [7, 1 << 15])
def test_blockwise_encoding_equals_the_whole_array_encoding(dtype, chunk):
    # Sizes around block boundaries; blocks of 7 put boundaries everywhere.
    for n in (1, 6, 7, 8, 3 * chunk + 5 if chunk < 100 else 100_003):
        for start, target in cases(DTYPES[dtype], n, seed=n):
            p, x = numpy_of(start), numpy_of(target)
            delta = np.empty(n, NUMPY[wide_dtype(dtype)])
            idx = encode_into(p, x, dtype, delta, Scratch(chunk))
            ref_delta, ref_idx, _ = whole_array_encode(p, x, dtype)
            assert np.array_equal(delta.view(_UINT[delta.itemsize]),
                                  ref_delta.view(_UINT[delta.itemsize]))
            assert idx.dtype == np.int64 and np.array_equal(idx, ref_idx)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_special_value_is_rebuilt_bit_for_bit_by_the_torch_reader(dtype):
    for start, target in cases(DTYPES[dtype], 70_001, seed=5):
        delta, idx, val = encode(numpy_of(start), numpy_of(target), dtype)
        payload = {"x": torch.from_numpy(delta)}
        if idx.size:
            fix = torch.from_numpy(np.ascontiguousarray(val))
            payload["x::fix_idx"] = torch.from_numpy(idx)
            payload["x::fix_val"] = fix.view(torch.int16).view(torch.bfloat16) \
                if dtype == "bfloat16" else fix
        rebuilt = apply_delta({"x": start}, payload)["x"]
        assert torch.equal(bits(rebuilt), bits(target))


def split_file(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def reference_file(prevs: dict, nxts: dict, metadata: dict) -> bytes:
    """The delta file as the previous writer laid it out (whole-array encoding, to_safetensors)."""
    arrays = {}
    for dtype in prevs:
        delta, idx, val = whole_array_encode(prevs[dtype], nxts[dtype], dtype)
        arrays[f"delta.{dtype}"] = (delta, wide_dtype(dtype), [delta.size])
        if idx.size:
            arrays[f"fix_idx.{dtype}"] = (idx, "int64", [idx.size])
            arrays[f"fix_val.{dtype}"] = (val, dtype, [idx.size])
    return b"".join(bytes(c) for c in to_safetensors(arrays, {"format": "lca-replay-2",
                                                              **metadata}))


@pytest.mark.parametrize("groups", [["float32"], ["float64"], ["float16"], ["bfloat16"],
                                    ["bfloat16", "float32", "float16", "float64"]])
def test_delta_files_hold_the_reference_tensors_and_bytes(groups):
    sizes = {"float32": 40_001, "float64": 9, "float16": 33_333, "bfloat16": 12_345}
    encoder = DeltaEncoder([(d, sizes[d]) for d in groups], ("step", "next"))
    buf = AlignedBuffer()
    for k in range(len(cases(torch.float32, 4, 0))):          # with and without corrections
        pairs = {d: cases(DTYPES[d], sizes[d], seed=k)[k] for d in groups}
        prevs = {d: numpy_of(p) for d, (p, _) in pairs.items()}
        nxts = {d: numpy_of(x) for d, (_, x) in pairs.items()}
        meta = {"step": str(10 ** k), "next": str(10 ** k + 1)}
        length = encoder.fill(buf, prevs, nxts, meta)
        ours = bytes(buf.mem[:length])
        ref = reference_file(prevs, nxts, meta)
        (head, data), (ref_head, ref_data) = split_file(ours), split_file(ref)
        assert head == ref_head and data == ref_data       # same tensors, same bytes
        assert ours.index(data) == encoder.reserve and encoder.reserve % 64 == 0
        assert list(head) == list(ref_head)                # same order of tensors
        loaded, expected = safetensors.torch.load(ours), safetensors.torch.load(ref)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(bits(loaded[n]), bits(expected[n])) for n in loaded)


def test_a_longer_header_than_reserved_is_refused():
    encoder = DeltaEncoder([("float32", 3)], ("step",))
    x = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="exceeds the .* reserved"):
        encoder.fill(AlignedBuffer(), {"float32": x}, {"float32": x}, {"step": "1" * 400})


def test_keyframe_files_are_byte_identical_to_to_safetensors():
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.zeros(0, 2), "d": torch.arange(4), "e": torch.randn(2).double()}
    arrays = {k: (numpy_of(v), str(v.dtype).removeprefix("torch."), list(v.shape))
              for k, v in tensors.items()}
    buf = AlignedBuffer()
    length = tensor_file(buf, arrays, {"step": "3"})
    assert bytes(buf.mem[:length]) == b"".join(bytes(c) for c in to_safetensors(arrays,
                                                                               {"step": "3"}))


def test_a_growing_buffer_keeps_what_it_holds():
    buf = AlignedBuffer(10)
    buf.mem[:5] = b"abcde"
    buf.ensure(1 << 20, keep=5)
    assert len(buf) >= 1 << 20 and len(buf) % 4096 == 0 and buf.mem[:5] == b"abcde"


def record_twice(tmp_path, dtype, name: str):
    out = []
    for run in range(2):
        model = make_model(width=40, dtype=dtype, scale=1e-2)
        path = tmp_path / f"{name}-{run}"
        with Recorder(model, path, keyframe_every=4) as rec:
            train(model, 9, [rec])
        out.append(str(path))
    return out


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_recorded_files_and_hashes_are_reproducible_and_match_the_manifest(tmp_path, dtype):
    first, second = record_twice(tmp_path, dtype, str(dtype).removeprefix("torch."))
    traj = open_trajectory(first)
    traj.verify()
    other = open_trajectory(second)
    for (t, role, rel), again in zip(traj.files(), other.files()):
        assert (t, role, rel) == again
        data = open(os.path.join(first, rel), "rb").read()
        assert data == open(os.path.join(second, rel), "rb").read(), rel
        name, digest = file_digest(traj._entries[t], rel)
        assert digest == hexdigest(name, data) and name == "xxh3_128"
        assert file_digest(other._entries[t], rel) == (name, digest)
        assert len(data) == traj._entries[t]["bytes"][rel]
