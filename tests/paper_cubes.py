"""Hand-built LCA cubes for the claim rules: module values chosen, so the verdict is known.

:func:`module_cube` takes per-parameter LCA rates (per update) for the ``transformer`` groups
of a 3 + 3 layer model and for frequency buckets, and returns a cube in the DESIGN §7 schema
with the groupings ``transformer`` and ``frequency`` (each covering every parameter once).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

LAYERS = 3
SIZES = {"en_emb": 4000, "de_emb": 4000, "de_softmax": 4000, "other": 100,
         **{f"{s}_{i}": 2000 for s in ("en", "de") for i in range(1, LAYERS + 1)}}
EMB = {"en_emb": "encoder.embed_tokens.weight", "de_emb": "decoder.embed_tokens.weight",
       "de_softmax": "decoder.output_projection.weight"}
BUCKETS = 25


def paper_like() -> dict[str, float]:
    """Per-parameter rates shaped as the paper reports: small embeddings and softmax, encoder
    sandwich, decoder rising with height, the last layers best."""
    return {"en_emb": -0.1, "de_emb": -0.1, "de_softmax": -0.2, "other": -0.5,
            "en_1": -3.0, "en_2": -2.0, "en_3": -4.0, "de_1": -1.5, "de_2": -2.5, "de_3": -5.0}


def module_cube(rates: dict[str, float], *, steps: int = 30, datasets=("train", "test"),
                scale=None, bucket_rates=None, noise: float = 0.0, seed: int = 0,
                trend=None) -> xr.Dataset:
    """A cube whose group g has LCA = rates[g] · |g| · scale[d] · trend(t) (· noise) per step.

    bucket_rates: per-parameter rates of the 25 frequency buckets (bucket 1 = most frequent),
    the same for each embedding tensor, scaled so that the buckets of a tensor sum to that
    tensor's module total. trend: (steps,) multiplier; default a decay exp(−t / 10).
    """
    rng = np.random.default_rng(seed)
    scale = scale or {d: 1.0 for d in datasets}
    trend = np.exp(-np.arange(steps) / 10.0) if trend is None else np.asarray(trend)
    buckets = np.ones(BUCKETS) if bucket_rates is None else np.asarray(bucket_rates, float)
    module_labels = list(SIZES)
    labels, sizes, values = [], [], []
    per_module = {g: 1e-6 * rates[g] * SIZES[g] for g in module_labels}  # per step, before trend
    for g in module_labels:
        labels.append(f"transformer/{g}")
        sizes.append(SIZES[g])
        values.append(per_module[g])
    rest = sum(per_module[g] for g in module_labels if g not in EMB)
    for g, tensor in EMB.items():
        share = buckets * (SIZES[g] / BUCKETS)
        share = share / share.sum()
        for b in range(BUCKETS):
            labels.append(f"frequency/{tensor}:f{b + 1:02d}")
            sizes.append(SIZES[g] // BUCKETS)
            values.append(per_module[g] * share[b])
    labels.append("frequency/rest")
    sizes.append(sum(SIZES[g] for g in module_labels if g not in EMB))
    values.append(rest)
    values = np.array(values)  # (G,)
    d_scale = np.array([scale[d] for d in datasets])  # (D,)
    lca = values[None, :, None] * trend[:, None, None] * d_scale[None, None, :]
    if noise:
        lca = lca * (1 + noise * rng.standard_normal(lca.shape))
    transformer = np.array([lab.startswith("transformer/") for lab in labels])
    change = lca[:, transformer, :].sum(1)  # (S, D)
    loss = 5.0 + np.vstack([np.zeros((1, len(datasets))), np.cumsum(change, 0)[:-1]])
    sgd, sd = ("step", "group", "dataset"), ("step", "dataset")
    return xr.Dataset(
        {"lca": (sgd, lca), "helped": (sgd, np.zeros(lca.shape, np.int64)),
         "loss": (sd, loss), "loss_next": (sd, loss + change),
         "residual": (sd, np.zeros_like(loss)), "splits": ("step", np.ones(steps, np.int64)),
         "done": ("step", np.ones(steps, bool))},
        coords={"step": np.arange(steps), "step_end": ("step", np.arange(1, steps + 1)),
                "group": np.array(labels, dtype=object),
                "grouping": ("group", np.array([lab.split("/")[0] for lab in labels], object)),
                "group_size": ("group", np.array(sizes, np.int64)),
                "dataset": np.array(list(datasets), dtype=object)},
        attrs={"quadrature": "first-order", "gradient": json.dumps({"mode": "exact"}),
               "trajectory": json.dumps({"path": "hand-made", "manifest_sha256": "0" * 64}),
               "task": json.dumps({"ref": "tests:hand", "args": {}})},
    )
