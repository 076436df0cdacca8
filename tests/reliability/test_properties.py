"""Property tests (hypothesis): store and cube round trips for random shapes, dtypes and step
patterns. Few examples each, so the suite stays fast; every example uses real files."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import replay
from replay.cube import param_lca, schema
from replay.cube import writer as cubes
from replay.store.codec import same_bits
from replay.engine.plan import plan_pieces
from replay.store.trajectory import open_trajectory

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FAST = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
specials = st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 65504.0])


class Bag(torch.nn.Module):
    """Parameters p0, p1, … of the given shapes and dtypes (a model is just named tensors)."""

    def __init__(self, specs):
        super().__init__()
        for i, (shape, dtype) in enumerate(specs):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(shape, dtype=dtype)))


@st.composite
def recordings(draw):
    specs = draw(st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=3))
    steps = draw(st.integers(0, 7))
    every = draw(st.integers(1, 3))
    keyframe_every = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["delta", "full"]))
    seed = draw(st.integers(0, 2 ** 16))
    special = draw(st.lists(st.tuples(st.integers(0, steps), st.integers(0, len(specs) - 1),
                                      specials), max_size=3))
    return specs, steps, every, keyframe_every, mode, seed, special


@FAST
@given(recordings())
def test_store_round_trip_is_bit_exact(rec):
    """Whatever the dtypes, shapes (empty ones too), step pattern and values (NaN, ±Inf, -0,
    subnormals), every recorded θ_t reads back bit for bit, sequentially and at random."""
    specs, steps, every, keyframe_every, mode, seed, special = rec
    g = torch.Generator().manual_seed(seed)
    model = Bag(specs)
    params = dict(model.named_parameters())
    snaps = {}

    def move(t):
        with torch.no_grad():
            for i, p in enumerate(params.values()):
                scale = 10.0 ** float(torch.randint(-6, 3, (1,), generator=g))
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
                for t_, j, value in special:
                    if t_ == t and j == i and p.numel():
                        p.view(-1)[0] = value
        snaps[t] = {n: p.detach().clone() for n, p in params.items()}

    with tempfile.TemporaryDirectory() as tmp:
        move(0)
        with replay.Recorder(model, f"{tmp}/traj", every=every, keyframe_every=keyframe_every,
                             mode=mode) as recorder:
            for t in range(1, steps + 1):
                move(t)
                recorder.step(loss=float(t))
        traj = open_trajectory(f"{tmp}/traj")
        expected = sorted({t for t in range(steps + 1) if t % every == 0} | {steps})
        assert traj.steps == expected
        assert traj.names == list(params)
        assert traj.shapes == {n: tuple(p.shape) for n, p in params.items()}
        walked = [t for t, _, _ in traj.walk()]
        assert walked == expected
        for t, got, _ in traj.walk():
            assert got.keys() == snaps[t].keys()
            assert all(same_bits(value, snaps[t][name]) for name, value in got.items()), t
        t = expected[len(expected) // 2]
        assert all(same_bits(traj.params(t)[n], v) for n, v in snaps[t].items())
        assert traj.problems() == []


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 14))
    every = draw(st.integers(1, 3))
    chunk = draw(st.integers(1, 6))
    groupings = draw(st.lists(st.sampled_from(["tensor", "layer", "user"]), min_size=1,
                              max_size=2, unique=True))
    labels, owners = [], []
    for name in groupings:
        k = draw(st.integers(1, 3))
        labels += [f"{name}/g{i}" for i in range(k)]
        owners += [name] * k
    datasets = draw(st.lists(st.sampled_from(["train", "valid", "test"]), min_size=1,
                             max_size=3, unique=True))
    todo = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    order = draw(st.randoms(use_true_random=False))
    params = draw(st.lists(shapes, min_size=1, max_size=3))
    return n, every, chunk, labels, owners, datasets, todo, order, params


@FAST
@given(layouts(), st.integers(0, 2 ** 16))
def test_cube_round_trip(layout, seed):
    """Pieces written in any order, into chunks of any size, read back exactly; steps not
    written stay NaN / 0 / not done; per-parameter LCA adds the pieces in step order."""
    n, every, chunk, labels, owners, datasets, todo, order, param_shapes = layout
    rng = np.random.default_rng(seed)
    steps = np.arange(n, dtype=np.int64) * every
    g, d = len(labels), len(datasets)
    lay = schema.Coords(steps, steps + every, tuple(labels), tuple(owners),
                       rng.integers(1, 100, g).astype(np.int64), tuple(datasets), chunk)
    names = [f"w{i}" for i in range(len(param_shapes))]
    shape_of = dict(zip(names, param_shapes))
    size = int(sum(np.prod(s, dtype=np.int64) for s in param_shapes))
    values = {
        "lca": rng.normal(size=(n, g, d)), "helped": rng.integers(0, 50, (n, g, d)),
        "loss": rng.normal(size=(n, d)), "loss_next": rng.normal(size=(n, d)),
        "residual": rng.normal(size=(n, d)) * 1e-6, "splits": rng.integers(1, 9, n),
    }
    values["lca"][rng.random((n, g, d)) < 0.1] = np.nan      # skipped steps are NaN
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/c.zarr"
        assert cubes.create(path, lay, {"lca_replay_version": replay.__version__, "settings": "{}"})
        writer = cubes.CubeWriter(path)
        for stage in (todo, np.ones(n, dtype=bool)):          # some steps, then the rest
            pieces = plan_pieces(stage & ~writer.done_mask(), chunk)
            order.shuffle(pieces)
            for i0, i1 in pieces:
                for name in datasets:
                    parts[(name, i0)] = rng.normal(size=size)
                    param_lca.write_param_part(path, name, i0, i1, parts[(name, i0)])
                writer.write(i0, i1, {k: v[i0:i1] for k, v in values.items()})
            ds = xr.open_zarr(path)
            done = np.asarray(ds["done"].values)
            assert done.tolist() == (stage | done).tolist() and (done >= stage).all()
            for name, want in values.items():
                got = np.asarray(ds[name].values)
                np.testing.assert_array_equal(got[done], want[done], err_msg=name)
                empty = np.nan if got.dtype.kind == "f" else 0
                np.testing.assert_array_equal(got[~done], np.full_like(got[~done], empty))
            assert ds["step"].values.tolist() == steps.tolist()
            assert ds["group"].values.tolist() == labels
            assert ds["grouping"].values.tolist() == owners
        assert param_lca.finalize(writer, datasets, names, shape_of)
        loaded = replay.load_param_lca(path)
        for name in datasets:
            keys = sorted(k for k in parts if k[0] == name)
            total = np.zeros(size)
            for k in keys:
                total += parts[k]
            flat = np.concatenate([loaded[name][w].numpy().reshape(-1) for w in names])
            assert np.array_equal(flat, total)
            assert [tuple(loaded[name][w].shape) for w in names] == list(param_shapes)
