"""Zhu et al.'s findings as claims, each judged on cubes by a rule written next to it.

Every claim is a :class:`Claim`: what the paper says (``claim``, ``paper``), the rule that
decides it on our cubes (``rule``, in words), and a function computing ``(measured, holds,
summary)`` from :class:`Evidence`. Values are LCA in loss units (negative = lowered the loss);
"help" is −LCA. "Per parameter" is Eq. 4 (÷ |g|), the normalisation of the paper's figures.
Thresholds are ours (the paper gives none but τ = 0.905) and stated in each rule;
``holds: False`` is a result like any other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import xarray as xr

from analysis.compare import compare, kendall_tau_b
from analysis.ops import as_str, per_param, select_done, select_grouping, smooth, total

SPARSE = ("en_emb", "de_emb", "de_softmax")


@dataclass
class Evidence:
    """The cubes the claims are judged on (all loaded, done steps only).

    paper: the paper's replay of the main run (sampled, first-order) on ``train`` and ``test``;
    sim_exact, sim_sampled: the §3.2 simulation replayed with exact and with sampled gradients,
    both first-order; sim_quadrature: the simulation with exact gradients and the better
    quadrature (Simpson / adaptive); window: Eq. 3's smoothing window in updates.
    """

    paper: xr.Dataset
    sim_exact: xr.Dataset
    sim_sampled: xr.Dataset
    sim_quadrature: xr.Dataset
    window: int = 15


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    paper: str
    rule: str
    judge: Callable[[Evidence], tuple[dict, bool, str]]


# --- what the rules read ---------------------------------------------------------------------


def modules(cube: xr.Dataset, dataset: str) -> dict[str, float]:
    """Per-parameter cumulative LCA of each ``transformer`` group on ``dataset``."""
    pp = per_param(total(select_grouping(cube, "transformer"))).sel(dataset=dataset)
    return {str(g): float(v) for g, v in zip(as_str(pp["group"].values), pp.values)}


def layers(values: dict[str, float], side: str) -> list[tuple[int, float]]:
    """[(layer number, value)] of ``side`` ("en" or "de"), bottom layer first."""
    # e.g. {"en_1": a, "en_2": b, "de_1": c}, "en" -> [(1, a), (2, b)]
    found = [(int(m.group(1)), v) for g, v in values.items()
             if (m := re.fullmatch(rf"{side}_(\d+)", g))]
    return sorted(found)


def datasets(cube: xr.Dataset) -> list[str]:
    return [d for d in ("train", "test") if d in as_str(cube["dataset"].values).tolist()]


def tau_of(a, b) -> float:
    t = kendall_tau_b(a, b)
    return float(t) if np.isfinite(t) else float("nan")


def rel_l1(a: xr.Dataset, b: xr.Dataset, grouping: str = "transformer",
           dataset: str = "train") -> float:
    """Σ_g |lca_a − lca_b| / Σ_g |lca_b| of the groups' total LCA (``b`` the reference)."""
    ta = total(select_grouping(a, grouping)).sel(dataset=dataset)
    tb = total(select_grouping(b, grouping)).sel(dataset=dataset)
    ta = ta.sel(group=tb["group"].values)
    return float(np.abs(ta.values - tb.values).sum() / np.abs(tb.values).sum())


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.3g}"


# --- the rules ---------------------------------------------------------------------------------


def _sparse_little(ev: Evidence):
    measured, ok, parts = {}, True, []
    for d in datasets(ev.paper):
        vals = modules(ev.paper, d)
        layer_vals = [v for side in ("en", "de") for _, v in layers(vals, side)]
        median_help = -float(np.median(layer_vals))
        sparse = {g: vals[g] for g in SPARSE if g in vals}
        most = max((-v for v in sparse.values()), default=float("nan"))
        ratio = most / median_help if median_help > 0 else float("inf")
        measured[d] = {"per_parameter": sparse, "median_layer": -median_help, "ratio": ratio}
        ok &= bool(ratio < 0.5)  # NaN (no sparse group) does not hold
        parts.append(f"{d}: most helpful of {', '.join(sparse)} / median layer = {_fmt(ratio)}")
    return measured, bool(ok), "; ".join(parts)


def _last_layers(ev: Evidence):
    measured, ok, parts = {}, True, []
    for d in datasets(ev.paper):
        vals = modules(ev.paper, d)
        best = {}
        for side in ("en", "de"):
            ls = layers(vals, side)
            best[side] = min(ls, key=lambda nv: nv[1])[0]
            ok &= best[side] == ls[-1][0]
        measured[d] = {"encoder_best": f"en_{best['en']}", "decoder_best": f"de_{best['de']}",
                       "layers": {g: v for g, v in vals.items() if re.fullmatch(r"(en|de)_\d+", g)}}
        parts.append(f"{d}: most helpful en_{best['en']}, de_{best['de']}")
    return measured, bool(ok), "; ".join(parts)


