"""The numba reduction: per-element LCA → per-row sums, helped counts and the cumulative LCA.

For one tensor, one dataset and one replayed interval the engine holds the quadrature-weighted
mean gradient ``gbar`` and the update ``delta`` (both flattened, length n). LCA per element is
``delta[i] * gbar[i]`` (docs/design.md §5). One pass over memory does everything the cube needs:

- ``cum[i] += lca[i]``           per-parameter cumulative LCA (float64, in place; skipped
                                 when ``cum`` has length 0)
- ``row_sum[r] = Σ lca``         over the elements of row r (``[starts[r], starts[r+1])``)
- ``row_neg[r] = #{lca < 0}``    "helped" counts (negative LCA lowered the loss)

Rows are either the rows of a matrix (``numel / shape[0]`` elements, for row groupings such as
frequency buckets) or blocks of :data:`BLOCK` elements, which exist only so that one large
tensor spreads over all threads. Groups are then summed from rows (:class:`Reducer`), whose
``reduce_flat`` covers the whole flat parameter vector with one kernel launch
(:func:`reduce_segments`).

Exactness and determinism: the product is formed in float64 (exact for float32 inputs), sums are
float64, fastmath is off, and each row is summed serially in a fixed order (four interleaved
partial sums, combined as (s0+s1)+(s2+s3)) — so the result is bit-identical for any number of
numba threads, and for the parallel and serial code paths.

Compiled code is cached by numba (``cache=True``) beside this module, or in numba's user-wide
cache directory if that is not writable (override with ``NUMBA_CACHE_DIR``); :func:`warm_up`
loads or compiles everything up front.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numba
import numpy as np
from numba import njit, prange

__all__ = ["BLOCK", "Reducer", "reduce_segments", "warm_up"]

BLOCK = 1 << 16
"""Row length for tensors that no grouping splits by rows: 2**16 elements (64 Ki) per row."""

# Below this many elements a parallel launch costs more than it saves.
_PARALLEL_MIN = 1 << 17
# Four interleaved partial sums hide float-add latency; the order is fixed, so still deterministic.
_LANES = 4

# numba's "workqueue" threading layer aborts the process if two Python threads launch parallel
# kernels at once (e.g. under Dask's threaded scheduler). A thread that finds the parallel kernel
# busy runs the serial kernel instead, which gives bit-identical results.
_PARALLEL_LOCK = threading.Lock()


@njit(cache=True, nogil=True)
def _row(gbar, delta, cum, start, stop):
    # Loop-invariant, so the compiler unswitches it: one kernel serves both uses, and the
    # sums do not depend on it.
    keep = cum.shape[0] != 0
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    neg = 0
    i = start
    while i + _LANES <= stop:
        d0 = np.float64(delta[i]) * np.float64(gbar[i])
        d1 = np.float64(delta[i + 1]) * np.float64(gbar[i + 1])
        d2 = np.float64(delta[i + 2]) * np.float64(gbar[i + 2])
        d3 = np.float64(delta[i + 3]) * np.float64(gbar[i + 3])
        if keep:
            cum[i] += d0
            cum[i + 1] += d1
            cum[i + 2] += d2
            cum[i + 3] += d3
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        neg += (d0 < 0.0) + (d1 < 0.0) + (d2 < 0.0) + (d3 < 0.0)
        i += _LANES
    while i < stop:
        d0 = np.float64(delta[i]) * np.float64(gbar[i])
        if keep:
            cum[i] += d0
        s0 += d0
        neg += d0 < 0.0
        i += 1
    return (s0 + s1) + (s2 + s3), neg


@njit(cache=True, nogil=True, parallel=True)
def _segments_parallel(gbar, delta, cum, starts, row_sum, row_neg):
    for r in prange(row_sum.shape[0]):
        s, k = _row(gbar, delta, cum, starts[r], starts[r + 1])
        row_sum[r] = s
        row_neg[r] = k


@njit(cache=True, nogil=True)
def _segments_serial(gbar, delta, cum, starts, row_sum, row_neg):
    for r in range(row_sum.shape[0]):
        s, k = _row(gbar, delta, cum, starts[r], starts[r + 1])
        row_sum[r] = s
        row_neg[r] = k


@njit(cache=True, nogil=True)
def _add_segments(row_sum, row_neg, seg, offset, out_sum, out_neg):
    for r in range(row_sum.shape[0]):
        g = offset + seg[r]
        out_sum[g] += row_sum[r]
        out_neg[g] += row_neg[r]


@njit(cache=True, nogil=True)
def _steps_serial(gbars, deltas, cums, which, starts, segs, out_sum, out_neg):
    # The loops of reduce_flat over steps j and datasets d, in their order: cums[which[j], d]
    # receives step j's products before step j + 1's, each row is summed by the same _row,
    # and each group adds its rows in row order, so the results are bit-identical to it.
    nrows = starts.shape[0] - 1
    row_sum = np.empty(nrows, np.float64)
    row_neg = np.empty(nrows, np.int64)
    for j in range(gbars.shape[0]):
        for d in range(gbars.shape[1]):
            _segments_serial(gbars[j, d], deltas[j], cums[which[j], d], starts, row_sum,
                             row_neg)
            for k in range(segs.shape[0]):
                _add_segments(row_sum, row_neg, segs[k], 0, out_sum[j, d], out_neg[j, d])


def reduce_segments(gbar, delta, cum, starts) -> tuple[np.ndarray, np.ndarray]:
    """Fused LCA reduction over rows ``[starts[r], starts[r+1])``; updates ``cum`` in place.

    gbar, delta: 1-D contiguous float32 or float64 arrays, length n (dtypes may differ).
    cum: 1-D contiguous float64 array, length n (``cum += float64(delta) * float64(gbar)``)
    or length 0 (no per-parameter sums kept).
    starts: int64[nrows + 1], non-decreasing, ``starts[0] == 0``, ``starts[-1] == n``.
    Returns ``(row_sum float64[nrows], row_neg int64[nrows])``; bit-identical for any thread
    count. One launch covers a whole flat parameter vector (many tensors, each cut into rows).
    """
    n = _check(gbar, delta, cum)
    starts = np.ascontiguousarray(starts, np.int64)
    if starts.ndim != 1 or starts.size < 1 or starts[0] != 0 or starts[-1] != n or (
            np.diff(starts) < 0).any():
        raise ValueError(f"starts must be non-decreasing from 0 to n={n}")
    return _launch(_segments_parallel, _segments_serial, gbar, delta, cum, starts, n,
                   starts.size - 1)


def _launch(parallel_kernel, serial_kernel, gbar, delta, cum, rows, n: int, nrows: int):
    row_sum = np.empty(nrows, np.float64)
    row_neg = np.empty(nrows, np.int64)
    parallel = n >= _PARALLEL_MIN and nrows > 1 and numba.get_num_threads() > 1
    if parallel and _PARALLEL_LOCK.acquire(blocking=False):
        try:
            # Dynamic scheduling in chunks of rows: a thread slowed by another process on a
            # shared machine does not hold up the others (static halves would wait for it).
            chunk = max(1, nrows // (16 * numba.get_num_threads()))
            with numba.parallel_chunksize(chunk):
                parallel_kernel(gbar, delta, cum, rows, row_sum, row_neg)
        finally:
            _PARALLEL_LOCK.release()
    else:
        serial_kernel(gbar, delta, cum, rows, row_sum, row_neg)
    return row_sum, row_neg


def _check(gbar, delta, cum) -> int:
    # Programming errors of the caller (the engine), not user errors: plain exceptions.
    for label, a, kinds in (("gbar", gbar, (np.float32, np.float64)),
                            ("delta", delta, (np.float32, np.float64)),
                            ("cum", cum, (np.float64,))):
        if not isinstance(a, np.ndarray) or a.ndim != 1 or not a.flags.c_contiguous:
            raise TypeError(f"{label} must be a 1-D C-contiguous numpy array")
        if a.dtype.type not in kinds:
            raise TypeError(f"{label} has dtype {a.dtype}, expected one of {kinds}")
    if not (gbar.shape == delta.shape and cum.shape in (gbar.shape, (0,))):
        raise ValueError(f"length mismatch: gbar {gbar.shape}, delta {delta.shape}, cum {cum.shape}")
    if not cum.flags.writeable:
        raise ValueError("cum must be writeable (it is updated in place)")
    return gbar.shape[0]


def _flat(x, label: str) -> np.ndarray:
    """A 1-D numpy view of a numpy array or CPU torch tensor (a view, so ``cum`` stays in place)."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch.Tensor, without importing torch
        x = x.detach()
        if not x.is_contiguous():
            if label == "cum":
                raise ValueError("cum must be a contiguous tensor (it is updated in place)")
            x = x.contiguous()
        return x.view(-1).numpy()
    a = np.asarray(x)
    if not a.flags.c_contiguous:
        if label == "cum":
            raise ValueError("cum must be a C-contiguous array (it is updated in place)")
        a = np.ascontiguousarray(a)
    return a.reshape(-1)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel for float32 and float64 inputs.

    Call once per process before timing-sensitive work so the first replay step is not slowed
    by JIT compilation.
    """
    row_sum = np.zeros(1, np.float64)
    row_neg = np.zeros(1, np.int64)
    for dg in (np.float32, np.float64):
        for dd in (np.float32, np.float64):
            g, d, c = np.zeros(2, dg), np.zeros(2, dd), np.zeros(2, np.float64)
            _segments_serial(g, d, c, np.array([0, 2]), row_sum, row_neg)
            _segments_parallel(g, d, c, np.array([0, 2]), row_sum, row_neg)
    _add_segments(row_sum, row_neg, np.zeros(1, np.int32), 0, np.zeros(1), np.zeros(1, np.int64))
    for dg in (np.float32, np.float64):
        for dd in (np.float32, np.float64):
            for kept in (2, 0):
                _steps_serial(np.zeros((1, 1, 2), dg), np.zeros((1, 2), dd),
                              np.zeros((1, 1, kept)), np.zeros(1, np.int64), np.array([0, 2]),
                              np.zeros((1, 1), np.int32), np.zeros((1, 1, 1)),
                              np.zeros((1, 1, 1), np.int64))


class Reducer:
    """Reduces LCA into the groups of several groupings at once, one pass over memory.

    Groups of all groupings are concatenated in order: ``labels[j]`` is ``"grouping/name"``, and
    ``out_sum`` (float64) / ``out_neg`` (int64) are indexed by j. ``shapes`` (name -> shape) gives
    the tensors in flat-vector order. Per dataset and interval, one kernel launch::

        out_sum, out_neg = reducer.reduce_flat(gbar, delta, cum)

    gbar/delta: float32/float64 [D], the tensors of ``shapes`` concatenated in order
    (``D = Σ numel``), numpy or CPU torch; cum: float64 [D], updated in place, or [0] to
    keep no per-parameter sums.
    """

    def __init__(self, groupings: Sequence, shapes: Mapping[str, Sequence[int]],
                 block: int = BLOCK):
        self.groupings = tuple(groupings)
        self.shapes = {name: tuple(int(x) for x in shape) for name, shape in shapes.items()}
        self.labels: list[str] = []
        self.offsets: list[int] = []
        for grouping in self.groupings:
            self.offsets.append(len(self.labels))
            self.labels.extend(grouping.qualified_labels())
        self.sizes = (np.concatenate([g.sizes for g in self.groupings]).astype(np.int64)
                      if self.groupings else np.zeros(0, np.int64))
        self._row_len: dict[str, int] = {}
        for name, shape in self.shapes.items():
            numel = int(np.prod(shape, dtype=np.int64))
            by_rows = any(name in g.row_groups for g in self.groupings)
            self._row_len[name] = max(1, numel // shape[0]) if by_rows and numel else block
        self._plan: tuple[np.ndarray, list[np.ndarray]] | None = None
        self._segs: np.ndarray | None = None  # the plan's row groups as one array

    @property
    def n_groups(self) -> int:
        return len(self.labels)

    def zeros(self) -> tuple[np.ndarray, np.ndarray]:
        """Fresh ``(out_sum float64[n_groups], out_neg int64[n_groups])``."""
        return np.zeros(self.n_groups, np.float64), np.zeros(self.n_groups, np.int64)

    def reduce_flat(self, gbar, delta, cum, out_sum: np.ndarray | None = None,
                    out_neg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All tensors in one launch; returns (and accumulates into) ``(out_sum, out_neg)``."""
        if out_sum is None or out_neg is None:
            out_sum, out_neg = self.zeros()
        starts, row_group = self.flat_plan()
        gbar, delta, cum = _flat(gbar, "gbar"), _flat(delta, "delta"), _flat(cum, "cum")
        if gbar.shape[0] != starts[-1]:
            raise ValueError(f"flat vectors have {gbar.shape[0]} elements, but the tensors of "
                             f"`shapes` hold {int(starts[-1])}")
        # The plan's rows tile the vector by construction: launched without reduce_segments'
        # checks of them, which cost a pass over the row starts on every call.
        row_sum, row_neg = _launch(_segments_parallel, _segments_serial, gbar, delta, cum,
                                   starts, _check(gbar, delta, cum), starts.size - 1)
        for seg in row_group:
            _add_segments(row_sum, row_neg, seg, 0, out_sum, out_neg)
        return out_sum, out_neg

    def reduce_steps(self, gbars, deltas, cums, which) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`reduce_flat` for many steps in one launch, with bit-identical results:
        ``gbars`` [n, S, D] (S datasets), ``deltas`` [n, D], per-parameter sums ``cums``
        [P, S, D] (or [P, S, 0]), step j's into ``cums[which[j]]``; C-contiguous numpy.
        Returns ``(out_sum, out_neg)`` [n, S, groups], or None where :meth:`reduce_flat` would
        run in parallel: the caller loops over it then."""
        starts, row_group = self.flat_plan()
        n, nsets, size = gbars.shape
        if size >= _PARALLEL_MIN and numba.get_num_threads() > 1:
            return None
        which = np.ascontiguousarray(which, np.int64)
        if deltas.shape != (n, size) or cums.ndim != 3 or cums.shape[1:] not in (
                (nsets, size), (nsets, 0)) or which.shape != (n,) or size != starts[-1] or (
                n and not 0 <= which.min() <= which.max() < cums.shape[0]):
            raise ValueError(f"shapes gbars {gbars.shape}, deltas {deltas.shape}, cums "
                             f"{cums.shape}, which {which.shape} do not match "
                             f"{int(starts[-1])} elements")
        for label, a in (("gbars", gbars), ("deltas", deltas), ("cums", cums)):
            if not a.flags.c_contiguous:
                raise TypeError(f"{label} must be C-contiguous")
        out_sum = np.zeros((n, nsets, self.n_groups), np.float64)
        out_neg = np.zeros((n, nsets, self.n_groups), np.int64)
        if self._segs is None:
            self._segs = np.stack(row_group) if row_group else \
                np.zeros((0, starts.size - 1), np.int32)
        _steps_serial(gbars, deltas, cums, which, starts, self._segs, out_sum, out_neg)
        return out_sum, out_neg

    def flat_plan(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(starts int64[R+1], per grouping int32[R] global group index of each row): the rows
        of the flat vector — matrix rows for row-split tensors, else ``block``-sized pieces."""
        if self._plan is None:
            starts, groups = [np.zeros(1, np.int64)], [[] for _ in self.groupings]
            offset = 0
            for name, shape in self.shapes.items():
                numel = int(np.prod(shape, dtype=np.int64))
                if numel == 0:
                    continue
                cuts = np.arange(offset, offset + numel, self._row_len[name], dtype=np.int64)
                starts.append(np.append(cuts[1:], offset + numel))
                for k, (grouping, base) in enumerate(zip(self.groupings, self.offsets)):
                    g = grouping.tensor_group.get(name)
                    groups[k].append(np.full(cuts.size, base + g, np.int32) if g is not None
                                     else grouping.row_groups[name].astype(np.int32) + base)
                offset += numel
            self._plan = (np.concatenate(starts),
                          [np.concatenate(g) if g else np.zeros(0, np.int32) for g in groups])
        return self._plan

    @staticmethod
    def warm_up() -> None:
        """See :func:`warm_up`."""
        warm_up()
