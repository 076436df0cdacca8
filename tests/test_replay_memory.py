"""What the replay's memory savings must not change: folded mean gradients round as the plain
formulas, no per-parameter sums without param_lca, θ shared with the walk, finiteness checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import replay
from replay.cube.schema import PARTS
from replay.engine.driver import prepare
from replay.engine.flat_model import FlatModel
from replay.engine.gradients import LossOracle
from replay.engine.kernel import Reducer
from replay.engine.finite import Chord
from replay.engine.piece import compute_piece
from replay.engine.quadrature import Point, integrate
from replay.grouping.resolve import resolve_groupings
from replay.tasks.tiny_mlp import TinyMLP

from .test_engine import ARGS, TASK, record

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return record(str(tmp_path_factory.mktemp("memory") / "traj"), steps=6)


def _flat(dtype):
    task = TinyMLP(**ARGS)
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    flat = FlatModel(model, names, shapes, dtype, torch.device("cpu"))
    oracle = LossOracle(task, flat, ["train", "test"], None, 32)
    oracle.prepare(0)
    gen = torch.Generator().manual_seed(1)
    theta0 = torch.randn(flat.size, generator=gen, dtype=torch.float64).to(dtype) * 0.3
    theta1 = theta0 + torch.randn(flat.size, generator=gen, dtype=torch.float64).to(dtype) * 0.05
    return flat, oracle, theta0, theta1


def _grads_at(flat, oracle, theta0, theta1, s):
    """The gradients as the engine computed them before the fold: θ_t + sΔ with a held Δ,
    and each gradient its own ``flat.grad / count`` tensor."""
    delta = theta1 - theta0
    with torch.no_grad():
        if s == 0.0:
            flat.theta.copy_(theta0)
        elif s == 1.0:
            flat.theta.copy_(theta1)
        else:
            torch.add(theta0, delta, alpha=s, out=flat.theta)
    return oracle.evaluate(True).grads


def _reference(rule, at):
    """gbar per dataset by the plain formulas of the fixed rules and composite Simpson (n=4)."""
    a, b = at(0.0), at(1.0)
    if rule == "first-order":
        return a
    if rule == "trapezoid":
        return [(x + y) * 0.5 for x, y in zip(a, b)]
    m = at(0.5)
    if rule == "simpson":
        return [((m_ * 4.0 + (x + y)) + 0.0) / 6.0 for x, y, m_ in zip(a, b, m)]
    q1, q3 = at(0.25), at(0.75)
    odd = [(torch.zeros_like(g) + g) + h for g, h in zip(q1, q3)]
    even = [torch.zeros_like(g) + g for g in m]
    return [((o * 4.0 + (x + y)) + e * 2.0) / 12.0 for o, x, y, e in zip(odd, a, b, even)]


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("rule", ["first-order", "trapezoid", "simpson", "adaptive"])
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh", "reused-start"])
def test_folded_mean_gradient_is_bit_identical_to_the_formula(rule, dtype, reuse):
    flat, oracle, theta0, theta1 = _flat(dtype)
    at = lambda s: _grads_at(flat, oracle, theta0, theta1, s)  # noqa: E731
    want = _reference(rule, at)
    end_want = at(1.0)
    start = Point(np.zeros(2), at(0.0)) if reuse else None
    chord = Chord(flat, oracle, theta0, theta1, 0)
    res = integrate(rule, chord, theta1 - theta0, start=start, tolerance=0.0, max_splits=4)
    assert res.splits == (4 if rule == "adaptive" else 1 if rule in ("first-order",
                                                                      "trapezoid") else 2)
    for got, ref in zip(res.gbar, want):
        assert got.dtype == dtype and torch.equal(_bits(got), _bits(ref))
    for got, ref in zip(res.end.grads, end_want):  # the carry to the next interval
        assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("rule", ["trapezoid", "simpson"])
def test_end_gradients_not_kept_leave_the_mean_unchanged(rule):
    flat, oracle, theta0, theta1 = _flat(torch.float32)
    chord = Chord(flat, oracle, theta0, theta1, 0)
    kept = integrate(rule, chord, None)
    folded = integrate(rule, chord, None, keep_end=False)
    assert folded.end.grads is None and kept.end.grads is not None
    for a, b in zip(kept.gbar, folded.gbar):
        assert torch.equal(_bits(a), _bits(b))
    assert np.array_equal(kept.end.loss, folded.end.loss)


def _pieces(store, cube, **options):
    plan = prepare(store, TASK, task_args=ARGS, out=cube, scheduler="sync", progress=False,
                   chunk_size=2, **options)
    return [compute_piece(plan.spec, i0, i1) for i0, i1 in plan.pieces]


def test_without_param_lca_the_cube_arrays_are_the_same_and_no_parts_are_written(store,
                                                                                tmp_path):
    with_parts = _pieces(store, str(tmp_path / "a.zarr"), param_lca=True)
    without = _pieces(store, str(tmp_path / "b.zarr"), param_lca=False)
    assert len(with_parts) == len(without) > 1
    for a, b in zip(with_parts, without):
        for key in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
            assert np.array_equal(a[key], b[key]), key
    # With param_lca a piece hands its per-parameter sums to the driver; without, it has none
    # (the group collecting them is made by their first write: neither cube has it yet).
    assert all(a["parts"] and all(p.size > 0 for p in a["parts"]) for a in with_parts)
    assert all(b["parts"] is None for b in without)
    cubes = {c: zarr.open_group(str(tmp_path / c), mode="r", use_consolidated=False)
             for c in ("a.zarr", "b.zarr")}
    assert PARTS not in cubes["a.zarr"] and PARTS not in cubes["b.zarr"]


def test_empty_cum_gives_the_same_group_sums():
    rng = np.random.default_rng(0)
    shapes = {"w": (300, 700), "b": (700,)}
    groupings = resolve_groupings(["tensor"], list(shapes), shapes)
    reducer = Reducer(groupings, shapes)
    n = 300 * 700 + 700
    gbar, delta = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n) * 1e-3
    cum = np.zeros(n)
    full = reducer.reduce_flat(gbar, delta, cum)
    empty = reducer.reduce_flat(gbar, delta, np.zeros(0))
    assert np.array_equal(full[0], empty[0]) and np.array_equal(full[1], empty[1])
    assert np.array_equal(cum, delta * gbar.astype(np.float64))


def test_walk_flat_matches_walk_and_becomes_theta_without_a_copy(store):
    traj = replay.open_trajectory(store)
    for (t, params, state), (u, flats, state2) in zip(traj.walk(), traj.walk_flat(),
                                                       strict=True):
        assert t == u and state.keys() == state2.keys()
        for name, view in traj.layout.split(flats).items():
            assert torch.equal(view, params[name])
    task = TinyMLP(**ARGS)
    same = FlatModel(task.build_model(), traj.names, traj.shapes, torch.float32, "cpu")
    wider = FlatModel(task.build_model(), traj.names, traj.shapes, torch.float64, "cpu")
    _, flats, _ = next(traj.walk_flat())
    shared = same.flatten_flats(flats, traj.layout)
    assert shared.data_ptr() == flats[torch.float32].data_ptr()
    converted = wider.flatten_flats(flats, traj.layout)
    assert converted.dtype == torch.float64
    assert torch.equal(converted, flats[torch.float32].double())


def test_first_nonfinite_names_the_first_bad_element_only():
    flat, _, _, _ = _flat(torch.float32)
    vec = torch.ones(flat.size)
    assert flat.first_nonfinite(vec) is None
    huge = torch.full((flat.size,), 3e38)  # the sum overflows; every element is finite
    assert not torch.isfinite(huge.sum()) and flat.first_nonfinite(huge) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = vec.clone()
        v[int(flat.offsets[2]) + 1] = bad
        v[-1] = bad
        assert flat.first_nonfinite(v) == flat.names[2]


def test_samples_drawn_ahead_are_each_steps_own_and_bounded():
    """LossOracle.prefetch draws a piece's samples before its model passes: prepare(t) then
    hands out the very batches it would have drawn at t, and no more are held than fit."""
    task = TinyMLP(**ARGS)
    model = task.build_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    flat = FlatModel(model, names, shapes, torch.float32, torch.device("cpu"))
    mode = replay.Sampled(batches=2, batch_size=8, seed=3)
    ahead = LossOracle(task, flat, ["train", "test"], mode, 5)
    fresh = LossOracle(task, flat, ["train", "test"], mode, 5)
    ahead.prefetch(range(4, 9))
    assert sorted(ahead._ahead) == [4, 5, 6, 7, 8]
    for t in range(4, 10):            # 9 was not drawn ahead: prepare draws it itself
        ahead.prepare(t)
        fresh.prepare(t)
        for name in ("train", "test"):
            got, want = ahead._batches[name], fresh._batches[name]
            assert len(got) == len(want) > 1
            for (x, y), (u, v) in zip(got, want):
                assert torch.equal(x, u) and torch.equal(y, v)
    assert ahead._ahead == {}
    ahead.prefetch(range(100), max_bytes=1)      # the first step fills the budget
    assert list(ahead._ahead) == [0]
    exact = LossOracle(task, flat, ["train"], None, 5)
    exact.prefetch(range(3))                     # exact mode keeps its one collated copy
    assert exact._ahead == {}