def _sandwich(ev: Evidence):
    measured, ok, parts = {}, True, []
    for d in datasets(ev.paper):
        ls = layers(modules(ev.paper, d), "en")
        if len(ls) < 3:
            measured[d] = {"note": f"{len(ls)} encoder layers: no middle layer"}
            ok = False
            parts.append(f"{d}: no middle layer")
            continue
        ends = max(ls[0][1], ls[-1][1])  # the less helpful of the two ends
        middle = min(v for _, v in ls[1:-1])  # the most helpful middle layer
        measured[d] = {f"en_{n}": v for n, v in ls}
        ok &= ends < middle
        parts.append(f"{d}: ends {_fmt(ls[0][1])}, {_fmt(ls[-1][1])} vs best middle "
                     f"{_fmt(middle)}")
    return measured, bool(ok), "; ".join(parts)


def _decoder_rising(ev: Evidence):
    measured, ok, parts = {}, True, []
    for d in datasets(ev.paper):
        ls = layers(modules(ev.paper, d), "de")
        helps = [-v for _, v in ls]
        tau = tau_of([n for n, _ in ls], helps)
        rising = all(b > a for a, b in zip(helps, helps[1:]))
        measured[d] = {"layers": {f"de_{n}": v for n, v in ls}, "tau_layer_help": tau}
        ok &= rising
        parts.append(f"{d}: τ(layer, help) = {_fmt(tau)}")
    return measured, bool(ok), "; ".join(parts)


def _interval_order(ev: Evidence):
    sub = select_grouping(ev.paper, "transformer").sel(dataset="train")
    steps = sub.sizes["step"]
    n = min(ev.window, steps)
    windows = smooth(per_param(sub), n)  # (W, G)
    labels = as_str(windows["group"].values).tolist()
    wins = total_pairs = 0
    for side in ("en", "de"):
        numbers = sorted(int(g[3:]) for g in labels if re.fullmatch(rf"{side}_\d+", g))
        v = windows.values[:, [labels.index(f"{side}_{k}") for k in numbers]]  # (W, L)
        for i in range(v.shape[1]):
            for j in range(i + 1, v.shape[1]):
                wins += int((v[:, j] < v[:, i]).sum())
                total_pairs += v.shape[0]
    frac = wins / total_pairs if total_pairs else float("nan")
    measured = {"fraction": frac, "windows": int(windows.sizes["step"]), "window": n}
    return measured, bool(frac >= 0.75), (f"higher layer lower in {100 * frac:.0f}% of "
                                           f"{total_pairs} (window, layer pair) cases")


def _frequency(ev: Evidence):
    measured, ok, parts = {}, True, []
    for d in datasets(ev.paper):
        sub = total(select_grouping(ev.paper, "frequency")).sel(dataset=d)
        pp = per_param(sub)
        labels = as_str(sub["group"].values).tolist()
        tensors: dict[str, list[tuple[int, int]]] = {}
        for i, g in enumerate(labels):
            if (m := re.fullmatch(r"(.+):f(\d+)", g)):
                tensors.setdefault(m.group(1), []).append((int(m.group(2)), i))
        measured[d] = {}
        for tensor, buckets in tensors.items():
            buckets.sort()
            idx = [i for _, i in buckets]
            vals = sub.values[idx]
            top = max(1, math.ceil(len(idx) / 5))
            net = float(vals.sum())
            share = float(vals[:top].sum()) / net if net < 0 else float("nan")
            tau = tau_of([b for b, _ in buckets], pp.values[idx])
            measured[d][tensor] = {"top_fifth_share": share, "tau_bucket_lca": tau,
                                   "buckets": len(idx)}
            ok &= share >= 0.5
            short = ".".join(tensor.split(".")[:2])
            parts.append(f"{d} {short}: {100 * share:.0f}%" if math.isfinite(share)
                         else f"{d} {short}: raised the loss")
    return measured, bool(ok), "; ".join(parts)


def _train_test(ev: Evidence):
    tr, te = modules(ev.paper, "train"), modules(ev.paper, "test")
    groups = [g for g in tr if g in te]
    tau = tau_of([tr[g] for g in groups], [te[g] for g in groups])
    return {"tau": tau, "groups": len(groups)}, bool(tau >= 0.7), f"τ = {_fmt(tau)}"


def _sampled_exact(ev: Evidence):
    cmp = compare(ev.sim_sampled, ev.sim_exact)
    tau = float(cmp["tau"].sel(grouping_name="transformer", dataset="train"))
    return ({"tau": tau, "groups": int(cmp["n_groups"].sel(grouping_name="transformer"))},
            bool(tau >= 0.8), f"τ = {_fmt(tau)}")


def _error_sources(ev: Evidence):
    out = {}
    for name, a, b in (("sampling", ev.sim_sampled, ev.sim_exact),
                       ("quadrature", ev.sim_exact, ev.sim_quadrature),
                       ("both", ev.sim_sampled, ev.sim_quadrature)):
        tau = float(compare(a, b)["tau"].sel(grouping_name="transformer", dataset="train"))
        out[name] = {"relative_l1": rel_l1(a, b), "tau": tau}
    holds = out["sampling"]["relative_l1"] > out["quadrature"]["relative_l1"]
    return out, bool(holds), (f"sampling {_fmt(out['sampling']['relative_l1'])}, quadrature "
                              f"{_fmt(out['quadrature']['relative_l1'])} (relative L1)")


