"""Bad inputs to `lca replay`: one line naming the file, parameter or key and the fix, exit 1,
and nothing on disk changed (a hash of every file under tmp_path, before and after)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import xarray as xr

import replay
from replay.settings import YAML_KEYS
from replay.store.files import default_digest
from replay.store.manifest import FORMAT_VERSION, file_digest
from tests.reliability.helpers import (
    ARGS, COMMON, TASK, assert_same_cube, copy_store, lca, manifest, one_line_error, record,
    record_poisoned, task_flags, tree, write_manifest,
)

CHUNK = ["--chunk-size", "4"]
DIGEST = default_digest()        # the hash the Recorder writes into the manifest


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A 12-step TinyMLP trajectory (keyframes at 0, 5, 10) and its uninterrupted cube."""
    root = tmp_path_factory.mktemp("clean")
    store = record(str(root / "traj"), steps=12)
    reference = str(root / "reference.zarr")
    replay.run(store, task=TASK, task_args=ARGS, out=reference, precision="float64",
               scheduler="sync", chunk_size=4, progress=False)
    return store, reference


@pytest.fixture
def store(clean, tmp_path):
    """A private copy of the clean trajectory, to damage."""
    return copy_store(clean[0], tmp_path / "traj")


def refused(capsys, tmp_path, *argv) -> str:
    """Run `lca replay ARGV`, check exit 1, one line, and an unchanged tree; the message."""
    before = tree(tmp_path)
    code, _, err = lca(capsys, "replay", *argv)
    assert code == 1, err
    message = one_line_error(err)
    assert tree(tmp_path) == before, "a refused replay changed files on disk"
    return message


def flip_byte(path, offset=-1) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[offset] ^= 0x01
        f.seek(0)
        f.write(data)


# ---------------------------------------------------------------------------------- the store

def test_truncated_keyframe(store, tmp_path, capsys):
    path = os.path.join(store, "keyframes", "step-00000005.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr", *COMMON)
    assert re.search(r"keyframes/step-00000005\.safetensors: \d+ bytes, manifest\.json says "
                     r"\d+ \(truncated or replaced\); restore it from a copy of the store or "
                     r"re-record; `lca verify .*traj` lists every problem$", msg), msg


@pytest.mark.parametrize("role", ["keyframes", "deltas"])
def test_missing_keyframe_or_delta(store, tmp_path, capsys, role):
    step = 5 if role == "keyframes" else 3
    os.remove(os.path.join(store, role, f"step-{step:08d}.safetensors"))
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr", *COMMON)
    kind = role[:-1]
    assert f"{role}/step-{step:08d}.safetensors: the {kind} file of step {step} is missing; " \
           "restore it from a copy of the store or re-record" in msg


def test_bit_flip_in_the_first_file(store, tmp_path, capsys):
    # Same size, other bytes: found by the hash check when the replay reads the file. The
    # cube this run had just created holds nothing yet, so it is removed again.
    flip_byte(os.path.join(store, "keyframes", "step-00000000.safetensors"))
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr", *COMMON)
    assert re.search(rf"keyframes/step-00000000\.safetensors: {DIGEST} \w+… does not match the "
                     r"manifest's \w+… \(corrupted\); re-record or restore the file", msg), msg


def test_manifest_with_a_wrong_hash(store, tmp_path, capsys):
    m = manifest(store)
    rel = m["steps"][0]["files"]["keyframe"]
    m["steps"][0][file_digest(m["steps"][0], rel)[0]][rel] = "0" * 64
    write_manifest(store, m)
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr", *COMMON)
    assert f"keyframes/step-00000000.safetensors: {DIGEST} " in msg
    assert "does not match the manifest's 000000000000… (corrupted)" in msg


