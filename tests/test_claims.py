"""The claim rules of analysis/claims.py on hand-built cubes whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analysis.claims import CLAIMS, Evidence, claims_table, judge
from tests.paper_cubes import BUCKETS, module_cube, paper_like

PAPER_IDS = ["embeddings_softmax_little", "last_layers_most", "encoder_sandwich",
             "decoder_higher_more", "higher_layers_lower_interval", "frequent_words_more",
             "train_test_similar", "sampled_exact_tau"]
FREQUENT = [1.0 / b for b in range(1, BUCKETS + 1)]  # top fifth: 2.28 / 3.82 = 60 % of the LCA


def by_id(claims):
    return {c["id"]: c for c in claims}


def evidence(paper, exact=None, sampled=None, quadrature=None):
    exact = exact if exact is not None else module_cube(paper_like(), datasets=("train",))
    return Evidence(paper, exact, sampled if sampled is not None else exact,
                    quadrature if quadrature is not None else exact)


def test_every_claim_of_the_issue_is_judged_with_a_rule():
    ids = [c.id for c in CLAIMS]
    assert ids[:8] == PAPER_IDS and len(set(ids)) == len(ids)
    assert all(c.rule and c.paper and c.claim for c in CLAIMS)


def test_a_cube_shaped_like_the_paper_satisfies_the_papers_claims():
    paper = module_cube(paper_like(), bucket_rates=FREQUENT, scale={"train": 1.0, "test": 0.7})
    sampled = module_cube(paper_like(), datasets=("train",), noise=0.02, seed=3)
    claims = judge(evidence(paper, sampled=sampled))
    got = by_id(claims)
    assert [c["id"] for c in claims] == [c.id for c in CLAIMS]
    assert {i: got[i]["holds"] for i in PAPER_IDS} == {i: True for i in PAPER_IDS}
    # the numbers behind the verdicts, computed by hand from the rates
    ratio = got["embeddings_softmax_little"]["measured"]["train"]["ratio"]
    assert ratio == pytest.approx(0.2 / 2.75)  # de_softmax vs the median layer rate
    assert got["last_layers_most"]["measured"]["test"]["encoder_best"] == "en_3"
    share = got["frequent_words_more"]["measured"]["train"]["encoder.embed_tokens.weight"]
    assert share["top_fifth_share"] == pytest.approx(sum(FREQUENT[:5]) / sum(FREQUENT))
    assert share["tau_bucket_lca"] == pytest.approx(1.0)
    # the encoder pair (en_1, en_2) goes the other way in both windows: 10 of 12 cases
    interval = got["higher_layers_lower_interval"]["measured"]
    assert interval["fraction"] == pytest.approx(10 / 12) and interval["windows"] == 2
    assert got["train_test_similar"]["measured"]["tau"] == pytest.approx(1.0)
    assert got["sampled_exact_tau"]["measured"]["tau"] > 0.95  # en_emb, de_emb tie in exact
    headers, rows = claims_table(claims)
    assert headers[-2:] == ["verdict", "rule"] and rows[0][4] == "holds"


def test_a_cube_against_the_paper_fails_its_claims():
    against = {"en_emb": -9.0, "de_emb": -8.0, "de_softmax": -7.0, "other": -0.5,
               "en_1": -5.0, "en_2": -3.0, "en_3": -1.0, "de_1": -5.0, "de_2": -3.0,
               "de_3": -1.0}
    reversed_test = {**{g: -v for g, v in against.items()}, "other": -0.5}
    reversed_test = {g: v - 10.0 for g, v in reversed_test.items()}  # all help, order reversed
    paper = xr.concat([module_cube(against, datasets=("train",)),
                       module_cube(reversed_test, datasets=("test",))], "dataset",
                      data_vars="minimal")
    got = by_id(judge(evidence(paper)))
    for claim in ("embeddings_softmax_little", "last_layers_most", "encoder_sandwich",
                  "decoder_higher_more", "higher_layers_lower_interval", "frequent_words_more",
                  "train_test_similar"):
        assert got[claim]["holds"] is False, claim
    assert got["embeddings_softmax_little"]["measured"]["train"]["ratio"] > 1
    assert got["higher_layers_lower_interval"]["measured"]["fraction"] == 0.0
    assert got["train_test_similar"]["measured"]["tau"] < 0
    share = got["frequent_words_more"]["measured"]["test"]["decoder.embed_tokens.weight"]
    assert share["top_fifth_share"] == pytest.approx(0.2)  # uniform buckets


def test_sampled_exact_tau_and_the_error_split_are_decided_by_the_simulation():
    paper = module_cube(paper_like(), bucket_rates=FREQUENT)
    exact = module_cube(paper_like(), datasets=("train",))
    rates = dict(paper_like())
    shuffled = dict(zip(rates, np.random.default_rng(0).permutation(list(rates.values()))))
    noisy = module_cube(shuffled, datasets=("train",))
    close = module_cube({g: v * 1.01 for g, v in paper_like().items()}, datasets=("train",))
    bad = by_id(judge(evidence(paper, exact=exact, sampled=noisy, quadrature=close)))
    assert bad["sampled_exact_tau"]["holds"] is False
    assert bad["sampled_exact_tau"]["measured"]["tau"] < 0.8
    split = bad["sampling_error_dominates"]
    assert split["holds"] is True
    assert split["measured"]["quadrature"]["relative_l1"] == pytest.approx(0.01 / 1.01)
    good = by_id(judge(evidence(paper, exact=exact, sampled=close, quadrature=noisy)))
    assert good["sampled_exact_tau"]["holds"] is True
    assert good["sampling_error_dominates"]["holds"] is False
