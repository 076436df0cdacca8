"""Piece results held by the driver and written to the cube in batches (docs/design.md §7).

Every write has a fixed cost (a file created per chunk; through zarr, milliseconds per
operation), so a replay of a fast model whose pieces each take a few milliseconds of compute
would spend most of its time writing. The
driver therefore keeps finished pieces in memory and writes them together: contiguous pieces
become one region write per cube variable and one array of per-parameter partial sums per
dataset (a row per piece). It writes once the pieces held took :data:`FLUSH_SECONDS` of
compute between them, or arrived that long ago, or hold :data:`FLUSH_BYTES`, and at the end
or on any error. A slow piece is thus written as soon as it arrives, and a crash loses no
more than a few seconds of finished work, which a resume recomputes.

Write order keeps the cube consistent at every instant: partial sums first, then the per-step
variables, then ``done``. A piece lies inside one cube chunk, so its ``done`` flags are set by
one chunk write: each row of partial sums is either done or not, which is what
:func:`replay.cube.param_lca.drop_stale_parts` relies on after a crash.
"""

from __future__ import annotations

import time

import numpy as np

from replay.cube.param_lca import drop_parts, write_param_rows, write_totals
from replay.cube.schema import VARIABLES

FLUSH_SECONDS = 2.0
FLUSH_BYTES = 64 << 20
# Partial sums up to this size travel back with a piece's result; a bigger model's tasks write
# their own (one array per piece and dataset), so they never cross the network to the driver.
INLINE_BYTES = 16 << 20


class ResultBuffer:
    """Collects ``compute_piece`` results and writes them through a
    :class:`~replay.cube.writer.CubeWriter`; ``parts`` in a result is its list of per-dataset
    partial sums (D,) when the piece left writing them to the driver, else None."""

    def __init__(self, writer, datasets, *, seconds: float = FLUSH_SECONDS,
                 max_bytes: int = FLUSH_BYTES, totals: tuple | None = None):
        self.writer, self.datasets = writer, list(datasets)
        self.seconds, self.max_bytes = seconds, max_bytes
        self._held: list[dict] = []
        self._since = self._work = 0.0
        self._bytes = 0
        # (names, shapes) of the per-parameter totals when this run owns every step of a fresh
        # cube: if its first write holds every step, the totals are written from memory.
        self._totals = totals

    def add(self, result: dict) -> None:
        if not self._held:
            self._since, self._work = time.monotonic(), 0.0
        self._held.append(result)
        self._bytes += sum(int(p.nbytes) for p in result.get("parts") or ())
        self._work += result.get("seconds", 0.0)
        if self._bytes >= self.max_bytes or self._work >= self.seconds or \
                time.monotonic() - self._since >= self.seconds:
            self.flush()

    def flush(self, last: bool = False) -> None:
        """Write everything held (nothing if empty); ``last``: the run's final results."""
        held, self._held, self._bytes = sorted(self._held, key=lambda r: r["i0"]), [], 0
        totals, self._totals = self._totals, None
        n = self.writer.root["done"].shape[0] if totals and last else -1
        if held and held[0]["i0"] == 0 and held[-1]["i1"] == n and all(
                r.get("parts") is not None for r in held) and len(_contiguous(held)) == 1:
            # A short replay: its partial sums would be written only to be read back, added
            # and deleted by the finish a moment later.
            write_totals(self.writer, self.datasets, *totals, [(r["i0"], r["i1"]) for r in held],
                         [r["parts"] for r in held])
            self.writer.write(0, n, _joined(held))
            drop_parts(self.writer, self.datasets)
            return
        for run in _contiguous(held):
            self._write(run)

    def _write(self, run: list[dict]) -> None:
        i0, i1 = run[0]["i0"], run[-1]["i1"]
        with_parts = [r for r in run if r.get("parts") is not None]
        if with_parts:
            edges = [(r["i0"], r["i1"]) for r in with_parts]
            for d, name in enumerate(self.datasets):
                write_param_rows(self.writer.root, name, edges,
                                 [r["parts"][d] for r in with_parts])
        self.writer.write(i0, i1, _joined(run))


def _joined(run: list[dict]) -> dict:
    return {name: np.concatenate([r[name] for r in run]) for name in VARIABLES if name != "done"}


def _contiguous(results: list[dict]) -> list[list[dict]]:
    """Results sorted by start, cut where one piece does not end where the next begins."""
    runs: list[list[dict]] = []
    for r in results:
        if runs and runs[-1][-1]["i1"] == r["i0"]:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs
