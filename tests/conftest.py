"""Shared test fixtures: hand-made LCA cubes in the cube schema (:mod:`replay.cube.schema`, the
one the engine writes), and figure hygiene.

Fixtures
- ``make_cube(**kw) -> xr.Dataset``: a small, internally consistent cube of a toy Transformer
  (every grouping sums to the same total, loss_next − loss − Σ lca = residual); see
  :func:`build_cube` for the knobs.
- ``cube_from_arrays(lca, groups, group_size, **kw) -> xr.Dataset``: a cube with exactly the
  given LCA values, for tests with hand-computed answers.
- ``save_cube(ds, path) -> path``: writes a cube to zarr the way the engine does.
- autouse: a test that leaves matplotlib figures open fails.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")  # before any pyplot import: tests never need a display

import xarray as xr  # noqa: E402

from replay.cube import schema  # noqa: E402

VOCAB, DIM, HIDDEN = 30, 4, 8


def _atoms(layers: int, buckets: int) -> list[tuple[str, int | None, int]]:
    """The finest partition the groupings are built from: (tensor, row bucket or None, size)."""
    rows = np.array_split(np.arange(VOCAB), buckets)
    emb = lambda name: [(name, b, len(r) * DIM) for b, r in enumerate(rows)]  # noqa: E731
    atoms = emb("encoder.embed_tokens.weight")
    for side in ("encoder", "decoder"):
        for i in range(layers):
            atoms += [(f"{side}.layers.{i}.linear1.weight", None, DIM * HIDDEN),
                      (f"{side}.layers.{i}.linear1.bias", None, HIDDEN)]
    atoms += emb("decoder.embed_tokens.weight") + emb("decoder.output_projection.weight")
    atoms += [("encoder.layer_norm.weight", None, DIM)]
    return atoms


def _label(grouping: str, tensor: str, bucket: int | None) -> str:
    parts = tensor.split(".")
    side = {"encoder": "en", "decoder": "de"}[parts[0]]
    if grouping == "tensor":
        return tensor
    if grouping == "layer":
        return ".".join(parts[:3]) if parts[1] == "layers" else ".".join(parts[:-1])
    if grouping == "frequency":
        return f"{tensor}:f{bucket + 1:02d}" if bucket is not None else "rest"
    if grouping == "transformer":
        if parts[1] == "layers":
            return f"{side}_{int(parts[2]) + 1}"
        return {"embed_tokens": f"{side}_emb", "output_projection": "de_softmax"}.get(
            parts[1], "other")
    if grouping == "sparse-dense":
        if parts[1] == "layers":
            return f"{side}_dense"
        return f"{side}_sparse" if parts[1] in ("embed_tokens", "output_projection") else "other"
    raise ValueError(grouping)


def _strength(tensor: str, bucket: int | None, layers: int) -> float:
    """Mean per-element LCA per step (negative = helps): distinct, so rankings mean something."""
    parts = tensor.split(".")
    if parts[1] == "layer_norm":
        return 2e-4  # hurts: gives the cube a positive group
    if bucket is not None:
        base = 2e-4 if parts[1] == "embed_tokens" else 4e-4
        return -base / (bucket + 1)  # frequent words help most
    layer = int(parts[2])
    return -(6e-4 + 3e-4 * (layer if parts[0] == "decoder" else layers - 1 - layer))


def build_cube(*, steps: int = 12, layers: int = 2, buckets: int = 3,
               datasets=("train", "test"),
               groupings=("transformer", "sparse-dense", "frequency", "layer", "tensor"),
               every: int = 1, mode: str = "exact", not_done=(), seed: int = 0,
               noise: float = 0.3, residual_scale: float = 1e-5) -> xr.Dataset:
    """A cube of ``steps`` intervals of a toy Transformer with ``layers`` layers per stack."""
    rng = np.random.default_rng(seed)
    atoms = _atoms(layers, buckets)
    sizes = np.array([s for _, _, s in atoms])
    strength = np.array([_strength(t, b, layers) for t, b, _ in atoms])
    nd = len(datasets)
    decay = np.exp(-np.arange(steps) / max(steps / 3, 1))[:, None, None]  # (S, 1, 1)
    scale = np.array([1.0, 0.8, 0.9, 0.7][:nd])[None, None, :]
    per_elem = strength[None, :, None] * decay * scale * (
        1 + noise * rng.standard_normal((steps, len(atoms), nd)))
    atom_lca = per_elem * sizes[None, :, None]  # (S, A, D)
    p_help = np.clip(0.5 - per_elem * 200, 0.05, 0.95)
    atom_helped = rng.binomial(sizes[None, :, None], p_help)  # (S, A, D)

    labels, member = [], []
    for g in groupings:
        names = [_label(g, t, b) for t, b, _ in atoms]
        order = [n for n in dict.fromkeys(names) if n not in ("other", "rest")]
        order += [n for n in ("other", "rest") if n in names]
        for n in order:
            labels.append(f"{g}/{n}")
            member.append([i for i, m in enumerate(names) if m == n])
    onehot = np.zeros((len(atoms), len(labels)))
    for j, idx in enumerate(member):
        onehot[idx, j] = 1.0
    lca = np.einsum("sad,ag->sgd", atom_lca, onehot)
    helped = np.einsum("sad,ag->sgd", atom_helped, onehot).round().astype(np.int64)
    group_size = (sizes @ onehot).round().astype(np.int64)

    first = np.array([lab.split("/")[0] == groupings[0] for lab in labels])
    change = lca[:, first, :].sum(1)  # (S, D): Σ over ONE grouping
    residual = residual_scale * rng.standard_normal((steps, nd))
    loss = np.empty((steps, nd))
    level = np.linspace(5.0, 5.5, nd)
    for t in range(steps):
        loss[t] = level
        level = level + change[t] + residual[t]
        if mode == "sampled":  # next step's sample differs: losses do not chain
            level = level + 0.05 * rng.standard_normal(nd)
    loss_next = loss + change + residual
    ds = _assemble(lca, helped, labels, group_size, loss, loss_next, datasets,
                   np.arange(steps) * every, every, mode)
    return _mark_not_done(ds, not_done)


def _assemble(lca, helped, labels, group_size, loss, loss_next, datasets, steps, every,
              mode) -> xr.Dataset:
    first = labels[0].split("/")[0]
    in_first = np.array([lab.split("/")[0] == first for lab in labels])
    residual = (loss_next - loss) - lca[:, in_first, :].sum(1)
    gradient = {"mode": "exact"} if mode == "exact" else {
        "mode": "sampled", "batches": 4, "batch_size": 32, "seed": 0}
    steps = np.asarray(steps, dtype=np.int64)
    coords = schema.Coords(steps, steps + every, tuple(labels),
                           tuple(lab.split("/")[0] for lab in labels),
                           np.asarray(group_size, dtype=np.int64), tuple(datasets), len(steps))
    data = {"lca": lca, "helped": helped, "loss": loss, "loss_next": loss_next,
            "residual": residual, "splits": np.full(len(steps), 2), "done": np.ones(len(steps))}
    return schema.build(coords, data, {
        "lca_replay_version": "0.1.0",
        "quadrature": "simpson",
        "gradient": json.dumps(gradient),
        "tolerance": 1e-3,
        "trajectory": json.dumps({"path": "runs/toy/trajectory",
                                  "manifest_sha256": "ab12cd34" * 8}),
        "task": json.dumps({"ref": "replay.tasks.toy_nmt:ToyNMT", "args": {"seed": 0}}),
        "created": "2025-01-01T00:00:00+00:00",
    })


def _mark_not_done(ds: xr.Dataset, not_done) -> xr.Dataset:
    idx = np.asarray(list(not_done), dtype=int)
    if idx.size == 0:
        return ds
    ds = ds.copy(deep=True)
    for name in ("lca", "loss", "loss_next", "residual"):
        ds[name].values[idx] = np.nan
    ds["helped"].values[idx] = 0
    ds["splits"].values[idx] = 0
    ds["done"].values[idx] = False
    return ds


def from_arrays(lca, groups, group_size, *, datasets=("train",), steps=None, every=1,
                helped=None, loss0=1.0, residual=None, mode="exact") -> xr.Dataset:
    """A cube with exactly these values: lca (S, G, D) or (S, G) for one dataset; groups are
    full labels ("grouping/name"); loss chains from ``loss0`` with Σ over the first grouping
    plus ``residual`` (S, D), default 0."""
    lca = np.asarray(lca, dtype=np.float64)
    if lca.ndim == 2:
        lca = lca[:, :, None]
    s, g, d = lca.shape
    steps = np.arange(s) * every if steps is None else np.asarray(steps)
    helped = np.zeros(lca.shape, dtype=np.int64) if helped is None else np.asarray(helped)
    if helped.ndim == 2:
        helped = helped[:, :, None]
    residual = np.zeros((s, d)) if residual is None else np.asarray(residual, float).reshape(s, d)
    first = groups[0].split("/")[0]
    in_first = np.array([lab.split("/")[0] == first for lab in groups])
    change = lca[:, in_first, :].sum(1) + residual
    loss = loss0 + np.concatenate([np.zeros((1, d)), np.cumsum(change, 0)[:-1]], 0)
    return _assemble(lca, helped, list(groups), group_size, loss, loss + change, datasets,
                     steps, every, mode)


def write_cube(ds: xr.Dataset, path) -> str:
    """Store ``ds`` as a zarr v3 cube: strings variable-length, metadata not consolidated
    (as while a replay is still running)."""
    ds.to_zarr(os.fspath(path), mode="w", zarr_format=3, consolidated=False)
    return os.fspath(path)


# Session scope: they hand out pure functions, so module-scoped fixtures can use them too.
@pytest.fixture(scope="session")
def make_cube():
    return build_cube


@pytest.fixture(scope="session")
def cube_from_arrays():
    return from_arrays


@pytest.fixture(scope="session")
def save_cube():
    return write_cube


@pytest.fixture(autouse=True)
def _no_open_figures():
    """Fail a test that leaves matplotlib figures open (they leak memory across a session)."""
    yield
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and plt.get_fignums():
        count = len(plt.get_fignums())
        plt.close("all")
        pytest.fail(f"test left {count} matplotlib figure(s) open: close them (plt.close(fig))")
