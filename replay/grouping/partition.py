"""A grouping: a partition of every recorded parameter element into named groups.

A :class:`Grouping` assigns each tensor either whole to one group (``tensor_group``) or row by
row (``row_groups``: one segment id per row, i.e. per index along dimension 0 — frequency
buckets of an embedding matrix). :class:`GroupingBuilder` collects assignments by label and
:func:`check_partition` proves the result is a partition (each element in exactly one group),
naming the offending tensors otherwise. Cube labels are ``"grouping/name"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from replay.errors import GroupingError

__all__ = ["Grouping", "GroupingBuilder", "check_partition"]


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
        check_name(name, "grouping name")
        self.name, self.names, self.shapes = name, list(names), shapes
        self._index: dict[str, int] = {}
        self.tensor_group: dict[str, int] = {}
        self.row_groups: dict[str, np.ndarray] = {}

    def label(self, label: str) -> int:
        if label not in self._index:
            check_name(label, f"group label in grouping {self.name!r}")
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
            sizes[g] += numel(self.shapes[tensor])
        for tensor, seg in self.row_groups.items():
            shape = self.shapes[tensor]
            sizes += np.bincount(seg, minlength=len(labels)).astype(np.int64) * (
                numel(shape) // shape[0])
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
                            f"{'s' if len(missing) > 1 else ''} unassigned: {name_list(missing)}; "
                            "add a rule or a `default:` group")
    both = [n for n in g.row_groups if n in g.tensor_group]
    if both:
        raise GroupingError(f"grouping {g.name!r} assigns {name_list(both)} both whole and by rows; "
                            "a tensor must be matched by a group rule or a row rule, not both")
    extra = sorted(set(g.tensor_group).union(g.row_groups) - set(names))
    if extra:
        raise GroupingError(f"grouping {g.name!r} mentions tensors that are not recorded "
                            f"parameters: {name_list(extra)}")
    for n, seg in g.row_groups.items():
        shape = tuple(shapes[n])
        if not shape or seg.shape != (shape[0],) or (seg.size and (
                seg.min() < 0 or seg.max() >= len(g.labels))):
            raise GroupingError(f"grouping {g.name!r} has a malformed row assignment for "
                                f"{n!r} (shape {shape}): need one group id per row")
    total = sum(numel(shapes[n]) for n in names)
    if int(g.sizes.sum()) != total or len(g.sizes) != len(g.labels) or (g.sizes < 0).any():
        raise GroupingError(f"grouping {g.name!r} has group sizes summing to "
                            f"{int(g.sizes.sum())}, not to the {total} recorded elements")


def check_name(text, what: str) -> None:
    if not isinstance(text, str) or not text or "/" in text:
        raise GroupingError(f"invalid {what} {text!r}: must be a non-empty string without '/' "
                            "(cube labels are 'grouping/name')")


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64))


def name_list(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")
