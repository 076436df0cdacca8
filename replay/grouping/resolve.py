"""Resolving a grouping spec into checked groupings (docs/design.md §6).

A spec is a preset name (``tensor``, ``layer``, ``transformer``, ``sparse-dense`` —
:mod:`replay.grouping.presets` — ``frequency`` or ``frequency:N``), a preset with options
(``{preset: frequency, buckets: 10, name: freq10}``), user rules (a YAML file path or the parsed
dict, :mod:`replay.grouping.rules`), or a list of these (grouping names must be unique; a YAML
file may hold a list too). Every grouping is checked to be a partition before use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from replay.errors import GroupingError
from replay.grouping.frequency import DEFAULT_BUCKETS, frequency_grouping, parse_buckets
from replay.grouping.partition import Grouping, GroupingBuilder, name_list
from replay.grouping.presets import PRESETS, layer_labels
from replay.grouping.rules import load_yaml, rules_grouping

__all__ = ["PRESET_NAMES", "default_groupings", "resolve_groupings"]

PRESET_NAMES = (*PRESETS, "frequency")


def default_groupings(names: Sequence[str]) -> list[str]:
    """The groupings of a replay that names none: ``tensor``, and ``layer`` where it groups
    tensors together (layer stacks such as ``encoder.layers.N``, or modules with several
    tensors, e.g. a weight and its bias)."""
    layers = layer_labels(names)
    return ["tensor", "layer"] if len(set(layers.values())) < len(layers) else ["tensor"]


def resolve_groupings(spec, names: Sequence[str], shapes: Mapping[str, Sequence[int]],
                      token_counts: Mapping | None = None,
                      aliases: Mapping[str, str] | None = None) -> list[Grouping]:
    """Build and check the groupings of ``spec`` for the recorded parameters.

    spec: preset name | ``"frequency:N"`` | YAML path | dict | list of those.
    names: recorded parameter names (canonical order); shapes: name -> shape.
    token_counts: ``Task.token_counts()`` (name -> 1-D per-row counts), for frequency buckets.
    aliases: tied alias -> recorded name, so token counts given under an alias are accepted.
    """
    names = list(names)
    lost = [n for n in names if n not in shapes]
    if lost:
        raise GroupingError(f"no shape given for parameters {name_list(lost)}")
    specs = _flatten(spec, source=None)
    out: list[Grouping] = []
    for item, source in specs:
        out.append(_one(item, source, names, shapes, token_counts, aliases))
    seen: set[str] = set()
    for g in out:
        if g.name in seen:
            raise GroupingError(f"two groupings are named {g.name!r}; give each a unique name "
                                "(e.g. {preset: frequency, buckets: 10, name: freq10})")
        seen.add(g.name)
    return out


def _flatten(spec, source) -> list[tuple[object, str | None]]:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise GroupingError("the grouping list is empty; give at least one grouping "
                                f"(presets: {', '.join(PRESET_NAMES)})")
        return [pair for item in spec for pair in _flatten(item, source)]
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _is_file_spec(spec)):
        if source is not None:
            raise GroupingError(f"{source}: grouping files cannot include other files "
                                f"({os.fspath(spec)!r}); list presets or rule mappings")
        return _flatten(load_yaml(spec), source=os.fspath(spec))
    return [(spec, source)]


def _is_file_spec(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or (os.sep in spec and os.path.exists(spec)) or (
        spec not in PRESET_NAMES and not spec.startswith("frequency:") and os.path.isfile(spec))


def _one(item, source, names, shapes, token_counts, aliases) -> Grouping:
    where = source or "grouping spec"
    if isinstance(item, str):
        if item in PRESETS:
            return _preset(item, item, names, shapes)
        if item == "frequency" or item.startswith("frequency:"):
            buckets = parse_buckets(item.partition(":")[2] or DEFAULT_BUCKETS, where)
            return frequency_grouping("frequency", buckets, names, shapes, token_counts, aliases)
        raise GroupingError(f"unknown grouping {item!r} in {where}; use a preset "
                            f"({', '.join(PRESET_NAMES)}, frequency:N) or a path to a YAML "
                            "rules file")
    if isinstance(item, Mapping) and "preset" in item:
        allowed = {"preset", "name", "buckets"}
        unknown = sorted(set(map(str, item)) - allowed)
        if unknown:
            raise GroupingError(f"{where}: unknown key(s) {unknown} in preset entry; valid keys: "
                                f"{', '.join(sorted(allowed))}")
        preset = item["preset"]
        name = item.get("name", preset)
        if preset == "frequency":
            buckets = parse_buckets(item.get("buckets", DEFAULT_BUCKETS), where)
            return frequency_grouping(name, buckets, names, shapes, token_counts, aliases)
        if "buckets" in item:
            raise GroupingError(f"{where}: `buckets` applies only to preset 'frequency', not "
                                f"{preset!r}")
        if preset not in PRESETS:
            raise GroupingError(f"{where}: unknown preset {preset!r}; valid presets: "
                                f"{', '.join(PRESET_NAMES)}")
        return _preset(preset, name, names, shapes)
    if isinstance(item, Mapping):
        return rules_grouping(item, source, names, shapes, token_counts, aliases)
    raise GroupingError(f"{where}: a grouping must be a preset name, a YAML path or a mapping, "
                        f"not {type(item).__name__}")


def _preset(preset: str, name, names, shapes) -> Grouping:
    if not isinstance(name, str):
        raise GroupingError(f"grouping name must be a string, not {name!r}")
    b = GroupingBuilder(name, names, shapes)
    labels = PRESETS[preset](names)  # ordered by label rank; tensor_group keeps canonical order
    for label in labels.values():
        b.label(label)
    for tensor in names:
        b.whole(tensor, labels[tensor])
    return b.build()
