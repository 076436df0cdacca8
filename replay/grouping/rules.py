"""User-defined groupings from YAML rules (docs/design.md §6). See ``configs/groups-example.yaml``.

::

    name: mine                       # grouping name (cube labels are "mine/<group>")
    groups:                          # ordered; the first rule whose regex matches a name wins
      - name: "layer_{1}"            # label; {1} = capture 1, {word} = named capture,
        match: 'layers\\.(\\d+)\\.'    #   {1+1} = capture 1 plus one (integer captures)
      - name: emb
        match: 'embed'
    rows:                            # optional: split a matrix's rows (dimension 0) into buckets
      - match: 'embed_tokens\\.weight$'
        buckets: 10
        by: frequency                # frequency (Task.token_counts, most frequent first) | index
        name: "{0}"                  # optional label prefix (default: the tensor name)
    default: rest                    # optional: label for tensors no rule matches

Regexes are applied with ``re.search`` (anchor with ``^``/``$``). A tensor must be matched by a
group rule or a row rule, not both; with no ``default`` an unmatched tensor is an error. Row
buckets are labelled ``<prefix>:f01``…; tensors whose prefix is the same share bucket groups.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import yaml

from replay.errors import GroupingError
from replay.grouping.frequency import (bucket_labels, canonical_counts, checked_counts,
                                       frequency_buckets)
from replay.grouping.partition import Grouping, GroupingBuilder

__all__ = ["load_yaml", "rules_grouping"]

_TOP_KEYS = ("name", "groups", "rows", "default")
_GROUP_KEYS = ("name", "match")
_ROW_KEYS = ("match", "buckets", "by", "name")
_FIELD = re.compile(r"\{\{|\}\}|\{(\w+)\s*(?:([+-])\s*(\d+))?\}")


def load_yaml(path) -> object:
    """Parse a grouping YAML file (``yaml.safe_load``)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise GroupingError(f"grouping file {path!r} does not exist; give a preset or an "
                            "existing YAML file (see configs/groups-example.yaml)") from None
    except yaml.YAMLError as err:
        raise GroupingError(f"grouping file {path!r} is not valid YAML: "
                            f"{' '.join(str(err).split())}") from None
    if not isinstance(data, (Mapping, list)):
        raise GroupingError(f"grouping file {path!r} must hold a mapping (one grouping) or a "
                            f"list of groupings, not {type(data).__name__}")
    return data


class _Rule:
    """One ``groups``/``rows`` entry: compiled regex and label template."""

    def __init__(self, entry, kind: str, index: int, where: str):
        keys = _GROUP_KEYS if kind == "groups" else _ROW_KEYS
        here = f"{where}: {kind} rule {index + 1}"
        if not isinstance(entry, Mapping):
            raise GroupingError(f"{here} must be a mapping with keys {', '.join(keys)}")
        unknown = sorted(set(map(str, entry)) - set(keys))
        if unknown:
            raise GroupingError(f"{here}: unknown key(s) {unknown}; valid keys: "
                                f"{', '.join(keys)}")
        required = ("name", "match") if kind == "groups" else ("match", "buckets")
        for key in required:
            if not isinstance(entry.get(key), (str, int)) or isinstance(entry.get(key), bool):
                raise GroupingError(f"{here}: `{key}` is required")
        self.pattern = str(entry["match"])
        here = f"{where}: {kind} rule {index + 1} ({self.pattern!r})"
        try:
            self.regex = re.compile(self.pattern)
        except re.error as err:
            raise GroupingError(f"{here} has an invalid regex: {err}") from None
        self.template = entry.get("name")
        if self.template is not None:
            self.template = str(self.template)
            self._check_template(here)
        if kind == "rows":
            buckets = entry["buckets"]
            if not isinstance(buckets, int) or isinstance(buckets, bool) or buckets < 1:
                raise GroupingError(f"{here}: `buckets` must be a positive integer, not "
                                    f"{buckets!r}")
            self.buckets = buckets
            self.by = entry.get("by", "frequency")
            if self.by not in ("frequency", "index"):
                raise GroupingError(f"{here}: `by` must be 'frequency' or 'index', not "
                                    f"{self.by!r}")
        self.here = here
        self.rule = f"{kind} rule {index + 1} ({self.pattern!r})"  # without the grouping prefix
        self.used = False

    def _check_template(self, here: str) -> None:
        for m in _FIELD.finditer(self.template):
            key = m.group(1)
            if key is None:
                continue
            ok = int(key) <= self.regex.groups if key.isdigit() else key in self.regex.groupindex
            if not ok:
                raise GroupingError(f"{here}: label {self.template!r} uses {{{key}}}, but the "
                                    f"regex has {self.regex.groups} capture group(s)")

    def label(self, m: re.Match, tensor: str) -> str:
        def field(f: re.Match) -> str:
            if f.group(1) is None:
                return f.group(0)[0]
            key = f.group(1)
            value = m.group(int(key) if key.isdigit() else key)
            if value is None:
                raise GroupingError(f"{self.here}: capture {{{key}}} did not take part in the "
                                    f"match of tensor {tensor!r}")
            if f.group(2):
                try:
                    number = int(value)
                except ValueError:
                    raise GroupingError(f"{self.here}: capture {{{key}}} of tensor {tensor!r} "
                                        f"is {value!r}, not an integer") from None
                value = str(number + int(f.group(3)) if f.group(2) == "+"
                            else number - int(f.group(3)))
            return value

        return _FIELD.sub(field, self.template)


