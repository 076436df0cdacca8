"""Layer stacks read from group labels: ``encoder.layers.3`` is layer 3 of stack ``encoder.layers``.

A label's stack is everything before its first all-digit dot-separated component, and that
component is the layer number: ``transformer.h.0`` (GPT-2), ``features.3`` (a torchvision
``Sequential``), ``layer1.0`` (a ResNet block), ``0`` (a top-level ``nn.Sequential``, stack
``""``). Labels of the ``layer`` preset look like this, and so do tensor names. Labels with no
numbered component (``decoder.output_projection``) are outside every stack. A model *has layer
stacks* when some stack holds at least two layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from analysis.ops import as_str

TOP_LEVEL = "(top level)"  # display name of the stack ""


@dataclass(frozen=True)
class Layer:
    stack: str
    number: int


def parse_layer(label: str) -> Layer | None:
    """``Layer(stack, number)`` of ``label``, or None when it has no all-digit component."""
    parts = str(label).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return Layer(".".join(parts[:i]), int(part))
    return None


def stacks(labels) -> dict[str, list[int]]:
    """Stack -> sorted distinct layer numbers, stacks in order of first appearance."""
    out: dict[str, set[int]] = {}
    for label in labels:
        layer = parse_layer(label)
        if layer is not None:
            out.setdefault(layer.stack, set()).add(layer.number)
    return {s: sorted(n) for s, n in out.items()}


def has_stacks(labels) -> bool:
    """True when some stack of ``labels`` holds at least two layers."""
    return any(len(n) >= 2 for n in stacks(labels).values())


def stack_name(stack: str) -> str:
    return stack or TOP_LEVEL


def by_layer(tot: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Totals (group, …) with ``group_size`` summed per layer: ``(layers, outside)``.

    ``layers`` has one entry per (stack, number), ordered by stack (first appearance) then
    number, labelled ``stack/number`` with coordinates ``stack`` and ``number``; several groups
    of one layer (a ResNet block's convolutions) add up. ``outside`` holds the groups outside
    every stack, unchanged (it may have no groups).
    """
    labels = as_str(tot["group"].values)
    parsed = [parse_layer(g) for g in labels]
    order = stacks(labels)
    keys = [(s, n) for s, numbers in order.items() for n in numbers]
    position = {k: i for i, k in enumerate(keys)}
    member = np.array([position[(p.stack, p.number)] if p else -1 for p in parsed])
    plain = tot.drop_vars([c for c in tot.coords if "group" in tot[c].dims and c != "group"])
    key = xr.DataArray(member, dims="group", coords={"group": plain["group"]}, name="layer")
    inside = member >= 0
    summed = plain.isel(group=np.flatnonzero(inside)).groupby(
        key.isel(group=np.flatnonzero(inside))).sum("group")
    summed = summed.rename(layer="group").reindex(group=np.arange(len(keys)))
    sizes = np.zeros(len(keys), dtype=np.int64)
    np.add.at(sizes, member[inside], np.asarray(tot["group_size"].values)[inside])
    layers = summed.assign_coords(
        group=np.array([f"{s}/{n}" for s, n in keys], dtype=object),
        stack=("group", np.array([s for s, _ in keys], dtype=object)),
        number=("group", np.array([n for _, n in keys], dtype=np.int64)),
        group_size=("group", sizes))
    return layers.transpose(*tot.dims), tot.isel(group=np.flatnonzero(~inside))
