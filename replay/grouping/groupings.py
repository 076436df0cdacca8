"""Groupings: partitions of every recorded parameter element into named groups (DESIGN §6).

A :class:`Grouping` assigns each tensor either whole to one group (``tensor_group``) or row by
row (``row_groups``: one segment id per row, i.e. per index along dimension 0 — frequency
buckets of an embedding matrix). :func:`resolve_groupings` builds groupings from a spec:

- a preset name: ``tensor``, ``layer``, ``transformer``, ``sparse-dense``
  (:mod:`replay.grouping.presets`), ``frequency`` or ``frequency:N``;
- a preset with options: ``{preset: frequency, buckets: 10, name: freq10}``;
- user rules (a YAML file path or the parsed dict, :mod:`replay.grouping.rules`);
- a list of the above (grouping names must be unique). A YAML file may hold a list too.

Every grouping is checked to be a partition (each element in exactly one group) before use;
:class:`replay.errors.GroupingError` names the offending tensors. Cube labels are
``"grouping/name"`` (:meth:`Grouping.qualified_labels`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from replay.errors import GroupingError
from replay.grouping.presets import PRESETS

__all__ = ["PRESET_NAMES", "Grouping", "frequency_buckets", "resolve_groupings"]

PRESET_NAMES = (*PRESETS, "frequency")
DEFAULT_BUCKETS = 25


@dataclass(frozen=True, eq=False)
class Grouping:
    """One partition of the recorded parameter elements.

    labels: group names inside the grouping (no ``"grouping/"`` prefix), cube order.
    tensor_group: parameter name -> group index, for tensors assigned whole.
    row_groups: parameter name -> int32[shape[0]] group index per row, for row-split tensors.
    sizes: int64[len(labels)], number of elements |g| of each group.
    unused_rules: the ``match`` regexes of user rules that matched no tensor (presets: empty).
    """

    name: str
    labels: tuple[str, ...]
    tensor_group: dict[str, int]
    row_groups: dict[str, np.ndarray]
    sizes: np.ndarray
    unused_rules: tuple[str, ...] = field(default=())

    def qualified_labels(self) -> list[str]:
        """Cube group labels, ``"grouping/name"``."""
        return [f"{self.name}/{label}" for label in self.labels]

    def members(self) -> dict[str, list[str]]:
        """Label -> names of the tensors with at least one element in the group."""
        out: dict[str, list[str]] = {label: [] for label in self.labels}
        for name, g in self.tensor_group.items():
            out[self.labels[g]].append(name)
        for name, seg in self.row_groups.items():
            for g in np.unique(seg):
                out[self.labels[g]].append(name)
        return out

    def fingerprint(self) -> str:
        """sha256 of the full assignment: equal iff two groupings assign every element alike."""
        h = hashlib.sha256(self.name.encode())
        for label in self.labels:
            h.update(b"\0L" + label.encode())
        for name in sorted(self.tensor_group):
            h.update(f"\0T{name}\0{self.tensor_group[name]}".encode())
        for name in sorted(self.row_groups):
            h.update(f"\0R{name}\0".encode() + np.ascontiguousarray(self.row_groups[name],
                                                                   "<i4").tobytes())
        return h.hexdigest()


class GroupingBuilder:
    """Collects per-tensor assignments by label and builds a checked :class:`Grouping`.

    Labels are numbered in order of first use; the same label from several tensors or rules is
    one group.
    """

    def __init__(self, name: str, names: Sequence[str], shapes: Mapping[str, Sequence[int]]):
        _check_name(name, "grouping name")
        self.name, self.names, self.shapes = name, list(names), shapes
        self._index: dict[str, int] = {}
        self.tensor_group: dict[str, int] = {}
        self.row_groups: dict[str, np.ndarray] = {}

    def label(self, label: str) -> int:
        if label not in self._index:
            _check_name(label, f"group label in grouping {self.name!r}")
            self._index[label] = len(self._index)
        return self._index[label]

    def whole(self, tensor: str, label: str) -> None:
        self.tensor_group[tensor] = self.label(label)

    def rows(self, tensor: str, row_labels: Sequence[str], seg: np.ndarray) -> None:
        """Row r of ``tensor`` goes to ``row_labels[seg[r]]``."""
        ids = np.array([self.label(lab) for lab in row_labels], np.int32)
        self.row_groups[tensor] = ids[np.asarray(seg, np.int64)]

    def build(self, unused_rules: Sequence[str] = ()) -> Grouping:
        labels = tuple(self._index)
        sizes = np.zeros(len(labels), np.int64)
        for tensor, g in self.tensor_group.items():
            sizes[g] += _numel(self.shapes[tensor])
        for tensor, seg in self.row_groups.items():
            shape = self.shapes[tensor]
            sizes += np.bincount(seg, minlength=len(labels)).astype(np.int64) * (
                _numel(shape) // shape[0])
        grouping = Grouping(self.name, labels, dict(self.tensor_group), dict(self.row_groups),
                            sizes, tuple(unused_rules))
        check_partition(grouping, self.names, self.shapes)
        return grouping


def check_partition(grouping: Grouping, names: Sequence[str],
                    shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise GroupingError unless every element of every tensor in ``names`` is in exactly one
    group of ``grouping`` (and the grouping mentions no other tensor)."""
    g = grouping
    missing = [n for n in names if n not in g.tensor_group and n not in g.row_groups]
    if missing:
        raise GroupingError(f"grouping {g.name!r} leaves {len(missing)} tensor"
                            f"{'s' if len(missing) > 1 else ''} unassigned: {_list(missing)}; "
                            "add a rule or a `default:` group")
    both = [n for n in g.row_groups if n in g.tensor_group]
    if both:
        raise GroupingError(f"grouping {g.name!r} assigns {_list(both)} both whole and by rows; "
                            "a tensor must be matched by a group rule or a row rule, not both")
    extra = sorted(set(g.tensor_group).union(g.row_groups) - set(names))
    if extra:
        raise GroupingError(f"grouping {g.name!r} mentions tensors that are not recorded "
                            f"parameters: {_list(extra)}")
    for n, seg in g.row_groups.items():
        shape = tuple(shapes[n])
        if not shape or seg.shape != (shape[0],) or (seg.size and (
                seg.min() < 0 or seg.max() >= len(g.labels))):
            raise GroupingError(f"grouping {g.name!r} has a malformed row assignment for "
                                f"{n!r} (shape {shape}): need one group id per row")
    total = sum(_numel(shapes[n]) for n in names)
    if int(g.sizes.sum()) != total or len(g.sizes) != len(g.labels) or (g.sizes < 0).any():
        raise GroupingError(f"grouping {g.name!r} has group sizes summing to "
                            f"{int(g.sizes.sum())}, not to the {total} recorded elements")