def test_bit_flip_later_keeps_the_steps_done_and_resumes(clean, store, tmp_path, capsys):
    """Found only when read: the chunks before it are done and stay valid; once the file is
    restored, the same command finishes the cube to exactly the uninterrupted one."""
    path = os.path.join(store, "deltas", "step-00000006.safetensors")
    with open(path, "rb") as f:
        original = f.read()
    flip_byte(path, offset=len(original) // 2)
    cube = tmp_path / "c.zarr"
    argv = ["replay", store, *task_flags(), "--cube", cube, *COMMON, *CHUNK]
    code, _, err = lca(capsys, *argv)
    assert code == 1
    assert f"deltas/step-00000006.safetensors: {DIGEST} " in one_line_error(err)
    done = xr.open_zarr(cube)["done"].values
    assert done.tolist() == [True] * 4 + [False] * 8
    ref = xr.open_zarr(clean[1])
    part = xr.open_zarr(cube)
    for name in ("lca", "helped", "loss", "loss_next", "residual", "splits"):
        assert np.array_equal(part[name].values[:4], ref[name].values[:4]), name
    with open(path, "wb") as f:
        f.write(original)
    code, _, err = lca(capsys, *argv)
    assert code == 0, err
    assert_same_cube(cube, clean[1])


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(format_version=FORMAT_VERSION + 1),
     rf"manifest\.json: format_version {FORMAT_VERSION + 1} is not supported by lca-replay \S+ "
     r"\(it reads formats 1, 2, 3\); use the lca-replay version that recorded it$"),
    (lambda m: m["params"][0].update(shape="x"),
     r"manifest\.json: params\[0\] needs a name, a shape and one of the dtypes"),
    (lambda m: m.pop("steps"), r"manifest\.json: missing key 'steps'"),
    (lambda m: m["steps"][1]["files"].update(delta="../../etc/passwd"),
     r"step 1: bad delta entry '\.\./\.\./etc/passwd' \(needs a relative path"),
])
def test_manifest_damage(store, tmp_path, capsys, edit, expected):
    m = manifest(store)
    edit(m)
    write_manifest(store, m)
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr", *COMMON)
    assert re.search(expected, msg), msg


def test_manifest_not_json(store, tmp_path, capsys):
    with open(os.path.join(store, "manifest.json"), "r+b") as f:
        f.truncate(100)
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr", *COMMON)
    assert re.search(r"traj/manifest\.json is not valid JSON \(.*\); the store is damaged: "
                     r"re-record or restore the file", msg), msg


def test_not_a_store(tmp_path, capsys):
    msg = refused(capsys, tmp_path, tmp_path / "nothing", *task_flags(), *COMMON)
    assert "no trajectory at" in msg and "manifest.json not found" in msg


# ---------------------------------------------------------------------------------- the task

def test_model_does_not_match_the_recorded_shapes(store, tmp_path, capsys):
    msg = refused(capsys, tmp_path, store, *task_flags(args={**ARGS, "hidden": 32}),
                  "--cube", tmp_path / "c.zarr", *COMMON)
    assert re.search(r"parameter '0\.weight' has shape \(32, 8\) in the model built by task "
                     r"'replay\.tasks\.tiny_mlp:TinyMLP' but \(16, 8\) in trajectory \S+traj; "
                     r"the task must build the recorded architecture: check its arguments", msg)


def test_model_without_a_recorded_parameter(store, tmp_path, capsys):
    msg = refused(capsys, tmp_path, store, *task_flags(args={**ARGS, "depth": 1}),
                  "--cube", tmp_path / "c.zarr", *COMMON)
    assert "builds a model without the recorded tensor '4.weight' (4, 16) and 1 more" in msg


def test_empty_dataset(store, tmp_path, capsys):
    msg = refused(capsys, tmp_path, store, *task_flags(args={**ARGS, "test_size": 0}),
                  "--cube", tmp_path / "c.zarr", *COMMON)
    assert re.search(r"dataset 'valid' of task '\S+' is empty: there is no loss to allocate; "
                     r"leave it out \(datasets=\[\.\.\.\], CLI --datasets\)", msg), msg


def test_unknown_dataset(store, tmp_path, capsys):
    msg = refused(capsys, tmp_path, store, *task_flags(), "--datasets", "train,tset", *COMMON)
    assert "unknown dataset(s) ['tset']; the task provides train, valid, test" in msg


def test_task_that_cannot_be_imported(store, tmp_path, capsys):
    msg = refused(capsys, tmp_path, store, "--task", "no_such_pkg.mod:Task", *COMMON)
    assert "cannot import task module 'no_such_pkg.mod'" in msg
    assert "install it or put it on PYTHONPATH" in msg


def test_task_args_not_json(store, tmp_path, capsys):
    msg = refused(capsys, tmp_path, store, "--task", TASK, "--task-args", "{seed: 3", *COMMON)
    assert msg.startswith("lca replay: error: --task-args is not valid JSON")


# ----------------------------------------------------------------------- steps, config, cube

@pytest.mark.parametrize("steps, expected", [
    ("50:60", "steps 50:60 select no interval; the trajectory's intervals start at 0..11"),
    ("7:3", "steps 7:3 select no interval"),
    ("3-7", "--steps must look like 'A:B', 'A:' or ':B' (recorded step numbers), got '3-7'"),
])
def test_steps_out_of_range_or_malformed(store, tmp_path, capsys, steps, expected):
    msg = refused(capsys, tmp_path, store, *task_flags(), "--steps", steps, *COMMON)
    assert expected in msg


