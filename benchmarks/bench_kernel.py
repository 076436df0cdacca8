"""Benchmark: the fused numba LCA reduction vs plain torch, and vs memory-copy bandwidth.

One replay step per tensor needs ``lca = delta * gbar``, per-group sums of ``lca``, per-group
counts of ``lca < 0`` and ``cum += lca``. This compares, in one run with interleaved repeats:

- numba: :class:`replay.engine.kernel.Reducer` over G synthetic tensors (one pass over memory),
  one launch over the flat parameter vector (``reduce_flat``), as the engine calls it;
- torch: the best of four plain-torch pipelines: over per-element group ids (product,
  ``index_add_`` into G groups, ``bincount`` of the negatives, ``cum += lca``), and tensor by
  tensor over slices (product, ``sum``, ``(lca < 0).sum()``, ``cum[a:b] += lca``), each with
  the product in float64 (same numbers as the kernel) and in float32 (cheaper, less exact);
- copy: ``np.copyto`` of a large float32 array (bytes read + written per second), and the same
  copy parallelised with numba over all threads.

The kernel must touch 24 bytes per element (gbar 4 + delta 4 + cum read 8 + cum write 8); its
effective bandwidth is 24·n / time. Usage::

    python benchmarks/bench_kernel.py [--n 1e8] [--groups 300] [--repeats 5] [--threads T]
                                      [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from replay.grouping.resolve import resolve_groupings
from replay.engine.kernel import Reducer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


@njit(parallel=True, cache=True)
def _parallel_copy(dst, src):
    for i in prange(src.shape[0]):
        dst[i] = src[i]


def make_inputs(n: int, groups: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Tensor sizes like a real model: a few large matrices, many small ones.
    weights = rng.pareto(1.0, groups) + 0.01
    sizes = np.maximum(1, (weights / weights.sum() * n).astype(np.int64))
    sizes[np.argmax(sizes)] += n - sizes.sum()
    gbar = rng.standard_normal(n, dtype=np.float32)
    delta = rng.standard_normal(n, dtype=np.float32)
    return sizes, gbar, delta


def bench_numba_flat(reducer, gbar, delta, cum):
    t = time.perf_counter()
    out_sum, out_neg = reducer.reduce_flat(gbar, delta, cum)
    return time.perf_counter() - t, out_sum, out_neg


def bench_torch(gid, gbar, delta, cum, groups: int, float64_product: bool):
    t = time.perf_counter()
    lca = delta.double() * gbar.double() if float64_product else delta * gbar
    out_sum = torch.zeros(groups, dtype=torch.float64)
    out_sum.index_add_(0, gid, lca if float64_product else lca.double())
    out_neg = torch.bincount(gid[lca < 0], minlength=groups)
    cum += lca
    return time.perf_counter() - t, out_sum.numpy(), out_neg.numpy()


def bench_torch_slices(bounds, gbar, delta, cum, groups: int, float64_product: bool):
    t = time.perf_counter()
    out_sum = torch.zeros(groups, dtype=torch.float64)
    out_neg = torch.zeros(groups, dtype=torch.int64)
    for g, (a, b) in enumerate(bounds):
        lca = delta[a:b].double() * gbar[a:b].double() if float64_product else \
            delta[a:b] * gbar[a:b]
        out_sum[g] = lca.sum(dtype=torch.float64)
        out_neg[g] = (lca < 0).sum()
        cum[a:b] += lca
    return time.perf_counter() - t, out_sum.numpy(), out_neg.numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=float, default=1e8, help="elements (default 1e8)")
    p.add_argument("--groups", type=int, default=300, help="groups/tensors (default 300)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (default 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="numba and torch threads (default: numba's default)")
    p.add_argument("--quick", action="store_true", help="1e7 elements, 3 repeats")
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)  # run_all.py passes it
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats = min(args.n, 1e7), min(args.repeats, 3)
    n, groups = int(args.n), args.groups
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)

    sizes, gbar, delta = make_inputs(n, groups)
    names = [f"t{i:04d}" for i in range(groups)]
    shapes = {name: (int(s),) for name, s in zip(names, sizes)}
    reducer = Reducer(resolve_groupings("tensor", names, shapes), shapes)
    reducer.warm_up()
    ends = np.cumsum(sizes)
    bounds = list(zip((ends - sizes).tolist(), ends.tolist()))
    gid = torch.repeat_interleave(torch.arange(groups, dtype=torch.int32),
                                  torch.from_numpy(sizes))
    tg, td = torch.from_numpy(gbar), torch.from_numpy(delta)
    cum_np = np.zeros(n)
    cum_t = torch.zeros(n, dtype=torch.float64)
    copy_src = np.ones(n, np.float32)
    copy_dst = np.empty_like(copy_src)
    _parallel_copy(copy_dst[:8], copy_src[:8])

    # Correctness first: same sums (to rounding) and same counts as the float64 torch pipeline.
    _, s_fl, k_fl = bench_numba_flat(reducer, gbar, delta, cum_np)
    _, s_t, k_t = bench_torch(gid, tg, td, cum_t, groups, float64_product=True)
    assert np.array_equal(k_fl, k_t), "helped counts differ between numba and torch"
    assert np.allclose(s_fl, s_t, rtol=1e-9, atol=1e-9), "group sums differ"
    assert np.array_equal(cum_np, cum_t.numpy()), "cumulative LCA differs"
    _, s_sl, k_sl = bench_torch_slices(bounds, tg, td, cum_t, groups, True)
    assert np.array_equal(k_sl, k_t) and np.allclose(s_sl, s_t, rtol=1e-9, atol=1e-9)

    times: dict[str, list[float]] = {k: [] for k in
                                     ("numba", "torch-f64", "torch-f32",
                                      "torch-slices-f64", "torch-slices-f32", "copy",
                                      "copy-par")}
    for _ in range(args.repeats):
        times["numba"].append(bench_numba_flat(reducer, gbar, delta, cum_np)[0])
        times["torch-f64"].append(bench_torch(gid, tg, td, cum_t, groups, True)[0])
        times["torch-f32"].append(bench_torch(gid, tg, td, cum_t, groups, False)[0])
        times["torch-slices-f64"].append(bench_torch_slices(bounds, tg, td, cum_t, groups,
                                                            True)[0])
        times["torch-slices-f32"].append(bench_torch_slices(bounds, tg, td, cum_t, groups,
                                                            False)[0])
        t = time.perf_counter()
        np.copyto(copy_dst, copy_src)
        times["copy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        _parallel_copy(copy_dst, copy_src)
        times["copy-par"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    copy_bw = 2 * copy_src.nbytes / med["copy"]
    copy_par_bw = 2 * copy_src.nbytes / med["copy-par"]
    kernel_bw = 24 * n / med["numba"]
    torch_keys = ("torch-f64", "torch-f32", "torch-slices-f64", "torch-slices-f32")
    best_key = min(torch_keys, key=med.get)
    best_torch = med[best_key]
    print(f"n = {n:.3g} float32 elements, {groups} groups, {threads} threads "
          f"(numba layer {numba.threading_layer()}), median of {args.repeats} interleaved runs")
    for k, v in med.items():
        print(f"  {k:16s} {v * 1e3:9.1f} ms")
    print(f"numba vs torch (float64 product):   {med['torch-f64'] / med['numba']:.2f}x faster")
    print(f"numba vs torch (float32 product):   {med['torch-f32'] / med['numba']:.2f}x faster")
    print(f"numba vs best torch ({best_key}): {best_torch / med['numba']:.2f}x faster "
          "(target >= 3x)")
    print(f"kernel effective bandwidth:         {kernel_bw / 1e9:.1f} GB/s (24 B/element)")
    print(f"np.copyto bandwidth:                {copy_bw / 1e9:.1f} GB/s -> kernel at "
          f"{kernel_bw / copy_bw:.0%} (target >= 50%)")
    print(f"parallel copy bandwidth:            {copy_par_bw / 1e9:.1f} GB/s -> kernel at "
          f"{kernel_bw / copy_par_bw:.0%}")
    speed, share = best_torch / med["numba"], kernel_bw / max(copy_bw, copy_par_bw)
    common.emit("kernel", [
        common.row(f"numba reduction vs best torch ({n:.0e} float32, {groups} groups)", speed,
                   ">= 3x", speed >= 3, f"{med['numba'] * 1e3:.0f} ms vs "
                   f"{best_torch * 1e3:.0f} ms ({best_key}), {threads} threads", fmt="{:.1f}x"),
        common.row("numba reduction bandwidth / plain array copy", share, ">= 50%",
                   share >= 0.5, f"{kernel_bw / 1e9:.1f} GB/s vs the faster copy "
                   f"({max(copy_bw, copy_par_bw) / 1e9:.1f} GB/s)", fmt="{:.0%}"),
    ])


if __name__ == "__main__":
    main()
