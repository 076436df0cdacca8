"""The numba reduction against a plain numpy float64 reference; determinism; group totals."""

from __future__ import annotations

import itertools
import threading

import numba
import numpy as np
import pytest
import torch

from replay.engine.kernel import _PARALLEL_MIN, BLOCK, Reducer, _segments_serial, reduce_segments
from replay.grouping.resolve import resolve_groupings


def uniform(n, row_len):
    """Row boundaries of rows of ``row_len`` elements (the last may be short)."""
    return np.append(np.arange(0, n, row_len, dtype=np.int64), n)


def reduce_rows(gbar, delta, cum, row_len):
    return reduce_segments(gbar, delta, cum, uniform(gbar.shape[0], row_len))


def reference(gbar, delta, cum, row_len):
    """Brute force: float64 products, per-row numpy sums and counts."""
    d = delta.astype(np.float64) * gbar.astype(np.float64)
    n = d.shape[0]
    starts = range(0, n, row_len)
    row_sum = np.array([d[s:s + row_len].sum() for s in starts])
    row_abs = np.array([np.abs(d[s:s + row_len]).sum() for s in starts])
    row_neg = np.array([(d[s:s + row_len] < 0).sum() for s in starts], np.int64)
    return row_sum, row_abs, row_neg, cum + d


def data(n, dtype, seed=0, dtype_delta=None):
    rng = np.random.default_rng(seed)
    gbar = rng.standard_normal(n).astype(dtype)
    delta = (rng.standard_normal(n) * 1e-3).astype(dtype_delta or dtype)
    delta[::7] = 0.0  # exact zeros: neither helped nor hurt
    cum = rng.standard_normal(n)
    return gbar, delta, cum


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "row_len"), [(1, 1), (10, 3), (1000, 7), (1000, 1000),
                                            (999, 1024), (300_001, BLOCK)])
