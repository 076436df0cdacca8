"""Snapshots of a model: which tensors are recorded, and how they are gathered.

``model_tensors`` sorts a model's tensors into recorded parameters and state; :func:`gather`
copies them into one contiguous CPU buffer per dtype, laid out as the store's
:class:`~replay.store.flat_layout.FlatLayout`.

The recorder copies the model once per recorded step. Gathering with one ``torch.cat`` per
dtype (then one device-to-host copy) instead of a copy per tensor, and encoding one flat
buffer instead of hundreds of small tensors, keeps the per-step cost nearly independent of how
many tensors a model has.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from replay.errors import RecorderError
from replay.store.codec import DTYPE_NAMES, PARAM_DTYPES, STATE_DTYPES
from replay.store.flat_layout import Flats, FlatLayout


class Buffers:
    """Reusable snapshot buffers of a :class:`FlatLayout`: flat per dtype, plus views per tensor."""

    def __init__(self, flats: Flats, views: dict[torch.dtype, list[torch.Tensor]]):
        self.flats, self.views = flats, views


def buffers(layout: FlatLayout, flats: Flats) -> Buffers:
    """Snapshot buffers for :func:`gather` over the given flat ones, with views per tensor."""
    views = layout.split(flats)
    return Buffers(flats, {d: [views[n] for n in names] for d, names in layout.groups.items()})


def gather(layout: FlatLayout, tensors: Mapping[str, torch.Tensor], into: Buffers) -> None:
    """Copy ``tensors`` (checked by the caller) into the flat CPU buffers of ``into``.

    CPU tensors by one ``_foreach_copy_`` per dtype (no allocation, one dispatch for all
    tensors); tensors on an accelerator concatenated there and moved in one transfer.
    """
    for dtype, names in layout.groups.items():
        parts = [tensors[n] for n in names]
        if parts[0].is_cpu:             # others on a device: _foreach_copy_ copes
            with torch.no_grad():
                torch._foreach_copy_(into.views[dtype], parts)
            continue
        parts = [p.detach().reshape(-1) for p in parts]
        if len({p.device for p in parts}) > 1:      # model split across devices
            parts = [p.to("cpu") for p in parts]
        into.flats[dtype].copy_(torch.cat(parts))   # one transfer to the host


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


class Snapshotter:
    """Copies a model's recorded tensors into snapshot buffers at every step, cheaply.

    The tensors are looked up again each step (a module's tensor may be replaced), reading the
    module's ``_parameters`` / ``_buffers`` dict directly: ``nn.Module.__getattr__`` costs
    about a microsecond per tensor. When every tensor has the same storage address and shape as
    at the previous step and is still contiguous (so flat views made then still show it), and
    all are CPU tensors, one ``torch.cat`` per dtype into the buffer copies them all; otherwise
    each tensor goes through :func:`resolve`, which accepts it or raises its one-line error, and
    :func:`gather`.
    """

    def __init__(self, entries: list[tuple], layout: FlatLayout):
        self.entries = [(name, slot, spec) for name, slot, spec, *_ in entries]
        self.layout = layout
        self._tables = [module._parameters if attr in module._parameters else module._buffers
                        for _, (module, attr), _ in self.entries]
        self._attrs = [attr for _, (_, attr), _ in self.entries]
        # (data_ptr, shape, contiguous) per tensor, when cacheable: a square weight replaced by
        # its own transpose keeps address and shape, not contiguity.
        self._marks: list | None = None
        self._flat: dict[torch.dtype, list[torch.Tensor]] = {}

    def copy(self, step: int, into: Buffers) -> None:
        """Copy θ_step (or the state) into the flat buffers of ``into``."""
        try:
            marks = [(t.data_ptr(), t.shape, t.is_contiguous())
                     for t in map(dict.get, self._tables, self._attrs)]
        except AttributeError:    # a tensor left its module's dict: resolve() sorts it out
            marks = None
        if marks is not None and marks == self._marks:
            with torch.no_grad():
                for dtype, parts in self._flat.items():
                    torch.cat(parts, out=into.flats[dtype])
            return
        tensors = {name: resolve(name, slot, spec, step) for name, slot, spec in self.entries}
        self._cache(tensors)
        gather(self.layout, tensors, into)

    def _cache(self, tensors: dict[str, torch.Tensor]) -> None:
        self._marks = None
        found = [table.get(attr) for table, attr in zip(self._tables, self._attrs)]
        if any(a is not b for a, b in zip(found, tensors.values())) or not all(
                t.is_cpu and t.is_contiguous() for t in found):
            return
        self._marks = [(t.data_ptr(), t.shape, True) for t in found]
        self._flat = {dtype: [tensors[n].detach().view(-1) for n in names]
                      for dtype, names in self.layout.groups.items()}
