"""Frequency buckets: the rows of an embedding matrix grouped by how often their tokens occur
(Zhu et al. §3.3.3, 25 buckets), from ``Task.token_counts()``.

The preset ``frequency`` / ``frequency:N`` puts the rows of each counted matrix in N buckets
(``<param>:f01`` = most frequent) and every other tensor in ``rest``; YAML rules
(:mod:`replay.grouping.rules`) use the same bucketing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from replay.errors import GroupingError
from replay.grouping.partition import Grouping, GroupingBuilder, name_list

DEFAULT_BUCKETS = 25


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


def frequency_grouping(name: str, buckets: int, names, shapes, token_counts, aliases) -> Grouping:
    where = f"grouping {name!r}"
    if not token_counts:
        raise GroupingError(f"{where} needs per-row token frequencies, but the task provides "
                            "none; implement Task.token_counts() returning {parameter name: "
                            "1-D tensor of counts per row}")
    counts = canonical_counts(token_counts, names, aliases, where)
    b = GroupingBuilder(name, names, shapes)
    for tensor in names:
        if tensor in counts:
            c = checked_counts(tensor, counts[tensor], shapes[tensor], buckets, where)
            b.rows(tensor, bucket_labels(tensor, buckets), frequency_buckets(c, buckets))
    for tensor in names:
        if tensor not in counts:
            b.whole(tensor, "rest")
    return b.build()


def canonical_counts(token_counts, names, aliases, where) -> dict:
    """Counts per recorded tensor; counts given under several names of one tied tensor (one
    per use) are added, since the tensor's rows serve all those uses."""
    known, aliases = set(names), dict(aliases or {})
    out, given = {}, {}
    for key, value in token_counts.items():
        canonical = aliases.get(key, key)
        if canonical not in known:
            raise GroupingError(f"{where}: Task.token_counts() names {key!r}, which is not a "
                                f"recorded parameter (recorded: {name_list(list(names))})")
        if canonical in out:
            out[canonical] = add_counts(out[canonical], value, given[canonical], key, where)
        else:
            out[canonical], given[canonical] = value, key
    return out


def add_counts(a, b, key_a: str, key_b: str, where: str) -> np.ndarray:
    """Two count vectors of the same rows, added (float64)."""
    a, b = (np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, np.float64)
            for x in (a, b))
    if a.shape != b.shape:
        raise GroupingError(f"{where}: token counts for {key_a!r} and {key_b!r} (one tied "
                            f"tensor) have shapes {a.shape} and {b.shape}; give one count per "
                            "row of the tensor under each name")
    return a + b


def parse_buckets(value, where) -> int:
    try:
        buckets = int(value)
        ok = buckets >= 1 and str(value).strip().lstrip("+").isdigit()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GroupingError(f"{where}: frequency buckets must be a positive integer, not "
                            f"{value!r} (e.g. frequency:10)")
    return buckets