def frequency_buckets(counts, buckets: int) -> np.ndarray:
    """int32 bucket per row: rows ranked by count (descending, ties by row index), split into
    ``buckets`` equal ranges of rank (sizes differ by at most one, larger first); bucket 0 holds
    the most frequent rows. ``counts``: 1-D, length = number of rows."""
    c = np.asarray(counts, np.float64)
    order = np.argsort(-c, kind="stable")
    n = c.shape[0]
    seg = np.empty(n, np.int32)
    seg[order] = (np.arange(n, dtype=np.int64) * buckets) // max(n, 1)
    return seg


def bucket_labels(prefix: str, buckets: int) -> list[str]:
    """``prefix:f01`` … (zero-padded to at least two digits)."""
    width = max(2, len(str(buckets)))
    return [f"{prefix}:f{b + 1:0{width}d}" for b in range(buckets)]


def checked_counts(tensor: str, counts, shape: Sequence[int], buckets: int,
                   where: str) -> np.ndarray:
    """``counts`` as float64[shape[0]], validated for bucketing tensor ``tensor``."""
    if hasattr(counts, "detach"):
        counts = counts.detach().cpu().double().numpy()
    c = np.asarray(counts, np.float64)
    if not shape:
        raise GroupingError(f"{where}: tensor {tensor!r} is a scalar and has no rows to bucket")
    if c.shape != (shape[0],):
        raise GroupingError(f"{where}: token counts for {tensor!r} have shape {c.shape}, but the "
                            f"tensor has {shape[0]} rows (shape {tuple(shape)}); need one count "
                            "per row")
    if not np.isfinite(c).all() or (c < 0).any():
        raise GroupingError(f"{where}: token counts for {tensor!r} must be finite and >= 0")
    if shape[0] < buckets:
        raise GroupingError(f"{where}: tensor {tensor!r} has {shape[0]} rows, fewer than "
                            f"{buckets} buckets; ask for fewer (e.g. frequency:{shape[0]})")
    return c


def _frequency(name: str, buckets: int, names, shapes, token_counts, aliases) -> Grouping:
    where = f"grouping {name!r}"
    if not token_counts:
        raise GroupingError(f"{where} needs per-row token frequencies, but the task provides "
                            "none; implement Task.token_counts() returning {parameter name: "
                            "1-D tensor of counts per row}")
    counts = _canonical_counts(token_counts, names, aliases, where)
    b = GroupingBuilder(name, names, shapes)
    for tensor in names:
        if tensor in counts:
            c = checked_counts(tensor, counts[tensor], shapes[tensor], buckets, where)
            b.rows(tensor, bucket_labels(tensor, buckets), frequency_buckets(c, buckets))
    for tensor in names:
        if tensor not in counts:
            b.whole(tensor, "rest")
    return b.build()


def _canonical_counts(token_counts, names, aliases, where) -> dict:
    known, aliases = set(names), dict(aliases or {})
    out = {}
    for key, value in token_counts.items():
        canonical = aliases.get(key, key)
        if canonical not in known:
            raise GroupingError(f"{where}: Task.token_counts() names {key!r}, which is not a "
                                f"recorded parameter (recorded: {_list(list(names))})")
        out[canonical] = value
    return out


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
        raise GroupingError(f"no shape given for parameters {_list(lost)}")
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
        from replay.grouping.rules import load_yaml

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
            buckets = _buckets(item.partition(":")[2] or DEFAULT_BUCKETS, where)
            return _frequency("frequency", buckets, names, shapes, token_counts, aliases)
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
            buckets = _buckets(item.get("buckets", DEFAULT_BUCKETS), where)
            return _frequency(name, buckets, names, shapes, token_counts, aliases)
        if "buckets" in item:
            raise GroupingError(f"{where}: `buckets` applies only to preset 'frequency', not "
                                f"{preset!r}")
        if preset not in PRESETS:
            raise GroupingError(f"{where}: unknown preset {preset!r}; valid presets: "
                                f"{', '.join(PRESET_NAMES)}")
        return _preset(preset, name, names, shapes)
    if isinstance(item, Mapping):
        from replay.grouping.rules import rules_grouping

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


def _buckets(value, where) -> int:
    try:
        buckets = int(value)
        ok = buckets >= 1 and str(value).strip().lstrip("+").isdigit()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GroupingError(f"{where}: frequency buckets must be a positive integer, not "
                            f"{value!r} (e.g. frequency:10)")
    return buckets


def _check_name(text, what: str) -> None:
    if not isinstance(text, str) or not text or "/" in text:
        raise GroupingError(f"invalid {what} {text!r}: must be a non-empty string without '/' "
                            "(cube labels are 'grouping/name')")


def _numel(shape: Sequence[int]) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


def _list(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")
