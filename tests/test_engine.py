"""The replay engine against an independent brute-force LCA and its invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.func import functional_call

import replay
from replay.errors import CubeError, ReplayError, TaskError
from replay.tasks.tiny_mlp import TinyMLP

TASK = "replay.tasks.tiny_mlp:TinyMLP"
ARGS = {"seed": 3, "train_size": 96, "test_size": 32}


def record(path, steps=12, lr=0.05, keyframe_every=5, every=1, seed=3, nan_after=None):
    """A recorded TinyMLP run; ``nan_after``: the step after whose update one weight is NaN."""
    task = TinyMLP(**{**ARGS, "seed": seed})
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = task.datasets()["train"]
    with replay.Recorder(model, path, task=TASK, task_args={**ARGS, "seed": seed},
                         keyframe_every=keyframe_every, every=every) as rec:
        for step in range(steps):
            lo = (step * 16) % len(data)
            loss, n = task.loss(model, task.collate(data[lo:lo + 16]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            if step == nan_after:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            rec.step(loss=loss.item() / n)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return record(str(tmp_path_factory.mktemp("engine") / "traj"))


def reference_lca(store, nodes, weights, dataset="train"):
    """Brute force, written independently of the engine: float64, whole dataset in one batch,
    per element, Δ·Σ_k w_k ∇L(θ_t + s_k Δ) for every recorded interval. (T, names) dict."""
    traj = replay.open_trajectory(store)
    task = TinyMLP(**ARGS)
    model = task.build_model().double()
    x, y = task.collate(task.datasets()[dataset])
    x = x.double()

    def loss_and_grad(theta):
        theta = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        loss = torch.nn.functional.cross_entropy(functional_call(model, theta, (x,)), y)
        grads = torch.autograd.grad(loss, list(theta.values()))
        return loss.item(), dict(zip(theta, grads))

    out = []
    for t0, t1 in zip(traj.steps[:-1], traj.steps[1:]):
        a = {k: v.double() for k, v in traj.params(t0).items()}
        b = {k: v.double() for k, v in traj.params(t1).items()}
        delta = {k: b[k] - a[k] for k in a}
        acc = {k: torch.zeros_like(v) for k, v in a.items()}
        for s, w in zip(nodes, weights):
            _, g = loss_and_grad({k: a[k] + s * delta[k] for k in a})
            for k in acc:
                acc[k] += w * g[k]
        out.append({k: delta[k] * acc[k] for k in a})
    return out


def tensor_lca(cube, dataset="train"):
    sel = cube["lca"].sel(group=cube.grouping == "tensor", dataset=dataset)
    return {str(g).split("/", 1)[1]: sel.sel(group=g).values for g in sel.group.values}


def per_tensor(ref):
    names = ref[0].keys()
    return {k: np.array([float(r[k].sum()) for r in ref]) for k in names}


RULES = {
    "first-order": ([0.0], [1.0]),
    "trapezoid": ([0.0, 1.0], [0.5, 0.5]),
    "simpson": ([0.0, 0.5, 1.0], [1 / 6, 4 / 6, 1 / 6]),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_fixed_rules_match_brute_force(store, tmp_path, rule):
    cube = replay.run(store, task=TASK, out=str(tmp_path / "c.zarr"), quadrature=rule,
                      precision="float64", scheduler="sync", datasets=["train"], progress=False)
    ref = per_tensor(reference_lca(store, *RULES[rule]))
    got = tensor_lca(cube)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-10, atol=1e-15, err_msg=name)


def test_adaptive_matches_many_point_integral(store, tmp_path):
    # 129-point composite Simpson as the "exact" integral of the gradient along each update.
    n = 128
    nodes = np.linspace(0, 1, n + 1)
    weights = np.array([1] + [4 if i % 2 else 2 for i in range(1, n)] + [1]) / (3 * n)
    ref = reference_lca(store, nodes, weights)
    cube = replay.run(store, task=TASK, out=str(tmp_path / "c.zarr"), quadrature="adaptive",
                      tolerance=1e-13, max_splits=64, precision="float64", scheduler="sync",
                      datasets=["train"], progress=False)
    got = tensor_lca(cube)
    for name, value in per_tensor(ref).items():
        np.testing.assert_allclose(got[name], value, rtol=1e-8, atol=1e-14, err_msg=name)
    # Per element too: the saved cumulative LCA of every parameter.
    params = replay.load_param_lca(str(tmp_path / "c.zarr"))["train"]
    for name in params:
        total = sum(r[name] for r in ref)
        np.testing.assert_allclose(params[name].numpy(), total.numpy(), rtol=1e-7, atol=1e-12)


def test_telescoping_and_first_order_residual(store, tmp_path):
    kw = dict(task=TASK, precision="float64", scheduler="sync", progress=False)
    adaptive = replay.run(store, out=str(tmp_path / "a.zarr"), quadrature="adaptive",
                          tolerance=1e-6, **kw)
    lca = adaptive["lca"].sel(group=adaptive.grouping == "tensor").sum(["group", "step"])
    actual = adaptive.loss_next.isel(step=-1) - adaptive.loss.isel(step=0)
    np.testing.assert_allclose(lca.values, actual.values, rtol=1e-3)
    assert (abs(adaptive.residual) <= 1e-6).all()
    first = replay.run(store, out=str(tmp_path / "f.zarr"), quadrature="first-order", **kw)
    simpson = replay.run(store, out=str(tmp_path / "s.zarr"), quadrature="simpson", **kw)
    assert float(abs(first.residual).sum()) > 20 * float(abs(simpson.residual).sum())
    assert (simpson.splits == 2).all() and (first.splits == 1).all()


def test_same_cube_for_any_chunking_and_scheduler(store, tmp_path):
    kw = dict(task=TASK, precision="float64", progress=False, groups=["tensor", "layer"])
    base = replay.run(store, out=str(tmp_path / "a.zarr"), scheduler="sync", chunk_size=3, **kw)
    others = [
        replay.run(store, out=str(tmp_path / "b.zarr"), scheduler="sync", chunk_size=5, **kw),
        replay.run(store, out=str(tmp_path / "c.zarr"), scheduler="threads:2", chunk_size=2, **kw),
        replay.run(store, out=str(tmp_path / "d.zarr"), scheduler="local:2", chunk_size=4, **kw),
    ]
    for other in others:
        for var in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
            assert np.array_equal(base[var].values, other[var].values), var
    # The per-parameter sums are added per piece: other pieces, other float64 rounding only.
    ref = replay.load_param_lca(str(tmp_path / "a.zarr"))
    for name in "bcd":
        got = replay.load_param_lca(str(tmp_path / f"{name}.zarr"))
        for d in ref:
            for k in ref[d]:
                np.testing.assert_allclose(got[d][k], ref[d][k], rtol=1e-12, atol=1e-15)


def test_pieces_reduced_together_or_one_by_one_give_the_same_cube(store, tmp_path,
                                                                  monkeypatch):
    # A small model's pieces are reduced a few at a time (replay.engine.reduction.Group): groups
    # cut by time or by size, or one piece at a time, change no number, not even the sums'.
    from replay.engine import reduction

    kw = dict(task=TASK, scheduler="sync", progress=False, chunk_size=2, groups=["tensor"])
    cubes = [replay.run(store, out=str(tmp_path / "a.zarr"), **kw)]
    monkeypatch.setattr(reduction, "GROUP_SECONDS", 0.0)   # one piece per group
    cubes.append(replay.run(store, out=str(tmp_path / "b.zarr"), **kw))
    monkeypatch.setattr(reduction, "GROUP_SECONDS", 1e9)
    monkeypatch.setattr(reduction, "GROUP_BYTES", 0)       # held, but reduced step by step
    cubes.append(replay.run(store, out=str(tmp_path / "c.zarr"), **kw))
    for other in cubes[1:]:
        for var in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
            assert np.array_equal(cubes[0][var].values, other[var].values), var
    ref = replay.load_param_lca(str(tmp_path / "a.zarr"))
    for name in "bc":
        got = replay.load_param_lca(str(tmp_path / f"{name}.zarr"))
        assert all(torch.equal(got[d][k], ref[d][k]) for d in ref for k in ref[d])


def test_each_worker_runs_its_own_lane_of_pieces_in_order(store, tmp_path, capsys):
    # 12 Simpson steps in 4 pieces on 2 workers: a lane of 2 pieces each, pinned to its worker
    # and run in order, so only each lane's first point is evaluated cold: 2 × 12 + 2.
    kw = dict(task=TASK, progress=True, chunk_size=3, datasets=["train"])   # prints the summary
    capsys.readouterr()
    replay.run(store, out=str(tmp_path / "a.zarr"), scheduler="local:2", **kw)
    assert "(26 gradient evaluations" in capsys.readouterr().err
    replay.run(store, out=str(tmp_path / "b.zarr"), scheduler="threads:1", **kw)
    assert "(25 gradient evaluations" in capsys.readouterr().err


def test_resume_fills_only_missing_steps(store, tmp_path):
    kw = dict(task=TASK, precision="float64", scheduler="sync", progress=False, chunk_size=4)
    whole = replay.run(store, out=str(tmp_path / "whole.zarr"), **kw)
    out = str(tmp_path / "parts.zarr")
    part = replay.run(store, out=out, steps="4:8", **kw)
    assert part.done.values.tolist() == [4 <= t < 8 for t in range(12)]
    with pytest.raises(CubeError, match="not complete"):
        replay.load_param_lca(out)
    resumed = replay.run(store, out=out, **kw)
    assert resumed.done.all()
    for var in ("lca", "helped", "loss", "residual"):
        assert np.array_equal(whole[var].values, resumed[var].values), var
    a = replay.load_param_lca(str(tmp_path / "whole.zarr"))
    b = replay.load_param_lca(out)
    for name in a["train"]:
        np.testing.assert_allclose(a["train"][name], b["train"][name], rtol=1e-12, atol=1e-15)


def test_refuses_cube_from_other_trajectory_or_settings(store, tmp_path):
    out = str(tmp_path / "c.zarr")
    replay.run(store, task=TASK, out=out, scheduler="sync", progress=False, steps="0:2")
    with pytest.raises(CubeError, match=r"made with other settings \(quadrature differ"):
        replay.run(store, task=TASK, out=out, scheduler="sync", quadrature="trapezoid",
                   progress=False)
    other = record(str(tmp_path / "other"), seed=4)
    with pytest.raises(CubeError, match="made with other settings .*task_args, trajectory"):
        replay.run(other, task=TASK, out=out, scheduler="sync", progress=False)


def test_sampled_is_reproducible_and_seeded(store, tmp_path):
    kw = dict(task=TASK, scheduler="sync", progress=False, datasets=["train"])
    a = replay.run(store, gradient=replay.Sampled(2, 8, seed=1), out=str(tmp_path / "a"), **kw)
    b = replay.run(store, gradient=replay.Sampled(2, 8, seed=1), out=str(tmp_path / "b"),
                   chunk_size=2, **kw)
    c = replay.run(store, gradient=replay.Sampled(2, 8, seed=2), out=str(tmp_path / "c"), **kw)
    assert np.array_equal(a["lca"].values, b["lca"].values)
    assert not np.array_equal(a["lca"].values, c["lca"].values)
    # Same sample at every point of a step: Simpson's residual stays small on the sample.
    assert float(abs(a.residual).max()) < 1e-3


def test_task_from_manifest_needs_consent(store, tmp_path):
    with pytest.raises(TaskError, match="importing it runs its code, so pass task="):
        replay.run(store, out=str(tmp_path / "c.zarr"), scheduler="sync", progress=False)
    cube = replay.run(store, out=str(tmp_path / "c.zarr"), scheduler="sync", progress=False,
                      trust_task=True, steps=":3")
    assert int(cube.done.sum()) == 3


def test_bad_step_range_and_dataset(store, tmp_path):
    with pytest.raises(ReplayError, match="select no interval; the trajectory's intervals start at 0..11"):
        replay.run(store, task=TASK, out=str(tmp_path / "c"), steps="50:60", progress=False)
    with pytest.raises(ReplayError, match=r"unknown dataset\(s\) \['nope'\]"):
        replay.run(store, task=TASK, out=str(tmp_path / "c"), datasets=["nope"], progress=False)


def test_sparse_recording_replays_chords(tmp_path):
    sparse = record(str(tmp_path / "sparse"), steps=12, every=3)
    cube = replay.run(sparse, task=TASK, out=str(tmp_path / "c"), scheduler="sync",
                      quadrature="adaptive", tolerance=1e-6, precision="float64", progress=False)
    assert cube.step.values.tolist() == [0, 3, 6, 9]
    assert cube.step_end.values.tolist() == [3, 6, 9, 12]
    assert (abs(cube.residual) <= 1e-6).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(store, tmp_path):
    with pytest.raises(ReplayError, match="device 'cuda' requested but torch on host .* sees no CUDA GPU"):
        replay.run(store, task=TASK, out=str(tmp_path / "c"), device="cuda", scheduler="sync",
                   progress=False)


class ZeroGradMLP(TinyMLP):
    """A task whose loss() calls zero_grad(): backward then fills new .grad tensors, not the
    engine's flat gradient buffer, which would read as zero gradients."""

    def loss(self, model, batch):
        model.zero_grad()
        return super().loss(model, batch)


