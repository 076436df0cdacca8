"""Format 2's flat layout: where each parameter lives in one flat buffer per dtype.

A delta file holds, per dtype group, the parameters of that dtype concatenated in manifest
order (``delta.float32``, …), and the Recorder gathers its snapshots the same way; a
:class:`FlatLayout` maps names to spans of those buffers and back.
"""

from __future__ import annotations

import torch

from replay.store.codec import DTYPE_NAMES, FIX_IDX, FIX_VAL, delta_dtype, reconstruct

Flats = dict[torch.dtype, torch.Tensor]

# Format-2 delta file keys per dtype group, and the codec suffix each one carries.
_FLAT_KEYS = (("delta", ""), ("fix_idx", FIX_IDX), ("fix_val", FIX_VAL))


class FlatLayout:
    """Where each named tensor lives: dtype group, [start, end) in that group's flat buffer."""

    def __init__(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.names = [name for name, _, _ in specs]
        self.place: dict[str, tuple[torch.dtype, int, int, tuple[int, ...]]] = {}
        self.groups: dict[torch.dtype, list[str]] = {}
        sizes: dict[torch.dtype, int] = {}
        for name, shape, dtype in specs:
            start = sizes.get(dtype, 0)
            end = start + _numel(shape)
            self.place[name] = (dtype, start, end, tuple(shape))
            self.groups.setdefault(dtype, []).append(name)
            sizes[dtype] = end
        # (n_tensors + 1,) int64 boundaries per dtype, for mapping flat indices to tensors
        self._bounds = {d: torch.tensor([self.place[n][1] for n in names] + [sizes[d]])
                        for d, names in self.groups.items()}

    def size(self, dtype: torch.dtype) -> int:
        """Number of elements in the flat buffer of ``dtype``."""
        return int(self._bounds[dtype][-1])

    def split(self, flats: Flats, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Views ``name -> tensor`` (recorded shape) into ``flats``; no copy."""
        out = {}
        for name in self.names if names is None else names:
            dtype, start, end, shape = self.place[name]
            out[name] = flats[dtype][start:end].view(shape)
        return out

    def gather(self, params: dict[str, torch.Tensor]) -> Flats:
        """``params`` (name -> tensor of its dtype) copied into fresh flat buffers."""
        flats = {d: torch.empty(self.size(d), dtype=d) for d in self.groups}
        for name, view in self.split(flats).items():
            view.copy_(params[name])
        return flats

    def apply_delta(self, prev: Flats, payload: dict[str, torch.Tensor]) -> Flats:
        """θ_next in fresh flat buffers from θ_t's (``prev``) and a checked per-parameter delta
        payload, each parameter by :func:`replay.store.codec.reconstruct`."""
        flats = {d: torch.empty(self.size(d), dtype=d) for d in self.groups}
        start = self.split(prev)
        for name, recon in self.split(flats).items():
            reconstruct(start[name], payload, name, out=recon)
        return flats

    def flat_delta(self, payload: dict[str, torch.Tensor]
                   ) -> dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None,
                                                torch.Tensor | None]] | None:
        """A format-2 delta file as its flat (Δ, fix indices, fix values) per dtype group, when
        it passes every check of :meth:`decode_delta` and ``codec.check_delta_payload`` (the
        layout's, and Δ and the fixed values in the dtypes the parameters need); else None, and
        those two name the problem."""
        if self._problem(payload) is not None:
            return None
        out = {}
        for dtype in self.groups:
            tag = DTYPE_NAMES[dtype]
            delta, idx, val = (payload.get(f"{key}.{tag}") for key, _ in _FLAT_KEYS)
            if delta.dtype != delta_dtype(dtype) or (val is not None and val.dtype != dtype):
                return None
            out[dtype] = (delta, idx, val)
        return out

    def apply_flat(self, prev: Flats, parts) -> Flats:
        """θ_next in fresh flat buffers from θ_t's and :meth:`flat_delta`'s parts: element by
        element the arithmetic of :func:`~replay.store.codec.reconstruct`, in one operation
        per dtype group instead of one per parameter."""
        flats = {}
        for dtype, (delta, idx, val) in parts.items():
            if delta.dtype == dtype:
                new = torch.add(prev[dtype], delta)
            else:
                new = (prev[dtype].to(delta.dtype) + delta).to(dtype)
            if idx is not None:
                new[idx] = val
            flats[dtype] = new
        return flats

    def decode_delta(self, payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | str:
        """A format-2 delta file as the per-parameter payload that :func:`codec.apply_delta`
        takes (views, no copy), or a one-line description of what is wrong with it.

        Per dtype group ``D`` (e.g. ``float32``) the file holds ``delta.D``, the group's flat Δ
        (the parameters of that dtype concatenated in manifest order, encoded as in
        :mod:`replay.store.codec`) and, where some element needs one, ``fix_idx.D`` / ``fix_val.D``:
        ascending flat indices into the group and exact values. The writer is
        :func:`replay.record.writer.encode`."""
        problem = self._problem(payload)
        if problem is not None:
            return problem
        out: dict[str, torch.Tensor] = {}
        for dtype, names in self.groups.items():
            tag = DTYPE_NAMES[dtype]
            out.update(self.split({dtype: payload[f"delta.{tag}"]}, names))
            idx, val = payload.get(f"fix_idx.{tag}"), payload.get(f"fix_val.{tag}")
            if idx is None:
                continue
            bounds = self._bounds[dtype]
            # idx is ascending: cut it at the tensor boundaries.
            cuts = torch.searchsorted(idx, bounds).tolist()
            for i, name in enumerate(names):
                a, b = cuts[i], cuts[i + 1]
                if b > a:
                    out[name + FIX_IDX] = idx[a:b] - int(bounds[i])
                    out[name + FIX_VAL] = val[a:b]
        return out

    def _problem(self, payload: dict[str, torch.Tensor]) -> str | None:
        """What is wrong with a format-2 delta file's keys, flat shapes and corrections."""
        known = {f"{key}.{DTYPE_NAMES[d]}" for d in self.groups for key, _ in _FLAT_KEYS}
        extra = sorted(set(payload) - known)
        if extra:
            return f"holds unexpected tensor(s) {', '.join(map(repr, extra[:3]))}"
        for dtype in self.groups:
            tag, size = DTYPE_NAMES[dtype], self.size(dtype)
            delta = payload.get(f"delta.{tag}")
            if delta is None:
                return f"has no tensor 'delta.{tag}' for its {tag} parameters"
            if delta.dim() != 1 or delta.numel() != size:
                return f"tensor 'delta.{tag}' has shape {tuple(delta.shape)}, expected ({size},)"
            idx, val = payload.get(f"fix_idx.{tag}"), payload.get(f"fix_val.{tag}")
            if (idx is None) != (val is None):
                return f"has only one of 'fix_idx.{tag}' and 'fix_val.{tag}'"
            if idx is None:
                continue
            if idx.dtype != torch.int64 or idx.dim() != 1 or tuple(val.shape) != tuple(idx.shape):
                return f"correction of the {tag} parameters has wrong dtype or shape"
            if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0
                                or int(idx[-1]) >= size):
                return (f"correction of the {tag} parameters is not ascending within their "
                        f"{size} elements")
        return None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
