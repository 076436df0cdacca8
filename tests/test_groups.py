"""Groupings: presets on several naming conventions, user rules, frequency buckets, partitions."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from replay.errors import GroupingError
from replay.grouping.frequency import frequency_buckets
from replay.grouping.partition import Grouping, check_partition
from replay.grouping.resolve import resolve_groupings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
V, D, F = 30, 8, 16  # vocabulary, model width, feed-forward width of the demo naming


def demo(layers: int = 2, norms: bool = True) -> dict[str, tuple[int, ...]]:
    """The toy_nmt naming: name -> shape, in canonical (named_parameters) order."""
    shapes: dict[str, tuple[int, ...]] = {"encoder.embed_tokens.weight": (V, D)}
    for i in range(layers):
        p = f"encoder.layers.{i}."
        shapes |= {p + "self_attn.in_proj_weight": (3 * D, D),
                   p + "self_attn.out_proj.weight": (D, D),
                   p + "linear1.weight": (F, D), p + "linear1.bias": (F,),
                   p + "norm1.weight": (D,)}
    if norms:
        shapes["encoder.layer_norm.weight"] = (D,)
    shapes["decoder.embed_tokens.weight"] = (V, D)
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes |= {p + "self_attn.in_proj_weight": (3 * D, D),
                   p + "multihead_attn.out_proj.weight": (D, D),
                   p + "linear2.weight": (D, F), p + "norm3.bias": (D,)}
    if norms:
        shapes["decoder.layer_norm.weight"] = (D,)
    shapes["decoder.output_projection.weight"] = (V, D)
    return shapes


def resolve(spec, shapes, **kw) -> Grouping:
    (grouping,) = resolve_groupings(spec, list(shapes), shapes, **kw)
    return grouping


def assignment(g: Grouping) -> dict[str, str]:
    return {name: g.labels[i] for name, i in g.tensor_group.items()}


def total(shapes) -> int:
    return sum(int(np.prod(s)) for s in shapes.values())


def torch_transformer_shapes() -> dict[str, tuple[int, ...]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor notice from torch, irrelevant here
        model = torch.nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2,
                                     num_decoder_layers=2, dim_feedforward=16)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def named(*names: str) -> dict[str, tuple[int, ...]]:
    return {n: (4, 2) for n in names}


# ---------------------------------------------------------------- presets on the demo naming

def test_tensor_preset_one_group_per_tensor():
    shapes = demo()
    g = resolve("tensor", shapes)
    assert g.labels == tuple(shapes)
    assert g.sizes.tolist() == [int(np.prod(s)) for s in shapes.values()]
    assert g.sizes.dtype == np.int64
    assert g.qualified_labels()[0] == "tensor/encoder.embed_tokens.weight"


def test_layer_preset_demo():
    g = resolve("layer", demo())
    assert g.labels == ("encoder.embed_tokens", "encoder.layers.0", "encoder.layers.1",
                        "encoder.layer_norm", "decoder.embed_tokens", "decoder.layers.0",
                        "decoder.layers.1", "decoder.layer_norm", "decoder.output_projection")
    assert assignment(g)["decoder.layers.1.multihead_attn.out_proj.weight"] == "decoder.layers.1"


def test_transformer_preset_demo_exact_labels():
    shapes = demo(layers=3, norms=False)
    g = resolve("transformer", shapes)
    assert g.labels == ("en_emb", "en_1", "en_2", "en_3", "de_1", "de_2", "de_3", "de_emb",
                        "de_softmax")
    a = assignment(g)
    # attention out_proj inside a layer is the layer, not the softmax
    assert a["encoder.layers.2.self_attn.out_proj.weight"] == "en_3"
    assert a["decoder.layers.0.multihead_attn.out_proj.weight"] == "de_1"
    assert a["decoder.output_projection.weight"] == "de_softmax"
    assert g.sizes[g.labels.index("en_emb")] == V * D
    assert g.sizes.sum() == total(shapes)


def test_transformer_preset_demo_with_stack_norms_adds_other():
    g = resolve("transformer", demo())
    assert g.labels == ("en_emb", "en_1", "en_2", "de_1", "de_2", "de_emb", "de_softmax",
                        "other")
    assert g.members()["other"] == ["encoder.layer_norm.weight", "decoder.layer_norm.weight"]
    assert g.sizes[-1] == 2 * D


def test_sparse_dense_preset_demo():
    shapes = demo()
    g = resolve("sparse-dense", shapes)
    assert g.labels == ("en_sparse", "en_dense", "de_sparse", "de_dense")
    m = g.members()
    assert m["en_sparse"] == ["encoder.embed_tokens.weight"]
    assert m["de_sparse"] == ["decoder.embed_tokens.weight", "decoder.output_projection.weight"]
    assert "encoder.layer_norm.weight" in m["en_dense"]
    assert g.sizes.tolist() == [V * D, sum(int(np.prod(shapes[n])) for n in m["en_dense"]),
                                2 * V * D, sum(int(np.prod(shapes[n])) for n in m["de_dense"])]


# ---------------------------------------------------------------- torch.nn.Transformer names

def test_presets_on_torch_nn_transformer():
    shapes = torch_transformer_shapes()
    t = resolve("transformer", shapes)
    assert t.labels == ("en_1", "en_2", "de_1", "de_2", "other")
    assert assignment(t)["decoder.layers.1.multihead_attn.out_proj.weight"] == "de_2"
    assert t.members()["other"] == ["encoder.norm.weight", "encoder.norm.bias",
                                    "decoder.norm.weight", "decoder.norm.bias"]
    layer = resolve("layer", shapes)
    assert layer.labels == ("encoder.layers.0", "encoder.layers.1", "encoder.norm",
                            "decoder.layers.0", "decoder.layers.1", "decoder.norm")
    sd = resolve("sparse-dense", shapes)
    assert sd.labels == ("en_dense", "de_dense")
    for g in (t, layer, sd):
        assert g.sizes.sum() == total(shapes)


# ---------------------------------------------------------------- HuggingFace / fairseq names

MARIAN = ["model.shared.weight", "model.encoder.embed_positions.weight",
          "model.encoder.layers.0.self_attn.k_proj.weight",
          "model.encoder.layers.0.self_attn.out_proj.weight",
          "model.encoder.layers.1.fc1.weight", "model.encoder.layernorm_embedding.weight",
          "model.decoder.embed_positions.weight",
          "model.decoder.layers.0.encoder_attn.out_proj.weight",
          "model.decoder.layers.1.final_layer_norm.bias", "lm_head.weight"]


def test_transformer_preset_hf_marian():
    g = resolve("transformer", named(*MARIAN))
    assert assignment(g) == {
        "model.shared.weight": "de_emb",  # tied between sides: decoder embedding
        "model.encoder.embed_positions.weight": "en_emb",
        "model.encoder.layers.0.self_attn.k_proj.weight": "en_1",
        "model.encoder.layers.0.self_attn.out_proj.weight": "en_1",
        "model.encoder.layers.1.fc1.weight": "en_2",
        "model.encoder.layernorm_embedding.weight": "other",
        "model.decoder.embed_positions.weight": "de_emb",
        "model.decoder.layers.0.encoder_attn.out_proj.weight": "de_1",
        "model.decoder.layers.1.final_layer_norm.bias": "de_2",
        "lm_head.weight": "de_softmax"}
    assert g.labels == ("en_emb", "en_1", "en_2", "de_1", "de_2", "de_emb", "de_softmax",
                        "other")
    sd = assignment(resolve("sparse-dense", named(*MARIAN)))
    assert sd["model.shared.weight"] == "de_sparse"
    assert sd["model.encoder.layernorm_embedding.weight"] == "en_dense"
    assert sd["lm_head.weight"] == "de_sparse"


def test_presets_hf_t5_gpt2_bert_fairseq():
    t5 = assignment(resolve("transformer", named(
        "shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.1.layer.1.DenseReluDense.wi.weight", "encoder.final_layer_norm.weight",
        "decoder.block.0.layer.1.EncDecAttention.o.weight", "lm_head.weight")))
    assert list(t5.values()) == ["de_emb", "en_1", "en_2", "other", "de_1", "de_softmax"]
    gpt2 = assignment(resolve("transformer", named(
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
        "transformer.h.11.mlp.c_proj.bias", "transformer.ln_f.weight", "lm_head.weight")))
    assert list(gpt2.values()) == ["de_emb", "de_emb", "de_1", "de_12", "other", "de_softmax"]
    bert = assignment(resolve("transformer", named(
        "bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.output.LayerNorm.bias", "bert.pooler.dense.weight",
        "classifier.weight")))
    assert list(bert.values()) == ["en_emb", "other", "en_1", "en_2", "other", "de_softmax"]
    fairseq = assignment(resolve("transformer", named(
        "encoder.embed_tokens.weight", "encoder.layers.0.self_attn.out_proj.weight",
        "decoder.embed_out", "decoder.out_proj.weight")))
    assert list(fairseq.values()) == ["en_emb", "en_1", "de_softmax", "de_softmax"]
    layer = resolve("layer", named("transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight",
                                   "encoder.block.0.layer.1.wi.weight", "lm_head.weight", "bias"))
    assert layer.labels == ("transformer.h.0", "transformer.ln_f", "encoder.block.0", "lm_head",
                            "bias")


# ---------------------------------------------------------------- frequency buckets

def test_frequency_buckets_rank_ties_and_sizes():
    counts = np.array([5, 9, 9, 0, 1, 7, 3])
    seg = frequency_buckets(counts, 3)
    # rank order: rows 1, 2 (tie, by index), 5, 0, 6, 4, 3 -> sizes 3, 2, 2
    assert seg.tolist() == [1, 0, 0, 2, 2, 0, 1]
    assert np.bincount(seg).tolist() == [3, 2, 2]


def test_frequency_preset_labels_sizes_and_rest():
    shapes = demo()
    rng = np.random.default_rng(0)
    counts = {"encoder.embed_tokens.weight": torch.tensor(rng.integers(0, 50, V)),
              "decoder.embed_tokens.weight": rng.integers(0, 50, V)}
    g = resolve("frequency:10", shapes, token_counts=counts)
    assert g.name == "frequency"
    assert g.labels[:2] == ("encoder.embed_tokens.weight:f01", "encoder.embed_tokens.weight:f02")
    assert len(g.labels) == 21 and g.labels[-1] == "rest"
    assert g.sizes[:20].tolist() == [3 * D] * 20
    seg = g.row_groups["encoder.embed_tokens.weight"]
    c = counts["encoder.embed_tokens.weight"].numpy()
    assert c[seg == 0].min() >= c[seg == 1].max()  # bucket 1 holds the most frequent rows
    assert g.members()["rest"][-1] == "decoder.output_projection.weight"
    default = resolve({"preset": "frequency", "name": "freq"}, demo(),
                      token_counts={"encoder.embed_tokens.weight": np.arange(V)})
    assert default.name == "freq" and default.labels[24] == "encoder.embed_tokens.weight:f25"


def test_frequency_without_token_counts_is_an_error():
    with pytest.raises(GroupingError, match=re.escape(
            "grouping 'frequency' needs per-row token frequencies, but the task provides none; "
            "implement Task.token_counts() returning {parameter name: 1-D tensor of counts per "
            "row}")):
        resolve("frequency", demo(), token_counts=None)


def test_frequency_counts_errors_and_aliases():
    with pytest.raises(GroupingError, match=r"token counts for 'encoder.embed_tokens.weight' "
                                            r"have shape \(29,\), but the tensor has 30 rows"):
        resolve("frequency:5", demo(), token_counts={"encoder.embed_tokens.weight": np.ones(29)})
    with pytest.raises(GroupingError, match=r"Task.token_counts\(\) names 'tied.weight', which "
                                            "is not a recorded parameter"):
        resolve("frequency:5", demo(), token_counts={"tied.weight": np.ones(V)})
    g = resolve("frequency:5", demo(), token_counts={"tied.weight": np.ones(V)},
                aliases={"tied.weight": "decoder.embed_tokens.weight"})
    assert "decoder.embed_tokens.weight" in g.row_groups
    with pytest.raises(GroupingError, match="has 30 rows, fewer than 40 buckets; ask for fewer "
                                            r"\(e.g. frequency:30\)"):
        resolve("frequency:40", demo(), token_counts={"decoder.embed_tokens.weight": np.ones(V)})
    with pytest.raises(GroupingError, match="frequency buckets must be a positive integer, "
                                            "not '0'"):
        resolve("frequency:0", demo(), token_counts={"decoder.embed_tokens.weight": np.ones(V)})


# ---------------------------------------------------------------- user rules

RULES = {"name": "mine",
         "groups": [{"name": "layer_{1+1}", "match": r"^(?:en|de)coder\.layers\.(\d+)\."},
                    {"name": "{side}_emb", "match": r"^(?P<side>\w+)\.embed_tokens\."},
                    {"name": "never", "match": r"no-such-tensor"}],
         "default": "rest"}


def test_user_rules_captures_order_default_and_unused():
    g = resolve(RULES, demo())
    assert g.labels == ("encoder_emb", "layer_1", "layer_2", "rest", "decoder_emb")
    assert assignment(g)["decoder.layers.1.norm3.bias"] == "layer_2"  # shared label, one group
    assert g.unused_rules == ("no-such-tensor",)
    assert g.qualified_labels()[1] == "mine/layer_1"


def test_user_rules_unassigned_tensors_named():
    rules = {"name": "mine", "groups": [{"name": "layers", "match": r"\.layers\."}]}
    with pytest.raises(GroupingError, match=re.escape(
            "grouping 'mine' leaves 5 tensors unassigned: encoder.embed_tokens.weight, "
            "encoder.layer_norm.weight, decoder.embed_tokens.weight, decoder.layer_norm.weight, "
            "decoder.output_projection.weight; add a rule or a `default:` group")):
        resolve(rules, demo())


def test_user_rules_row_and_whole_overlap_rejected():
    rules = {"name": "mine", "groups": [{"name": "emb", "match": "embed"}],
             "rows": [{"match": "embed_tokens", "buckets": 2, "by": "index"}], "default": "rest"}
    with pytest.raises(GroupingError, match=re.escape(
            "grouping 'mine': tensor 'encoder.embed_tokens.weight' is matched by groups rule 1 "
            "('embed') and rows rule 1 ('embed_tokens'); a tensor must be matched by a group "
            "rule or a row rule, not both")):
        resolve(rules, demo())


def test_user_rules_validation_messages():
    bad_regex = {"name": "mine", "groups": [{"name": "x", "match": "layers.("}]}
    with pytest.raises(GroupingError, match=r"groups rule 1 \('layers.\('\) has an invalid regex"):
        resolve(bad_regex, demo())
    bad_capture = {"name": "mine", "groups": [{"name": "l{2}", "match": r"layers\.(\d+)"}]}
    with pytest.raises(GroupingError, match=r"label 'l\{2\}' uses \{2\}, but the regex has 1 "
                                            r"capture group\(s\)"):
        resolve(bad_capture, demo())
    with pytest.raises(GroupingError, match=r"unknown key\(s\) \['regex'\]; valid keys: name, "
                                            "match"):
        resolve({"name": "mine", "groups": [{"name": "x", "regex": "."}]}, demo())
    with pytest.raises(GroupingError, match=r"unknown key\(s\) \['group'\] in grouping; valid "
                                            "keys: name, groups, rows, default"):
        resolve({"name": "mine", "group": []}, demo())
    with pytest.raises(GroupingError, match="invalid group label in grouping 'mine' 'a/b'"):
        resolve({"name": "mine", "default": "a/b"}, demo())
    with pytest.raises(GroupingError, match=r"capture \{1\} of tensor "
                                            "'encoder.embed_tokens.weight' is 'encoder', not an "
                                            "integer"):
        resolve({"name": "mine", "groups": [{"name": "{1+1}", "match": r"^(\w+)"}]}, demo())


def test_user_rows_by_frequency_share_labels_and_need_counts():
    rules = {"name": "emb", "rows": [{"match": r"embed_tokens", "buckets": 3, "name": "emb"}],
             "default": "rest"}
    counts = {"encoder.embed_tokens.weight": np.arange(V),
              "decoder.embed_tokens.weight": np.arange(V)[::-1]}
    g = resolve(rules, demo(), token_counts=counts)
    assert g.labels == ("emb:f01", "emb:f02", "emb:f03", "rest")
    assert g.sizes[:3].tolist() == [2 * 10 * D] * 3  # both matrices' buckets merged
    assert g.row_groups["encoder.embed_tokens.weight"][-1] == 0  # most frequent row
    assert g.row_groups["decoder.embed_tokens.weight"][0] == 0
    with pytest.raises(GroupingError, match=r"rows rule 1 \('embed_tokens'\) buckets rows by "
                                            "frequency, but the task provides no token counts"):
        resolve(rules, demo())


def test_yaml_file_list_and_unique_names(tmp_path):
    path = tmp_path / "groups.yaml"
    path.write_text("- transformer\n- {preset: layer, name: layers}\n"
                    "- name: mine\n  default: everything\n")
    gs = resolve_groupings(str(path), list(demo()), demo())
    assert [g.name for g in gs] == ["transformer", "layers", "mine"]
    assert gs[2].labels == ("everything",)
    with pytest.raises(GroupingError, match="two groupings are named 'tensor'; give each a "
                                            "unique name"):
        resolve_groupings(["tensor", "tensor"], list(demo()), demo())
    with pytest.raises(GroupingError, match=r"unknown grouping 'transformers' in grouping spec; "
                                            r"use a preset \(tensor, layer"):
        resolve_groupings("transformers", list(demo()), demo())
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(GroupingError, match=re.escape("bad.yaml' is not valid YAML")):
        resolve_groupings(tmp_path / "bad.yaml", list(demo()), demo())


def test_example_config_is_a_partition_of_the_demo():
    counts = {"encoder.embed_tokens.weight": np.arange(V),
              "decoder.embed_tokens.weight": np.arange(V)}
    g = resolve(str(CONFIGS / "groups-example.yaml"), demo(), token_counts=counts)
    assert g.name == "blocks"
    assert g.labels[:3] == ("encoder_emb:f01", "encoder_emb:f02", "encoder_emb:f03")
    assert {"enc_attn_1", "enc_ffn_2", "dec_1", "softmax", "rest"} <= set(g.labels)
    assert g.unused_rules == ()
    assert g.sizes.sum() == total(demo())


# ---------------------------------------------------------------- partition checks

def test_check_partition_rejects_malformed_groupings():
    shapes = {"a": (3, 2), "b": (4,)}
    ok = Grouping("g", ("x", "y"), {"b": 0}, {"a": np.array([0, 1, 1], np.int32)},
                  np.array([6, 4]))
    check_partition(ok, list(shapes), shapes)
    both = Grouping("g", ("x",), {"a": 0, "b": 0}, {"a": np.zeros(3, np.int32)}, np.array([10]))
    with pytest.raises(GroupingError, match="grouping 'g' assigns a both whole and by rows"):
        check_partition(both, list(shapes), shapes)
    short = Grouping("g", ("x",), {"b": 0}, {"a": np.zeros(2, np.int32)}, np.array([10]))
    with pytest.raises(GroupingError, match=r"malformed row assignment for 'a' \(shape \(3, 2\)\)"):
        check_partition(short, list(shapes), shapes)
    wrong_size = Grouping("g", ("x",), {"a": 0, "b": 0}, {}, np.array([9]))
    with pytest.raises(GroupingError, match="group sizes summing to 9, not to the 10 recorded"):
        check_partition(wrong_size, list(shapes), shapes)


def test_fingerprint_tracks_assignment():
    a = resolve("transformer", demo())
    assert a.fingerprint() == resolve("transformer", demo()).fingerprint()
    assert a.fingerprint() != resolve("sparse-dense", demo()).fingerprint()


_PARTS = ["encoder", "decoder", "model", "layers", "h", "block", "0", "1", "11", "embed_tokens",
          "shared", "out_proj", "lm_head", "norm", "ln_f", "fc1", "self_attn", "wte", "src_embed"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_PARTS), min_size=0, max_size=5), min_size=1,
                max_size=12))
def test_presets_partition_arbitrary_names(paths):
    names = list(dict.fromkeys(".".join([*p, "weight"]) for p in paths))
    shapes = {n: (i % 3 + 1, 2) for i, n in enumerate(names)}
    counts = {names[0]: np.arange(shapes[names[0]][0])}
    groupings = resolve_groupings(["tensor", "layer", "transformer", "sparse-dense",
                                   "frequency:1"], names, shapes, token_counts=counts)
    for g in groupings:
        assert g.sizes.sum() == total(shapes) and (g.sizes > 0).all()
        assert set(g.tensor_group) | set(g.row_groups) == set(names)