def rules_grouping(spec: Mapping, source: str | None, names: Sequence[str],
                   shapes: Mapping[str, Sequence[int]], token_counts: Mapping | None,
                   aliases: Mapping[str, str] | None) -> Grouping:
    """Build the grouping described by a parsed rules mapping (see module docstring).

    source: the YAML file it came from (for messages), or None for a mapping given directly.
    """
    where = source or "grouping spec"
    unknown = sorted(set(map(str, spec)) - set(_TOP_KEYS))
    if unknown:
        raise GroupingError(f"{where}: unknown key(s) {unknown} in grouping; valid keys: "
                            f"{', '.join(_TOP_KEYS)} (or `preset` for a preset)")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise GroupingError(f"{where}: a rules grouping needs a `name:` (a string)")
    where = f"{source}: grouping {name!r}" if source else f"grouping {name!r}"
    groups = _entries(spec, "groups", where)
    rows = _entries(spec, "rows", where)
    if not groups and not rows and "default" not in spec:
        raise GroupingError(f"{where} has no `groups:`, `rows:` or `default:`; add rules")
    group_rules = [_Rule(e, "groups", i, where) for i, e in enumerate(groups)]
    row_rules = [_Rule(e, "rows", i, where) for i, e in enumerate(rows)]
    default = spec.get("default")
    if default is not None and not isinstance(default, str):
        raise GroupingError(f"{where}: `default` must be a label string, not {default!r}")

    counts = None
    b = GroupingBuilder(name, names, shapes)
    for tensor in names:
        whole = _first(group_rules, tensor)
        by_rows = _first(row_rules, tensor)
        if whole and by_rows:
            raise GroupingError(f"{where}: tensor {tensor!r} is matched by {whole[0].rule} and "
                                f"{by_rows[0].rule}; a tensor must be matched by a group rule "
                                "or a row rule, not both")
        if whole:
            rule, m = whole
            b.whole(tensor, rule.label(m, tensor))
        elif by_rows:
            rule, m = by_rows
            if rule.by == "frequency":
                if counts is None:
                    counts = _counts(token_counts, names, aliases, rule, where)
                if tensor not in counts:
                    raise GroupingError(f"{rule.here} matches {tensor!r}, but Task.token_counts()"
                                        " has no counts for it; narrow the regex or add counts")
                c = checked_counts(tensor, counts[tensor], shapes[tensor], rule.buckets, where)
                seg = frequency_buckets(c, rule.buckets)
            else:
                shape = tuple(shapes[tensor])
                if not shape or shape[0] < rule.buckets:
                    raise GroupingError(f"{rule.here}: tensor {tensor!r} (shape {shape}) has "
                                        f"fewer rows than {rule.buckets} buckets")
                seg = (np.arange(shape[0], dtype=np.int64) * rule.buckets) // shape[0]
            prefix = rule.label(m, tensor) if rule.template is not None else tensor
            b.rows(tensor, bucket_labels(prefix, rule.buckets), seg)
        elif default is not None:
            b.whole(tensor, default)
    unused = tuple(r.pattern for r in group_rules + row_rules if not r.used)
    return b.build(unused)


def _entries(spec: Mapping, key: str, where: str) -> list:
    value = spec.get(key) or []
    if not isinstance(value, list):
        raise GroupingError(f"{where}: `{key}` must be a list of rules, not "
                            f"{type(value).__name__}")
    return value


def _first(rules: list[_Rule], tensor: str):
    for rule in rules:
        m = rule.regex.search(tensor)
        if m:
            rule.used = True
            return rule, m
    return None


def _counts(token_counts, names, aliases, rule: _Rule, where: str) -> dict:
    if not token_counts:
        raise GroupingError(f"{rule.here} buckets rows by frequency, but the task provides no "
                            "token counts; implement Task.token_counts() returning {parameter "
                            "name: 1-D tensor of counts per row}, or use `by: index`")
    return canonical_counts(token_counts, names, aliases, where)

