"""Bit-exact delta encoding of one parameter update θ_t → θ_next.

The encoding of one tensor ``name`` of shape S and dtype D is:

- ``name``: Δ = fl(θ_next − θ_t) of shape S, in the *delta dtype* (float64 for float64
  parameters, float32 otherwise), computed as ``θ_next.to(dd) - θ_t.to(dd)``;
- ``name::fix_idx`` (int64, (k,)) and ``name::fix_val`` (D, (k,)): the flat indices and exact
  values of the k elements where ``(θ_t.to(dd) + Δ).to(D)`` is not bit-identical to θ_next.
  Both keys are absent when k == 0.

Format-1 delta files hold exactly this per recorded parameter. Format 2 (written since 0.2)
applies it to one flat buffer per parameter dtype, the parameters concatenated in manifest order
(``delta.float32``, ``fix_idx.float32``, … see :meth:`replay.store.flat_layout.FlatLayout.decode_delta`):
the file header then no longer grows with the number of tensors, which for a model with many
small tensors is a visible share of the store.

Reconstruction ``apply_delta`` repeats the writer's arithmetic (IEEE add and cast are exactly
rounded, hence deterministic) and patches the listed elements, so it reproduces θ_next bit for
bit: comparisons are made on bit patterns, so NaN payloads and signed zeros survive too.
"""

from __future__ import annotations

import json

import torch

from replay.store import manifest

# Dtypes a trajectory may hold, by the names written in manifest.json (listed, torch-free, in
# replay.store.manifest for the writer process).
PARAM_DTYPES = {name: getattr(torch, name) for name in manifest.PARAM_DTYPES}
STATE_DTYPES = {name: getattr(torch, name) for name in manifest.STATE_DTYPES}
DTYPE_NAMES = {v: k for k, v in STATE_DTYPES.items()}

# Integer views of the same width: comparing these compares bit patterns (NaN-safe).
_BIT_VIEW = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

FIX_IDX = "::fix_idx"
FIX_VAL = "::fix_val"


def delta_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype Δ is stored in: float64 for float64 parameters, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of ``t`` with the same shape, for bitwise comparison."""
    view = _BIT_VIEW.get(t.dtype)
    return t.view(view) if view is not None else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True iff ``a`` and ``b`` have equal shape, dtype and bit patterns (NaN == NaN here)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(bits(a), bits(b)))


def encode_delta(prev: dict[str, torch.Tensor], nxt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of a delta file taking ``prev`` to ``nxt`` (same names, shapes and dtypes).

    Returns a dict ready for ``safetensors.torch.save``: per name Δ (shape S, delta dtype) and,
    where needed, ``::fix_idx`` int64 (k,) / ``::fix_val`` (k,) in the parameter dtype.
    """
    out: dict[str, torch.Tensor] = {}
    for name, target in nxt.items():
        start = prev[name]
        dd = delta_dtype(target.dtype)
        start_dd = start.to(dd)
        delta = (target.to(dd) - start_dd).contiguous()
        recon = (start_dd + delta).to(target.dtype)
        # Elements where one rounding of the sum does not land on θ_next (e.g. sign changes,
        # magnitudes far apart, overflow): store the exact value instead.
        wrong = (bits(recon) != bits(target)).reshape(-1).nonzero().reshape(-1)
        out[name] = delta
        if wrong.numel():
            out[name + FIX_IDX] = wrong.contiguous()
            out[name + FIX_VAL] = target.reshape(-1)[wrong].contiguous()
    return out


def apply_delta(
    prev: dict[str, torch.Tensor], payload: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ_next from θ_t (``prev``) and the tensors of a delta file; new tensors, bit-exact.

    ``payload`` must already have passed :func:`check_delta_payload`.
    """
    return {name: reconstruct(start, payload, name) for name, start in prev.items()}


def reconstruct(start: torch.Tensor, payload: dict[str, torch.Tensor], name: str,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One parameter's θ_next from its θ_t (``start``) and a checked delta payload: a new
    tensor, or written into ``out`` (start's shape and dtype) and returned."""
    delta = payload[name]
    if out is None:
        recon = (start.to(delta.dtype) + delta).to(start.dtype)
    elif delta.dtype == out.dtype:  # the same arithmetic, without the temporary
        recon = torch.add(start, delta, out=out)
    else:
        recon = out.copy_((start.to(delta.dtype) + delta).to(out.dtype))
    idx = payload.get(name + FIX_IDX)
    if idx is not None:
        recon.view(-1)[idx] = payload[name + FIX_VAL]
    return recon


def check_delta_payload(
    payload: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
) -> str | None:
    """What is wrong with a decoded delta file (missing/extra key, shape, dtype, index), or None."""
    expected = set(shapes)
    for name in shapes:
        if name not in payload:
            return f"has no tensor for parameter {name!r}"
        delta, dd = payload[name], delta_dtype(dtypes[name])
        if tuple(delta.shape) != tuple(shapes[name]) or delta.dtype != dd:
            return (f"tensor {name!r} is {DTYPE_NAMES.get(delta.dtype, delta.dtype)} "
                    f"{tuple(delta.shape)}, expected {DTYPE_NAMES[dd]} {tuple(shapes[name])}")
        idx, val = payload.get(name + FIX_IDX), payload.get(name + FIX_VAL)
        if (idx is None) != (val is None):
            return f"has only one of {name + FIX_IDX!r} and {name + FIX_VAL!r}"
        if idx is None:
            continue
        expected |= {name + FIX_IDX, name + FIX_VAL}
        n = delta.numel()
        if idx.dtype != torch.int64 or idx.dim() != 1 or val.dtype != dtypes[name] \
                or tuple(val.shape) != tuple(idx.shape):
            return f"correction of {name!r} has wrong dtype or shape"
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            return f"correction of {name!r} indexes outside its {n} elements"
    extra = sorted(set(payload) - expected)
    if extra:
        return f"holds unexpected tensor(s) {', '.join(map(repr, extra[:3]))}"
    return None


def check_tensors(
    tensors: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, torch.dtype],
    complete: bool,
) -> str | None:
    """What is wrong with a keyframe (``complete``) or state file's tensors, or None."""
    if complete:
        missing = [n for n in shapes if n not in tensors]
        if missing:
            return f"has no tensor for {missing[0]!r}" + (
                f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    for name, t in tensors.items():
        if name not in shapes:
            return f"holds unexpected tensor {name!r}"
        if tuple(t.shape) != tuple(shapes[name]) or t.dtype != dtypes[name]:
            return (f"tensor {name!r} is {DTYPE_NAMES.get(t.dtype, t.dtype)} {tuple(t.shape)}, "
                    f"expected {DTYPE_NAMES[dtypes[name]]} {tuple(shapes[name])}")
    return None


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (8-byte little-endian length + JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