def test_a_loss_that_replaces_gradients_is_refused(store, tmp_path):
    task = ZeroGradMLP(**ARGS)
    with pytest.raises(TaskError, match=r"^the gradient of '0\.weight' was replaced during "
                                        r"backward \(is loss\(\) calling zero_grad or an "
                                        r"optimizer\?\); loss\(\) must only compute the loss$"):
        replay.run(store, task=task, out=str(tmp_path / "c.zarr"), scheduler="sync",
                   progress=False)
    assert not (tmp_path / "c.zarr").exists()  # the run made the cube and removed it again


def test_a_flush_cut_short_keeps_its_done_rows_and_redoes_the_rest(store, tmp_path):
    # The driver writes several pieces' partial sums as one array, a row per piece, before
    # their done flags. If the flags of one chunk never landed (a crash mid-write), the resume
    # drops that row alone, recomputes its steps, and the cube equals an uninterrupted one.
    import zarr

    from replay.cube.schema import PARTS

    kw = dict(task=TASK, precision="float64", scheduler="sync", progress=False, chunk_size=2)
    whole = replay.run(store, out=str(tmp_path / "whole.zarr"), **kw)
    out = str(tmp_path / "cut.zarr")
    replay.run(store, out=out, steps="0:8", **kw)
    root = zarr.open_group(out, mode="r+", use_consolidated=False)
    (key,) = root[f"{PARTS}/train"].array_keys()
    assert root[f"{PARTS}/train/{key}"].attrs["edges"] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    root["done"][4:6] = False
    resumed = replay.run(store, out=out, **kw)
    assert resumed.done.all()
    for var in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
        assert np.array_equal(whole[var].values, resumed[var].values), var
    a = replay.load_param_lca(str(tmp_path / "whole.zarr"))
    b = replay.load_param_lca(out)
    for d in a:
        for name in a[d]:
            np.testing.assert_allclose(a[d][name], b[d][name], rtol=1e-12, atol=1e-15)