def config(tmp_path, store, replay_section: str) -> str:
    path = tmp_path / "replay.yaml"
    path.write_text(f"task: {{ref: '{TASK}', args: {json.dumps(ARGS)}}}\n"
                    "train: {steps: 12, lr: 0.05}\n"
                    f"record: {{path: '{store}'}}\n"
                    f"replay: {replay_section}\n")
    return str(path)


@pytest.mark.parametrize("section, expected", [
    ("{quadratur: simpson}",
     r"unknown key 'quadratur' in section 'replay' of \S+replay\.yaml; valid keys: "
     + re.escape(", ".join(sorted(YAML_KEYS))) + "$"),
    ("{threads: two}", r"key 'threads' in section 'replay' of \S+ must be an integer, got "
                       r"'two' \(string\)$"),
    ("{quadrature: rk4}", r"key 'quadrature' in section 'replay' of \S+ must be one of "
                          r"'first-order', 'trapezoid', 'simpson', 'adaptive', got 'rk4'"),
    ("{steps: '0..5'}", r"key 'steps' in section 'replay' of \S+ must look like 'A:B'"),
])
def test_config_keys_and_values(store, tmp_path, capsys, section, expected):
    msg = refused(capsys, tmp_path, config(tmp_path, store, section), *COMMON)
    assert re.search(expected, msg), msg


def test_unknown_section(store, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(f"task: {{ref: '{TASK}'}}\ntrain: {{steps: 2, lr: 0.1}}\nreplays: {{}}\n")
    msg = refused(capsys, tmp_path, path, *COMMON)
    assert re.search(r"unknown section 'replays' in \S+bad\.yaml; valid sections: record, "
                     r"replay, task, train$", msg), msg


def test_cube_made_with_other_settings(clean, store, tmp_path, capsys):
    cube = copy_store(clean[1], tmp_path / "c.zarr")
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", cube, *COMMON, *CHUNK,
                  "--quadrature", "trapezoid")
    assert re.search(r"cube \S+c\.zarr was made with other settings \(quadrature differ; e\.g\. "
                     r"quadrature: cube has 'simpson', this run 'trapezoid'\); use another "
                     r"--cube or the cube's settings$", msg), msg
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", cube, *COMMON,
                  "--chunk-size", "3")
    assert "is chunked by 4 steps, this run asked for 3; drop chunk_size or pass 4" in msg


def test_cube_path_that_is_not_a_cube(store, tmp_path, capsys):
    other = tmp_path / "results"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", other, *COMMON)
    assert msg.endswith("results exists and is not an LCA cube; choose another --cube (or "
                        "remove it if it is yours)")


def test_damaged_cube(clean, store, tmp_path, capsys):
    cube = copy_store(clean[1], tmp_path / "c.zarr")
    with open(os.path.join(cube, "zarr.json"), "w") as f:
        f.write("{not json")
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", cube, *COMMON, *CHUNK)
    assert "c.zarr exists and is not an LCA cube" in msg
    cube2 = copy_store(clean[1], tmp_path / "d.zarr")
    os.remove(os.path.join(cube2, "step", "zarr.json"))
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", cube2, *COMMON, *CHUNK)
    assert re.search(r"d\.zarr is not a readable LCA cube \(.*\); choose another --cube, or "
                     r"delete it and replay again$", msg), msg
    os.remove(os.path.join(cube2, "done", "zarr.json"))     # without --chunk-size: read first
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", cube2, *COMMON)
    assert "d.zarr is not a readable LCA cube (KeyError: " in msg


# ---------------------------------------------------------------------------- non-finite values

