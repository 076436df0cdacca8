"""Which intervals a replay computes, and how they are cut into tasks.

A trajectory's recorded steps t_0 < t_1 < … give the intervals [t_k, t_{k+1}), indexed by
their start. The cube's step axis is chunked; a *piece* (one task) is a run of intervals to do
that never straddles a chunk. Only the driver writes the chunks of its pieces, and job arrays
get *slices* of whole chunks, so no two processes write one zarr chunk.
"""

from __future__ import annotations

import math
import os

import numpy as np

from replay.errors import ConfigError, ReplayError
from replay.settings import Sampled


def intervals(traj) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 (n,) of the trajectory's recorded intervals."""
    recorded = np.asarray(traj.steps, dtype=np.int64)
    if len(recorded) < 2:
        raise ReplayError(f"trajectory {traj.path} has {len(recorded)} complete recorded step(s); "
                          "a replay needs at least two")
    return recorded[:-1], recorded[1:]


def select_steps(starts: np.ndarray, steps: str | None) -> np.ndarray:
    """Boolean mask over intervals for ``"A:B"`` (either side may be empty; the settings have
    checked the form) or None (all)."""
    if steps is None:
        return np.ones(len(starts), dtype=bool)
    a, b = steps.split(":")
    lo, hi = (int(a) if a else None), (int(b) if b else None)
    lo = int(starts[0]) if lo is None else lo
    hi = int(starts[-1]) + 1 if hi is None else hi
    mask = (starts >= lo) & (starts < hi)
    if not mask.any():
        raise ReplayError(
            f"steps {lo}:{hi} select no interval; the trajectory's intervals start at "
            f"{int(starts[0])}..{int(starts[-1])}"
        )
    return mask


def default_piece(n: int) -> int:
    # ~16 tasks: enough to balance a few workers, few enough that the one extra gradient
    # evaluation each task start costs (no end-point reuse across workers) stays small.
    return max(1, min(256, math.ceil(n / 16)))


# Every chunk of every cube variable is a file with a few milliseconds of fixed cost to write
# or read, so a short replay's chunks hold several tasks' steps.
_CHUNK_STEPS = 64


def default_chunk(n: int) -> int:
    """Intervals per cube chunk: a whole number of :func:`default_piece` pieces, near 64."""
    piece = default_piece(n)
    return piece * max(1, _CHUNK_STEPS // piece)


def plan_pieces(todo: np.ndarray, chunk: int, piece: int | None = None) -> list[tuple[int, int]]:
    """Runs of True in ``todo`` that stay inside one chunk, cut every ``piece`` intervals
    (counted from the start, default: the chunk), so that a resumed replay cuts as before."""
    piece = chunk if piece is None else piece
    pieces = []
    for c0 in range(0, len(todo), chunk):
        block = todo[c0:c0 + chunk]
        i = 0
        while i < len(block):
            if block[i]:
                j = i + 1
                while j < len(block) and block[j] and (c0 + j) % piece:
                    j += 1
                pieces.append((c0 + i, c0 + j))
                i = j
            else:
                i += 1
    return pieces


def plan_slices(n_intervals: int, chunk: int, n: int, starts: np.ndarray) -> list[tuple[int, int]]:
    """``n`` contiguous ``--steps A:B`` slices made of whole chunks (for job arrays)."""
    n_chunks = math.ceil(n_intervals / chunk)
    if n < 1:
        raise ConfigError("the number of slices must be >= 1")
    n = min(n, n_chunks)
    bounds = [round(k * n_chunks / n) for k in range(n + 1)]
    slices = []
    for a, b in zip(bounds, bounds[1:]):
        lo = int(starts[a * chunk])
        hi = int(starts[b * chunk]) if b * chunk < n_intervals else int(starts[-1]) + 1
        slices.append((lo, hi))
    return slices


def default_cube_path(store: str, mode: Sampled | None) -> str:
    parent = os.path.dirname(os.path.abspath(store.rstrip("/"))) if "://" not in store else \
        store.rstrip("/").rsplit("/", 1)[0]
    kind = "exact" if mode is None else "sampled"
    return f"{parent}/lca-{kind}.zarr"


def absolute(path) -> str:
    # Workers may run in another directory (batch jobs): hand them absolute paths.
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)