def test_an_error_keeps_the_pieces_that_finished_before_it(tmp_path):
    # θ turns NaN at step 9: the replay stops there, the pieces before it are in the cube
    # (written by the driver on the way out), and a rerun that skips such steps does the rest.
    path = record(str(tmp_path / "traj"), nan_after=8)
    kw = dict(task=TASK, scheduler="sync", progress=False, chunk_size=2)
    out = str(tmp_path / "c.zarr")
    with pytest.raises(ReplayError, match="step 9 has non-finite"):
        replay.run(path, out=out, **kw)
    assert xr.open_zarr(out).done.values.tolist() == [True] * 8 + [False] * 4
    rerun = replay.run(path, out=out, nonfinite="skip", **kw)
    whole = replay.run(path, out=str(tmp_path / "whole.zarr"), nonfinite="skip", **kw)
    assert rerun.done.all()
    assert np.array_equal(rerun["lca"].values, whole["lca"].values, equal_nan=True)


def test_param_lca_off_keeps_the_cube_and_refuses_the_per_parameter_lca(store, tmp_path):
    kw = dict(task=TASK, scheduler="sync", progress=False)
    on = replay.run(store, out=str(tmp_path / "on.zarr"), **kw)
    off_path = str(tmp_path / "off.zarr")
    off = replay.run(store, out=off_path, param_lca=False, **kw)
    for var in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
        assert np.array_equal(on[var].values, off[var].values), var
    with pytest.raises(CubeError, match=r"param_lca=False \(CLI --no-param-lca\)"):
        replay.load_param_lca(off_path)
    with pytest.raises(CubeError, match="param_lca differ"):
        replay.run(store, out=off_path, **kw)
    from replay.cli import main

    cli = str(tmp_path / "cli.zarr")
    assert main(["replay", store, "--task", TASK, "--cube", cli, "--scheduler", "sync",
                 "--no-progress", "--no-param-lca"]) == 0
    assert json.loads(xr.open_zarr(cli).attrs["settings"])["param_lca"] is False


