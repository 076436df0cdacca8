"""Shared helpers of the reliability tests: trees, cubes, stores and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import torch
import xarray as xr

import replay
from replay.cli import main
from tests.test_engine import ARGS, TASK, record  # noqa: F401  (re-exported for the tests)
from replay.tasks.tiny_mlp import TinyMLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW = "tests.reliability.tasks:SlowMLP"
# Settings every CLI replay of these tests shares (float64: results compared bit for bit).
COMMON = ["--precision", "float64", "--scheduler", "sync", "--no-progress"]


def tree(root) -> dict[str, str]:
    """Relative path -> sha256 of every file (and "dir" for every directory) under ``root``."""
    out = {}
    for here, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(here, root)
        out[rel + "/"] = "dir"
        for name in sorted(files):
            with open(os.path.join(here, name), "rb") as f:
                out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


def lca(capsys, *argv) -> tuple[int, str, str]:
    """Run ``lca ARGV`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(err: str, command: str = "replay") -> str:
    """The message of a CLI error, after checking it is one line and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lca {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "replay.cli", *map(str, argv)]


def task_flags(task=TASK, args=None) -> list[str]:
    return ["--task", task, "--task-args", json.dumps(ARGS if args is None else args)]


def copy_store(store, dest) -> str:
    shutil.copytree(store, dest)
    return str(dest)


def manifest(store) -> dict:
    with open(os.path.join(store, "manifest.json")) as f:
        return json.load(f)


def write_manifest(store, m: dict) -> None:
    with open(os.path.join(store, "manifest.json"), "w") as f:
        json.dump(m, f, indent=1)


def record_poisoned(path, steps=12, poison=(), keyframe_every=5, seed=3):
    """Like ``record`` (TinyMLP, Adam), but θ_t of each ``(t, name, value)`` in ``poison``
    has its first element set to ``value`` in the recording only (training goes on from the
    clean value, so the other steps stay finite)."""
    poison = {t: (name, value) for t, name, value in poison}
    task = TinyMLP(**{**ARGS, "seed": seed})
    model = task.build_model()
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    data = task.datasets()["train"]
    with replay.Recorder(model, path, task=TASK, task_args={**ARGS, "seed": seed},
                         keyframe_every=keyframe_every) as rec:
        for step in range(1, steps + 1):
            lo = ((step - 1) * 16) % len(data)
            loss, n = task.loss(model, task.collate(data[lo:lo + 16]))
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
            if step in poison:
                name, value = poison[step]
                with torch.no_grad():
                    flat = params[name].view(-1)
                    clean = flat[0].clone()
                    flat[0] = value
                    rec.step(loss=loss.item() / n)   # the recorder copies θ here
                    flat[0] = clean
            else:
                rec.step(loss=loss.item() / n)
    return str(path)


def assert_same_cube(got, want) -> None:
    """Every variable and coordinate equal bit for bit, and the per-parameter LCA too."""
    a, b = xr.open_zarr(got), xr.open_zarr(want)
    assert set(a.variables) == set(b.variables)
    assert bool(a["done"].all()) and bool(b["done"].all())
    for name in a.variables:
        x, y = np.asarray(a[name].values), np.asarray(b[name].values)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype.kind == "f":
            assert np.array_equal(x.view(np.uint64 if x.itemsize == 8 else np.uint32),
                                  y.view(np.uint64 if y.itemsize == 8 else np.uint32)), name
        else:
            assert np.array_equal(x, y), name
    p, q = replay.load_param_lca(got), replay.load_param_lca(want)
    assert p.keys() == q.keys()
    for dataset in p:
        assert p[dataset].keys() == q[dataset].keys()
        for name in p[dataset]:
            assert torch.equal(p[dataset][name], q[dataset][name]), (dataset, name)