def test_matches_float64_reference(dtype, n, row_len):
    gbar, delta, cum = data(n, dtype)
    row_sum_ref, row_abs, row_neg_ref, cum_ref = reference(gbar, delta, cum, row_len)
    row_sum, row_neg = reduce_rows(gbar, delta, cum, row_len)
    assert row_sum.dtype == np.float64 and row_neg.dtype == np.int64
    assert row_sum.shape == row_neg.shape == (-(-n // row_len),)
    np.testing.assert_array_equal(row_neg, row_neg_ref)
    assert np.all(np.abs(row_sum - row_sum_ref) <= 1e-12 * row_abs)
    np.testing.assert_array_equal(cum, cum_ref)  # elementwise: exactly the reference


def test_mixed_dtypes_and_empty():
    gbar, delta, cum = data(5000, np.float32, dtype_delta=np.float64)
    row_sum_ref, row_abs, row_neg_ref, cum_ref = reference(gbar, delta, cum, 64)
    row_sum, row_neg = reduce_rows(gbar, delta, cum, 64)
    np.testing.assert_array_equal(row_neg, row_neg_ref)
    assert np.all(np.abs(row_sum - row_sum_ref) <= 1e-12 * row_abs)
    np.testing.assert_array_equal(cum, cum_ref)
    row_sum, row_neg = reduce_rows(*data(0, np.float32), 8)
    assert row_sum.shape == row_neg.shape == (0,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identical_for_any_thread_count_and_code_path(dtype):
    n = 3 * _PARALLEL_MIN + 12345  # large enough for the parallel path
    gbar, delta, cum0 = data(n, dtype, seed=1)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            cum = cum0.copy()
            results.append((*reduce_rows(gbar, delta, cum, 4099), cum))
    finally:
        numba.set_num_threads(before)
    cum = cum0.copy()
    row_sum = np.empty(-(-n // 4099))
    row_neg = np.empty(row_sum.shape, np.int64)
    _segments_serial(gbar, delta, cum, uniform(n, 4099), row_sum, row_neg)
    results.append((row_sum, row_neg, cum))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


def test_concurrent_python_threads_get_identical_results():
    # Two threads launching the kernel at once (Dask's threaded scheduler) must neither crash
    # numba's threading layer nor change the numbers.
    gbar, delta, cum0 = data(2 * _PARALLEL_MIN, np.float32, seed=2)
    expected = reduce_rows(gbar, delta, cum0.copy(), BLOCK)
    out = {}

    def work(k):
        cum = cum0.copy()
        for _ in range(5):
            cum[:] = cum0
            out[k] = reduce_rows(gbar, delta, cum, BLOCK)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        assert out[k][0].tobytes() == expected[0].tobytes()
        assert out[k][1].tobytes() == expected[1].tobytes()


def test_rejects_bad_inputs():
    g = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="cum has dtype float32"):
        reduce_rows(g, g, np.zeros(4, np.float32), 2)
    with pytest.raises(TypeError, match="gbar must be a 1-D C-contiguous numpy array"):
        reduce_rows(np.zeros(8, np.float32)[::2], g, np.zeros(4), 2)
    with pytest.raises(ValueError, match="length mismatch"):
        reduce_rows(g, g, np.zeros(5), 2)


def expected_totals(groupings, offsets, n_groups, lca, shapes):
    """Brute force: each tensor's per-row sums and negative counts, added into its groups."""
    expected_sum = np.zeros(n_groups)
    expected_neg = np.zeros(n_groups, np.int64)
    for grouping, offset in zip(groupings, offsets):
        for name, value in lca.items():
            if not value.size:
                continue
            if name in grouping.tensor_group:
                rows = np.zeros(shapes[name][0], np.int64) + grouping.tensor_group[name]
            else:
                rows = grouping.row_groups[name].astype(np.int64)
            per_row = value.reshape(shapes[name][0], -1)
            np.add.at(expected_sum, offset + rows, per_row.sum(axis=1))
            np.add.at(expected_neg, offset + rows, (per_row < 0).sum(axis=1))
    return expected_sum, expected_neg


def test_reducer_group_totals_match_reference():
    shapes = {"encoder.embed_tokens.weight": (50, 6), "encoder.layers.0.fc.weight": (6, 6),
              "encoder.layers.0.fc.bias": (6,), "decoder.embed_tokens.weight": (50, 6),
              "decoder.output_projection.weight": (50, 6)}
    names = list(shapes)
    counts = {"encoder.embed_tokens.weight": np.arange(50)}
    groupings = resolve_groupings(["tensor", "transformer", "frequency:5"], names, shapes,
                                  token_counts=counts)
    reducer = Reducer(groupings, shapes, block=16)
    reducer.warm_up()
    starts, _ = reducer.flat_plan()
    # rows of the bucketed matrix are its matrix rows; other tensors are cut into blocks of 16
    assert np.diff(starts[:51]).tolist() == [6] * 50
    assert reducer.labels[:2] == ["tensor/encoder.embed_tokens.weight",
                                  "tensor/encoder.layers.0.fc.weight"]
    rng = np.random.default_rng(3)
    lca, gbars, deltas = {}, [], []
    for name, shape in shapes.items():
        gbar = rng.standard_normal(shape).astype(np.float32)
        delta = rng.standard_normal(shape).astype(np.float32)
        gbars.append(gbar.reshape(-1))
        deltas.append(delta.reshape(-1))
        lca[name] = delta.astype(np.float64) * gbar.astype(np.float64)
    cum = np.zeros(sum(g.size for g in gbars))
    out_sum, out_neg = reducer.reduce_flat(torch.from_numpy(np.concatenate(gbars)),
                                           np.concatenate(deltas), torch.from_numpy(cum))
    np.testing.assert_array_equal(cum, np.concatenate([v.reshape(-1) for v in lca.values()]))
    expected_sum, expected_neg = expected_totals(groupings, reducer.offsets, reducer.n_groups,
                                                 lca, shapes)
    np.testing.assert_array_equal(out_neg, expected_neg)
    np.testing.assert_allclose(out_sum, expected_sum, rtol=1e-12, atol=1e-12)
    # every grouping partitions the same elements: equal totals per grouping
    k = [len(g.labels) for g in groupings]
    totals = [out_sum[a:a + n].sum() for a, n in zip(reducer.offsets, k)]
    assert np.allclose(totals, totals[0], rtol=1e-12)
    assert all(out_neg[a:a + n].sum() == out_neg[:k[0]].sum() for a, n in zip(reducer.offsets, k))
    assert reducer.sizes.sum() == 3 * sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduce_segments_matches_reference_and_threads(dtype):
    n = 2 * _PARALLEL_MIN + 77
    rng = np.random.default_rng(4)
    cuts = np.sort(rng.integers(0, n, 400))
    starts = np.concatenate([[0], cuts, cuts[:3], [n]])  # includes empty rows
    starts.sort()
    gbar, delta, cum0 = data(n, dtype, seed=5)
    d = delta.astype(np.float64) * gbar.astype(np.float64)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            cum = cum0.copy()
            results.append((*reduce_segments(gbar, delta, cum, starts), cum))
    finally:
        numba.set_num_threads(before)
    row_sum, row_neg, cum = results[0]
    for a, b in zip(results[0], results[1]):
        assert a.tobytes() == b.tobytes()
    pairs = list(itertools.pairwise(starts))
    assert row_neg.tolist() == [int((d[a:b] < 0).sum()) for a, b in pairs]
    ref = np.array([d[a:b].sum() for a, b in pairs])
    scale = np.array([np.abs(d[a:b]).sum() for a, b in pairs])
    assert np.all(np.abs(row_sum - ref) <= 1e-12 * scale)
    np.testing.assert_array_equal(cum, cum0 + d)
    with pytest.raises(ValueError, match="starts must be non-decreasing from 0 to n="):
        reduce_segments(gbar, delta, cum, starts[:-1])


def test_reducer_flat_path_with_empty_tensors_and_row_groups():
    shapes = {"encoder.embed_tokens.weight": (40, 5), "encoder.layers.0.w": (300, 7),
              "encoder.layers.0.b": (7,), "empty": (0, 3), "decoder.output_projection.weight": (40, 5)}
    counts = {"encoder.embed_tokens.weight": np.arange(40)}
    groupings = resolve_groupings(["layer", "frequency:4"], list(shapes), shapes,
                                  token_counts=counts)
    reducer = Reducer(groupings, shapes, block=64)
    sizes = [int(np.prod(s)) for s in shapes.values()]
    gbar, delta, cum0 = data(sum(sizes), np.float32, seed=6)
    cum = cum0.copy()
    flat_sum, flat_neg = reducer.reduce_flat(gbar, delta, cum)
    products = delta.astype(np.float64) * gbar.astype(np.float64)
    np.testing.assert_array_equal(cum, cum0 + products)
    lca, offset = {}, 0
    for name, size in zip(shapes, sizes):
        lca[name] = products[offset:offset + size].reshape(shapes[name])
        offset += size
    expected_sum, expected_neg = expected_totals(groupings, reducer.offsets, reducer.n_groups,
                                                 lca, shapes)
    np.testing.assert_array_equal(flat_neg, expected_neg)
    np.testing.assert_allclose(flat_sum, expected_sum, rtol=1e-12, atol=1e-15)
    starts, _ = reducer.flat_plan()
    assert starts[-1] == sum(sizes) and np.diff(starts).max() == 64
    with pytest.raises(ValueError, match="flat vectors have 5 elements, but the tensors"):
        reducer.reduce_flat(gbar[:5], delta[:5], np.zeros(5))


@pytest.mark.parametrize("dtype,kept", [(np.float32, True), (np.float64, True),
                                        (np.float32, False)])
def test_reduce_steps_is_reduce_flat_step_by_step_bit_for_bit(dtype, kept):
    # 7 steps of 2 datasets whose sums go to 3 pieces (steps 0-1, 2-4, 5-6), as a group of a
    # small model's pieces is reduced: the same sums, counts and per-parameter sums as one
    # reduce_flat per step and dataset, in order.
    shapes = {"encoder.embed_tokens.weight": (30, 4), "encoder.layers.0.w": (50, 3),
              "decoder.output_projection.weight": (30, 4)}
    groupings = resolve_groupings(["tensor", "layer", "frequency:3"], list(shapes), shapes,
                                  token_counts={"encoder.embed_tokens.weight": np.arange(30)})
    reducer = Reducer(groupings, shapes, block=32)
    size = sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(9)
    gbars = rng.standard_normal((7, 2, size)).astype(dtype)
    deltas = rng.standard_normal((7, size)).astype(dtype)
    which = np.array([0, 0, 1, 1, 1, 2, 2])
    start = rng.standard_normal((3, 2, size)) if kept else np.zeros((3, 2, 0))
    cums = start.copy()
    out_sum, out_neg = reducer.reduce_steps(gbars, deltas, cums, which)
    loop = start.copy()
    for j in range(7):
        for d in range(2):
            s, k = reducer.reduce_flat(gbars[j, d], deltas[j], loop[which[j], d])
            assert out_sum[j, d].tobytes() == s.tobytes() and out_neg[j, d].tolist() == k.tolist()
    assert cums.tobytes() == loop.tobytes()
    with pytest.raises(ValueError, match="do not match"):
        reducer.reduce_steps(gbars, deltas, cums, which[:3])
