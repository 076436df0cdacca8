"""LCA per use of a tied weight (``tied="split"``, docs/design.md §6).

A tied tensor is recorded once, under its canonical name, with its other names as aliases: one
``shared.weight`` may be the encoder embedding, the decoder embedding and the softmax matrix at
once. Its joint LCA (``tied="joint"``) sums all its uses. With ``"split"`` the replay gives
every *use* — every name under which the model holds the tensor — its own copy of it, moving by
the same Δ; each copy then gets its own gradient, hence its own LCA, and since the gradient of
a tied tensor is the sum of its uses' gradients, the uses add up to the joint LCA.

A use is a name of :meth:`torch.nn.Module.named_parameters` with ``remove_duplicate=False``.
Parameters tied by sharing one ``nn.Parameter`` between modules are untied by giving the alias's
module a new parameter; modules shared between several places (T5 hands one ``nn.Embedding``
to its encoder and decoder) are copied along the alias's path first, so that each place calls
its own module.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import nn


def tensor_uses(names: Sequence[str], aliases: Mapping[str, str], tied: str) -> dict[str, str]:
    """use name -> recorded (canonical) name, in recorded order, each tensor's aliases right
    after it; with ``tied="joint"`` (or no ties) every recorded name is its only use."""
    recorded = set(names)
    extra: dict[str, list[str]] = {}
    if tied == "split":
        for alias, canonical in aliases.items():
            if canonical in recorded:  # aliases of state tensors are not analysed
                extra.setdefault(canonical, []).append(alias)
    out = {}
    for name in names:
        out[name] = name
        for alias in extra.get(name, ()):
            out[alias] = name
    return out


def use_counts(token_counts: Mapping | None, uses: Mapping[str, str]) -> dict | None:
    """Token counts for each use: its own entry, else one given for any name of its tensor
    (tied uses index the same vocabulary)."""
    if not token_counts:
        return token_counts
    by_tensor: dict[str, object] = {}
    for key, value in token_counts.items():
        by_tensor.setdefault(uses.get(key, key), value)
    out = {}
    for use, canonical in uses.items():
        if use in token_counts:
            out[use] = token_counts[use]
        elif canonical in by_tensor:
            out[use] = by_tensor[canonical]
    # a count under a name that is no use stays, so the grouping can name it as unknown
    out.update({k: v for k, v in token_counts.items() if k not in uses and k not in out})
    return out


def untie(model: nn.Module, uses: Mapping[str, str]) -> None:
    """Give every alias use in ``uses`` its own parameter (a copy of the tied one), in place."""
    aliases = [u for u, c in uses.items() if u != c]
    if not aliases:
        return
    paths: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        paths[id(module)] = paths.get(id(module), 0) + 1
    for use in aliases:
        *path, attr = use.split(".")
        parent = model
        for part in path:
            child = parent._modules[part]
            if paths.get(id(child), 1) > 1:  # reached by several paths: this place gets a copy
                child = _own_copy(child)
                parent._modules[part] = child
            parent = child
        tied = parent._parameters[attr]
        parent._parameters[attr] = nn.Parameter(tied.detach().clone(),
                                                requires_grad=tied.requires_grad)


def _own_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with its own parameter, buffer and child tables, so that
    replacing an entry in the copy leaves the original's other users alone."""
    twin = copy.copy(module)
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    twin._modules = dict(module._modules)
    return twin
