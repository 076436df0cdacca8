"""The writer process's file encoding: bit-exact deltas and safetensors files, in numpy.

Torch-free, like :mod:`replay.record.writer`. :func:`encode` defines a delta exactly as
:func:`replay.store.codec.encode_delta` does; :class:`DeltaEncoder` computes it for whole dtype
groups straight into the buffer of the delta file, and :func:`tensor_file` lays out keyframe
and state files.

The encoding runs over blocks of CHUNK elements: every numpy pass of a block (difference,
reconstruction, comparison) then works in the core's L2 cache, and main memory sees each
operand once — about three times the speed of whole-array passes, which read and wrote every
temporary through memory, on a 50 M-parameter model.
"""

from __future__ import annotations

import json

import numpy as np

# numpy storage for each store dtype (bfloat16 as its raw 16 bits) and the safetensors code.
NUMPY = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32,
         "float64": np.float64, "int8": np.int8, "int16": np.int16, "int32": np.int32,
         "int64": np.int64, "uint8": np.uint8, "bool": np.bool_}
ST_CODE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
           "int8": "I8", "int16": "I16", "int32": "I32", "int64": "I64", "uint8": "U8",
           "bool": "BOOL"}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Elements per block: the block's operands and temporaries (~0.5 MB for float32) stay in L2.
CHUNK = 1 << 15
_WORST = str(-2 ** 63)       # the longest number a header can hold, for reserving its space


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(_UINT[a.dtype.itemsize])


def wide_dtype(dtype: str) -> str:
    """The dtype Δ is stored in: float64 for float64 parameters, float32 for the rest."""
    return "float64" if dtype == "float64" else "float32"


class Scratch:
    """Per-block temporaries, allocated once per writer."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.f32 = [np.empty(chunk, np.float32) for _ in range(3)]
        self.f64 = np.empty(chunk, np.float64)
        self.u32 = np.empty(chunk, np.uint32)
        self.f16 = np.empty(chunk, np.float16)
        self.mask = np.empty(chunk, np.bool_)


@np.errstate(all="ignore")      # Inf − Inf and friends are expected: they become corrections
def encode_into(prev: np.ndarray, nxt: np.ndarray, dtype: str, delta: np.ndarray,
                scratch: Scratch) -> np.ndarray:
    """Δ of one flat group into ``delta`` (n,) and the ascending int64 indices of the elements
    that need a correction.

    Δ = fl(θ_next − θ_t) in the delta dtype (float32, float64 for float64); an element needs a
    correction where the reader's ``(θ_t + Δ)`` cast back to ``dtype`` does not give θ_next's
    bits, and wherever that sum is NaN: IEEE leaves the payload of a NaN result to the
    implementation, and the reader (torch) may vectorise differently.
    """
    n, c = prev.size, scratch.chunk
    found = []
    for a in range(0, n, c):
        b = min(a + c, n)
        p, x, d, m = prev[a:b], nxt[a:b], delta[a:b], scratch.mask[:b - a]
        if dtype in ("float32", "float64"):
            r = (scratch.f64 if dtype == "float64" else scratch.f32[0])[:b - a]
            np.subtract(x, p, out=d)
            np.add(p, d, out=r)
            np.not_equal(bits(r), bits(x), out=m)
        else:
            sp, sx, r = (s[:b - a] for s in scratch.f32)
            _widen(p, dtype, sp)
            _widen(x, dtype, sx)
            np.subtract(sx, sp, out=d)
            np.add(sp, d, out=r)
            np.not_equal(_narrow(r, dtype, scratch), x.view(np.uint16), out=m)
        low = np.minimum.reduce(r)        # NaN iff some element of r is NaN
        if low != low:
            m |= np.isnan(r)
        if m.any():
            found.append(np.flatnonzero(m) + a)
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def _widen(a: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """``a`` (float16, or bfloat16 as raw uint16) exactly as float32, into ``out``."""
    if dtype == "bfloat16":       # the upper half of a float32
        np.left_shift(a, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, a)


def _narrow(a: np.ndarray, dtype: str, scratch: Scratch) -> np.ndarray:
    """Raw bits of float32 ``a`` rounded to ``dtype`` (nearest, ties to even, as torch does);
    a view of scratch memory, uint32 for bfloat16, uint16 for float16."""
    if dtype == "bfloat16":
        u, t = a.view(np.uint32), scratch.u32[:a.size]
        np.right_shift(u, np.uint32(16), out=t)
        np.bitwise_and(t, np.uint32(1), out=t)
        np.add(t, np.uint32(0x7FFF), out=t)
        np.add(t, u, out=t)                   # wraps modulo 2³², as uint32 arithmetic does
        np.right_shift(t, np.uint32(16), out=t)
        return t
    h = scratch.f16[:a.size]
    np.copyto(h, a, casting="unsafe")
    return h.view(np.uint16)


def encode(prev: np.ndarray, nxt: np.ndarray, dtype: str) -> tuple:
    """(Δ, fix_idx, fix_val) of one flat group, exactly as :func:`replay.store.codec.encode_delta`
    defines them (see :func:`encode_into`)."""
    delta = np.empty(prev.size, NUMPY[wide_dtype(dtype)])
    idx = encode_into(prev, nxt, dtype, delta, Scratch())
    return delta, idx, nxt[idx]


# ------------------------------------------------------------------------------- safetensors

def header(entries: list[tuple[str, str, list, int]], metadata: dict, reserve: int = 0) -> bytes:
    """The 8-byte length and JSON header of a safetensors file whose tensors are ``entries``
    (name, dtype name, shape, nbytes) in file order, padded with spaces to a multiple of 8
    bytes and to at least ``reserve`` bytes in all."""
    head: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        head[name] = {"dtype": ST_CODE[dtype], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (max(-len(text) % 8, reserve - 8 - len(text)))
    return len(text).to_bytes(8, "little") + text


def to_safetensors(arrays: dict[str, tuple[np.ndarray, str, list]], metadata: dict) -> list:
    """The safetensors file as byte chunks: ``arrays`` maps name -> (data, dtype name, shape)."""
    parts = [memoryview(np.ascontiguousarray(a)).cast("B") for a, _, _ in arrays.values()
             if a.nbytes]
    entries = [(name, dtype, shape, a.nbytes) for name, (a, dtype, shape) in arrays.items()]
    return [header(entries, metadata), *parts]


def tensor_file(buf, arrays: dict[str, tuple[np.ndarray, str, list]], metadata: dict) -> int:
    """:func:`to_safetensors`'s file assembled in ``buf`` (an AlignedBuffer); its length."""
    head = header([(name, dtype, shape, a.nbytes) for name, (a, dtype, shape) in arrays.items()],
                  metadata)
    length = len(head) + sum(a.nbytes for a, _, _ in arrays.values())
    buf.ensure(length)
    mem, pos = buf.mem, len(head)
    mem[:pos] = head
    for a, _, _ in arrays.values():
        if a.nbytes:
            np.frombuffer(mem, np.uint8, a.nbytes, pos)[:] = np.ascontiguousarray(a).view(
                np.uint8).reshape(-1)
            pos += a.nbytes
    return length


