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

import torch
from torch import nn

from replay.grouping.frequency import add_counts


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


def use_counts(token_counts: Mapping | None, uses: Mapping[str, str],
               aliases: Mapping[str, str]) -> dict | None:
    """Token counts for each use: its own entry, else the sum of those given for the other
    names of its tensor (tied uses index the same vocabulary)."""
    if not token_counts:
        return token_counts
    by_tensor: dict[str, object] = {}
    for key, value in token_counts.items():
        tensor = aliases.get(key, key)
        by_tensor[tensor] = (add_counts(by_tensor[tensor], value, tensor, key, "token counts")
                             if tensor in by_tensor else value)
    out = {}
    for use, canonical in uses.items():
        if use in token_counts:
            out[use] = token_counts[use]
        elif canonical in by_tensor:
            out[use] = by_tensor[canonical]
    # a count under a name that is no use stays, so the grouping can name it as unknown
    out.update({k: v for k, v in token_counts.items() if k not in uses and k not in out})
    return out


def reached_uses(task, uses: Mapping[str, str], batches: Sequence) -> dict[str, str]:
    """The uses the task's loss reaches on ``batches`` (collated, on the CPU), in order.

    A model may hold a tied tensor under a name it never computes with (Marian's and BART's
    ``model.shared.weight`` sits beside the encoder's, the decoder's and the softmax's uses): a
    copy there would always have zero gradient yet count in its group's size. Such uses are
    left out; a tensor whose uses all go unreached keeps its recorded name.
    """
    if all(u == c for u, c in uses.items()):
        return dict(uses)
    model = task.build_model()
    untie(model, uses)
    model.eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    names = list(uses)
    reached: set[str] = set()
    for batch in batches:
        loss_sum, _ = task.loss(model, batch)
        if loss_sum.requires_grad:
            grads = torch.autograd.grad(loss_sum, [params[n] for n in names], allow_unused=True)
            reached.update(n for n, g in zip(names, grads) if g is not None)
    out = {}
    for use, canonical in uses.items():
        kept = [u for u, c in uses.items() if c == canonical and u in reached]
        if use in kept or (not kept and use == canonical):
            out[use] = canonical
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