def test_sums_a_task_writes_itself_equal_those_it_hands_to_the_driver(store, tmp_path,
                                                                     monkeypatch):
    # A model whose per-parameter sums exceed replay.cube.buffer.INLINE_BYTES has its tasks
    # write them (one flat array per piece, buffers reused between pieces); a small one hands
    # them to the driver. Both give the same cube, bit for bit.
    # Small chunks make the finish add the tasks' sums chunk by chunk, as on a big model.
    import replay.cube.param_lca as param_lca
    import replay.engine.driver as driver
    import replay.engine.runtime as runtime

    kw = dict(task=TASK, scheduler="sync", progress=False, chunk_size=3, precision="float64")
    inline = replay.run(store, out=str(tmp_path / "inline.zarr"), **kw)
    monkeypatch.setattr(driver, "INLINE_BYTES", 0)
    monkeypatch.setattr(param_lca, "CHUNK", 7)
    own = replay.run(store, out=str(tmp_path / "own.zarr"), **kw)
    # The run is over: the process keeps its model, not the last end point or the sums.
    assert runtime._CACHE and all(rt.carry is None and rt.sums is None
                                for rt in runtime._CACHE.values())
    parts = zarr.open_array(str(tmp_path / "own.zarr" / "param_lca" / "train"))
    assert parts.chunks[0] <= 7 and parts.shape[0] > 7
    assert np.array_equal(inline["lca"].values, own["lca"].values)
    a = replay.load_param_lca(str(tmp_path / "inline.zarr"))
    b = replay.load_param_lca(str(tmp_path / "own.zarr"))
    assert a.keys() == b.keys()
    for d in a:
        for name in a[d]:
            assert torch.equal(a[d][name], b[d][name]), (d, name)


def test_a_trajectory_recorded_again_at_the_same_path_is_read_anew(tmp_path):
    # In one process (a notebook), sync replays keep their model, data and trajectory between
    # runs; a store deleted and recorded again at the same path must not be read through them.
    import shutil

    from replay.engine.driver import prepare
    from replay.engine.piece import compute_piece

    path = str(tmp_path / "traj")
    kw = dict(task=TASK, progress=False, datasets=["train"], scheduler="sync")
    record(path, steps=6, lr=0.05)
    replay.run(path, out=str(tmp_path / "a.zarr"), **kw)
    stale = prepare(path, out=str(tmp_path / "c.zarr"), **kw)
    shutil.rmtree(path)
    record(path, steps=6, lr=0.2)
    again = replay.run(path, out=str(tmp_path / "b.zarr"), **kw)
    fresh = replay.run(path, out=str(tmp_path / "d.zarr"), **{**kw, "scheduler": "local:1"})
    assert np.array_equal(again["lca"].values, fresh["lca"].values)
    assert np.array_equal(again["loss"].values, fresh["loss"].values)
    with pytest.raises(ReplayError, match="changed after this replay was planned"):
        compute_piece(stale.spec, 0, 1)