class DeltaEncoder:
    """Delta files of one parameter layout, encoded in place in a file buffer.

    Per dtype group ``D`` the file holds ``delta.D`` and, where some element needs one,
    ``fix_idx.D`` / ``fix_val.D`` (the format-2 layout of
    :meth:`replay.record.snapshot.FlatLayout.decode_delta`). The data starts at a fixed offset:
    the header's space is reserved for its longest form (every element corrected, 20-digit
    step numbers) rounded up to a cache line, so that Δ can be written where it belongs before
    the corrections, and so the header's length, are known; the header is padded with spaces
    to that length.
    """

    def __init__(self, groups: list[tuple[str, int]], meta_keys: tuple[str, ...]):
        self.groups = groups              # [(dtype name, numel)] in file order
        self.scratch = Scratch()
        worst = [e for dtype, n in groups for e in self._entries(dtype, n, n)]
        longest = len(header(worst, {"format": "lca-replay-2", **{k: _WORST for k in meta_keys}}))
        # Δ starts on a cache line: stores into it that straddle lines cost a third more.
        self.reserve = -(-longest // 64) * 64

    @staticmethod
    def _entries(dtype: str, n: int, k: int) -> list:
        wide = wide_dtype(dtype)
        out = [(f"delta.{dtype}", wide, [n], n * np.dtype(NUMPY[wide]).itemsize)]
        if k:
            out += [(f"fix_idx.{dtype}", "int64", [k], 8 * k),
                    (f"fix_val.{dtype}", dtype, [k], k * np.dtype(NUMPY[dtype]).itemsize)]
        return out

    def fill(self, buf, prevs: dict[str, np.ndarray], nxts: dict[str, np.ndarray],
             metadata: dict) -> int:
        """The delta file from ``prevs`` to ``nxts`` (flat arrays per dtype group) in ``buf``
        (an AlignedBuffer); its length in bytes."""
        pos, entries = self.reserve, []
        buf.ensure(pos + sum(n * np.dtype(NUMPY[wide_dtype(d)]).itemsize for d, n in self.groups))
        for dtype, n in self.groups:
            wide = NUMPY[wide_dtype(dtype)]
            buf.ensure(pos + n * np.dtype(wide).itemsize, keep=pos)
            delta = np.frombuffer(buf.mem, wide, n, pos)
            idx = encode_into(prevs[dtype], nxts[dtype], dtype, delta, self.scratch)
            del delta                     # a buffer that grows must have no views left
            pos += n * np.dtype(wide).itemsize
            if idx.size:
                val = nxts[dtype][idx]
                buf.ensure(pos + idx.nbytes + val.nbytes, keep=pos)
                for part in (idx, val):
                    buf.mem[pos:pos + part.nbytes] = part.tobytes()
                    pos += part.nbytes
            entries += self._entries(dtype, n, idx.size)
        head = header(entries, {"format": "lca-replay-2", **metadata}, self.reserve)
        if len(head) != self.reserve:     # metadata beyond what was reserved for: move the data
            raise ValueError(f"delta file header of {len(head)} bytes exceeds the "
                             f"{self.reserve} reserved for it")
        buf.mem[:len(head)] = head
        return pos