CLAIMS = (
    Claim("embeddings_softmax_little",
          "The word embeddings of encoder and decoder and the softmax matrix contribute very "
          "little to the loss decrease.",
          "§3.3.1, Fig. 2: sparse embeddings contribute very little; the softmax far less than "
          "the middle layers (IWSLT14 De→En and WMT14 En→De, train and test).",
          "On train and on test, the most helpful of en_emb, de_emb, de_softmax lowers the loss "
          "per parameter by less than half as much as the median encoder/decoder layer "
          "(per-parameter cumulative LCA, Eq. 4): ratio < 0.5.", _sparse_little),
    Claim("last_layers_most",
          "The last encoder layer and the last decoder layer contribute most among their "
          "stack's layers.",
          "Abstract and §1 (the conclusion says the first encoder layer instead).",
          "On train and on test, the last layer has the most negative per-parameter cumulative "
          "LCA among the encoder layers, and the last decoder layer among the decoder layers.",
          _last_layers),
    Claim("encoder_sandwich",
          "Encoder sandwich: the first and the last encoder layers contribute most, the "
          "middle ones less.",
          "§3.3.2, Fig. 3.",
          "On train and on test, both the first and the last encoder layer have a more negative "
          "per-parameter cumulative LCA than every middle encoder layer (needs >= 3 layers).",
          _sandwich),
    Claim("decoder_higher_more",
          "The higher a decoder layer, the more it contributes.",
          "§3.3.2, Fig. 3.",
          "On train and on test, the per-parameter cumulative LCA of de_1 … de_L strictly "
          "decreases (more help) with the layer number.", _decoder_rising),
    Claim("higher_layers_lower_interval",
          "Higher layers have lower (more negative) interval LCA than lower layers at "
          "generally any training interval.",
          "§3.3.2, Fig. 4 (IWSLT14).",
          "On train, per-parameter LCA averaged over windows of 15 updates (Eq. 3; fewer if the "
          "run is shorter): over all windows, both stacks and all layer pairs l < l', layer l' "
          "is lower in at least 75% of the cases.", _interval_order),
    Claim("frequent_words_more",
          "Embedding rows of frequent words contribute far more to the loss decrease than "
          "those of infrequent words.",
          "§3.3.3, Fig. 5: 25 frequency groups; very frequent words occupy most LCA (train and "
          "test).",
          "On train and on test, for every bucketed embedding/softmax tensor (25 buckets of "
          "rows by train-split count), the most frequent fifth of the buckets holds at least "
          "50% of the tensor's cumulative LCA, which must be a decrease.", _frequency),
    Claim("train_test_similar",
          "Modules affect the loss on train and on test alike.",
          "§3.3.2, Fig. 3: 'different neural blocks provide similar effect on loss change on "
          "train as on test'.",
          "Kendall's τ between the transformer modules' per-parameter cumulative LCA on train "
          "and on test is at least 0.7.", _train_test),
    Claim("sampled_exact_tau",
          "LCA from one fresh mini-batch per update ranks the modules like LCA from the "
          "whole training set.",
          "§3.2, Fig. 1: Kendall's τ = 0.905 on a 10K-sentence subset of IWSLT14.",
          "In the simulation, Kendall's τ between the transformer modules' occupation ratios "
          "of the sampled and of the exact replay (both first-order, train) is at least 0.8.",
          _sampled_exact),
    Claim("sampling_error_dominates",
          "Of the approximation's two errors, the mini-batch sampling outweighs the "
          "first-order quadrature (beyond the paper).",
          "Not studied: the paper compares sampled first-order LCA with exact first-order "
          "LCA only.",
          "In the simulation, the relative L1 error of the transformer modules' total LCA on "
          "train from sampling (sampled vs exact, both first-order) exceeds that from the "
          "quadrature (first-order vs Simpson/adaptive, both exact).", _error_sources),
)


def judge(ev: Evidence) -> list[dict]:
    """findings.json's ``claims``: [{id, claim, paper, measured, holds}] in :data:`CLAIMS`
    order (the rule and a one-line summary are in :func:`claims_table`)."""
    ev = Evidence(*(select_done(c).load() for c in (ev.paper, ev.sim_exact, ev.sim_sampled,
                                                     ev.sim_quadrature)), window=ev.window)
    out = []
    for c in CLAIMS:
        measured, holds, summary = c.judge(ev)
        out.append({"id": c.id, "claim": c.claim, "paper": c.paper,
                    "measured": {**measured, "summary": summary}, "holds": holds})
    return out


def claims_table(claims: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The report's findings table: (headers, rows) of strings."""
    rules = {c.id: c.rule for c in CLAIMS}
    rows = [[c["id"], c["claim"], c["paper"], c["measured"]["summary"],
             "holds" if c["holds"] else "does not hold", rules.get(c["id"], "")]
            for c in claims]
    return ["id", "claim", "paper", "measured", "verdict", "rule"], rows
