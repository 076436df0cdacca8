"""Snapshots of a model: which tensors are recorded, and how they are gathered.

``model_tensors`` sorts a model's tensors into recorded parameters and state; a
:class:`FlatLayout` gathers into one contiguous CPU buffer per dtype.

The recorder copies the model once per recorded step. Gathering with one ``torch.cat`` per
dtype (then one device-to-host copy) instead of a copy per tensor, and encoding one flat
buffer instead of hundreds of small tensors, keeps the per-step cost independent of how many
tensors a model has: the writer thread then holds the GIL for a few torch calls, not thousands.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from replay.codec import (
    DTYPE_NAMES, FIX_IDX, FIX_VAL, PARAM_DTYPES, STATE_DTYPES, bits, encode_delta,
)
from replay.errors import RecorderError

Flats = dict[torch.dtype, torch.Tensor]


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

    def gather(self, tensors: Mapping[str, torch.Tensor]) -> Flats:
        """A fresh CPU copy of ``tensors`` (checked by the caller): one 1-D buffer per dtype."""
        flats = {}
        for dtype, names in self.groups.items():
            parts = [tensors[n].detach().reshape(-1) for n in names]
            if len({p.device for p in parts}) > 1:      # model split across devices
                parts = [p.to("cpu") for p in parts]
            flat = torch.cat(parts)                     # always a new tensor: the snapshot
            flats[dtype] = flat if flat.device.type == "cpu" else flat.to("cpu")
        return flats

    def split(self, flats: Flats, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Views ``name -> tensor`` (recorded shape) into ``flats``; no copy."""
        out = {}
        for name in self.names if names is None else names:
            dtype, start, end, shape = self.place[name]
            out[name] = flats[dtype][start:end].view(shape)
        return out

    def encode_delta(self, prev: Flats, nxt: Flats) -> dict[str, torch.Tensor]:
        """The tensors of a delta file (see :mod:`replay.codec`), encoded per dtype buffer."""
        out: dict[str, torch.Tensor] = {}
        for dtype, names in self.groups.items():
            enc = encode_delta({"flat": prev[dtype]}, {"flat": nxt[dtype]})
            out.update(self.split({dtype: enc["flat"]}, names))
            idx = enc.get("flat" + FIX_IDX)
            if idx is None:
                continue
            val, bounds = enc["flat" + FIX_VAL], self._bounds[dtype]
            # idx is ascending (nonzero order): cut it at the tensor boundaries.
            cuts = torch.searchsorted(idx, bounds).tolist()
            for i, name in enumerate(names):
                a, b = cuts[i], cuts[i + 1]
                if b > a:
                    out[name + FIX_IDX] = idx[a:b] - int(bounds[i])
                    out[name + FIX_VAL] = val[a:b]
        return out

    def changed(self, prev: Flats, nxt: Flats) -> list[str]:
        """Names whose bytes differ between two snapshots, in layout order."""
        hit: set[str] = set()
        for dtype, names in self.groups.items():
            where = (bits(prev[dtype]) != bits(nxt[dtype])).nonzero().reshape(-1)
            if where.numel():
                which = torch.searchsorted(self._bounds[dtype], where, right=True) - 1
                hit.update(names[i] for i in torch.unique(which).tolist())
        return [n for n in self.names if n in hit]


def model_tensors(model: torch.nn.Module):
    """(recorded params, state tensors, aliases) of a model.

    Recorded: trainable parameters, tied ones once (the first name is canonical). State: frozen
    parameters and persistent buffers, each with its kind. Each tensor as ``(name, (module,
    attr), (shape, dtype))`` [+ kind], so that it can be looked up again at every step.
    """
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    params, state = [], []

    def slot(name):
        mod_name, _, attr = name.rpartition(".")
        return (model.get_submodule(mod_name) if mod_name else model), attr

    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        if p.dtype not in DTYPE_NAMES or DTYPE_NAMES[p.dtype] not in PARAM_DTYPES:
            raise RecorderError(f"parameter {name!r} has dtype {p.dtype}; the trajectory "
                                f"format records {', '.join(PARAM_DTYPES)}")
        spec = (tuple(p.shape), p.dtype)
        if p.requires_grad:
            params.append((name, slot(name), spec))
        else:
            state.append((name, slot(name), spec, "frozen"))
    for name, b in model.named_buffers(remove_duplicate=False):
        module, attr = slot(name)
        if attr in module._non_persistent_buffers_set:
            continue     # derived caches, not part of the state_dict
        if id(b) in seen:
            aliases[name] = seen[id(b)]
            continue
        seen[id(b)] = name
        if b.dtype not in DTYPE_NAMES:
            raise RecorderError(f"buffer {name!r} has dtype {b.dtype}, which the trajectory "
                                f"format cannot store ({', '.join(STATE_DTYPES)})")
        state.append((name, (module, attr), (tuple(b.shape), b.dtype), "buffer"))
    return params, state, aliases


def manifest_spec(name: str, spec: tuple) -> dict:
    return {"name": name, "shape": list(spec[0]), "dtype": DTYPE_NAMES[spec[1]]}


def resolve(name: str, slot: tuple, spec: tuple, step: int) -> torch.Tensor:
    """The tensor now in ``slot`` (looked up each time: it may have been replaced); its shape
    and dtype must not have changed."""
    module, attr = slot
    tensor = getattr(module, attr, None)
    if tensor is None:
        raise RecorderError(f"tensor {name!r} disappeared from the model at step {step}; "
                            "a trajectory records a fixed set of tensors")
    if tuple(tensor.shape) != spec[0] or tensor.dtype != spec[1]:
        raise RecorderError(
            f"tensor {name!r} changed from {DTYPE_NAMES.get(spec[1], spec[1])} {spec[0]} to "
            f"{DTYPE_NAMES.get(tensor.dtype, tensor.dtype)} {tuple(tensor.shape)} at step "
            f"{step}; a trajectory needs fixed shapes and dtypes: record the changed model "
            "into a new path")
    return tensor



def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