def test_nonfinite_checkpoint_names_step_and_tensor_then_skip_marks_it(tmp_path, capsys):
    store = record_poisoned(tmp_path / "traj", poison=[(5, "0.weight", float("nan")),
                                                       (9, "2.bias", float("inf"))])
    cube = tmp_path / "c.zarr"
    # The first piece replayed holds the bad step: nothing gets done, nothing stays on disk.
    msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", cube, *COMMON, *CHUNK,
                  "--steps", "4:12")
    assert msg.endswith("checkpoint at step 5 has non-finite values in '0.weight'; pass "
                        "nonfinite='skip' (CLI --nonfinite skip) to mark such steps and continue")
    # All steps: the chunk before the bad step is done and kept when the run stops.
    code, _, err = lca(capsys, "replay", store, *task_flags(), "--cube", cube, *COMMON, *CHUNK)
    assert code == 1 and "checkpoint at step 5 has non-finite values in '0.weight'" in err
    assert xr.open_zarr(cube)["done"].values.tolist() == [True] * 4 + [False] * 8
    # `nonfinite` changes no number, so the same cube resumes with --nonfinite skip.
    code, _, err = lca(capsys, "replay", store, *task_flags(), "--cube", cube, *COMMON, *CHUNK,
                       "--nonfinite", "skip")
    assert code == 0, err
    ds = xr.open_zarr(cube)
    bad = [4, 5, 8, 9]  # intervals into and out of the poisoned steps 5 and 9
    assert bool(ds["done"].all())
    assert ds["splits"].values.tolist() == [0 if t in bad else 2 for t in range(12)]
    lca_ = ds["lca"].values
    assert np.isnan(lca_[bad]).all() and np.isfinite(np.delete(lca_, bad, axis=0)).all()
    assert np.isnan(ds["loss"].values[bad]).all()
    # Summary printed without --no-progress, so run once more (nothing left to do) to see it.
    code, _, err = lca(capsys, "replay", store, *task_flags(), "--cube", cube, "--precision",
                       "float64", "--scheduler", "sync", *CHUNK)
    assert code == 0
    assert "4 step(s) skipped for non-finite values (lca NaN, splits 0): 4, 5, 8, 9" in err
    # The per-parameter LCA adds the steps that were not skipped.
    params = replay.load_param_lca(str(cube))["train"]
    total = sum(float(t.sum()) for t in params.values())
    by_group = np.nansum(ds["lca"].sel(dataset="train", group=ds.grouping == "tensor").values)
    assert total == pytest.approx(by_group, rel=1e-9)
    # First order evaluates θ_9 alone, where the Inf bias saturates tanh and loss and gradient
    # are finite: the step out of it is still marked, not left with a silent NaN.
    code, _, err = lca(capsys, "replay", store, *task_flags(), "--cube", tmp_path / "f.zarr",
                       *COMMON, *CHUNK, "--nonfinite", "skip", "--quadrature", "first-order")
    assert code == 0, err
    ds = xr.open_zarr(tmp_path / "f.zarr")
    assert ds["splits"].values.tolist() == [0 if t in bad else 1 for t in range(12)]
    assert np.isfinite(ds["lca"].values[[t for t in range(12) if t not in bad]]).all()
    params = replay.load_param_lca(str(tmp_path / "f.zarr"))
    assert all(bool(v.isfinite().all()) for d in params.values() for v in d.values())


def test_nonfinite_gradient_names_step_and_tensor_then_skip_marks_it(clean, tmp_path, capsys):
    store = clean[0]
    traj = replay.open_trajectory(store)
    b = [float(traj.params(t)["0.bias"][0]) for t in traj.steps]
    top = int(np.argmax(b))
    above = (max(b) + sorted(b)[-2]) / 2    # only θ at step `top` is past it
    poison = ["--task", "tests.reliability.tasks:PoisonMLP",
              "--task-args", json.dumps({**ARGS, "above": above})]
    cube = tmp_path / "c.zarr"
    first = top - 1 if top > 0 else top     # the first interval that evaluates θ_top
    msg = refused(capsys, tmp_path, store, *poison, "--cube", cube, *COMMON, "--chunk-size", "1",
                  "--steps", f"{first}:{first + 1}")
    assert re.search(rf"the gradient of '0\.bias' is not finite on dataset 'train' at step "
                     rf"{first} \(s=[0-9.]+ along the update\); pass nonfinite='skip'", msg), msg
    code, _, err = lca(capsys, "replay", store, *poison, "--cube", cube, *COMMON, *CHUNK,
                       "--nonfinite", "skip")
    assert code == 0, err
    ds = xr.open_zarr(cube)
    skipped = [t for t in range(len(b) - 1) if max(b[t], b[t + 1]) > above]
    assert 0 < len(skipped) <= 2
    assert np.flatnonzero(ds["splits"].values == 0).tolist() == skipped
    ref = xr.open_zarr(clean[1])
    keep = [t for t in range(len(b) - 1) if t not in skipped]
    assert np.array_equal(ds["lca"].values[keep], ref["lca"].values[keep])


def test_unreachable_scheduler(store, tmp_path, capsys):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        msg = refused(capsys, tmp_path, store, *task_flags(), "--cube", tmp_path / "c.zarr",
                      "--scheduler", "tcp://127.0.0.1:1", "--no-progress")
    assert re.search(r"could not connect to tcp://127\.0\.0\.1:1 \(\w+: .+\); check that the "
                     r"scheduler runs \(`dask scheduler`\) and is reachable from here, or run "
                     r"with scheduler='local'$", msg), msg
