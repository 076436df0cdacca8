"""The name-based presets on real Hugging Face architectures (tiny configs, never downloaded).

For every tensor of each model, and every alias name of a tied tensor given as a tensor of its
own (how a per-use replay of tied weights presents them), the expected group of each tensor
kind is written out by hand below.
"""

from __future__ import annotations

import math
import re

import pytest

pytest.importorskip("transformers")

from replay.grouping.resolve import resolve_groupings  # noqa: E402
from replay.grouping.presets import layer_labels, sparse_dense_labels, transformer_labels  # noqa: E402
from replay.record.snapshot import model_tensors  # noqa: E402
from tests.helpers_trainers import tiny  # noqa: E402

# (pattern, transformer label, sparse-dense label, layer label); in labels "{s}" is the side
# ("en"/"de") named by the pattern's group "s", "{n}" the layer number + 1 from group "n";
# layer label "stack" = the name up to the layer index, "module" = the name without its last
# component.
SEQ2SEQ_TIED = [
    (r"model\.shared\.weight", "de_emb", "de_sparse", "module"),  # the joint tensor: decoder side
    (r"model\.(?P<s>en|de)coder\.embed_tokens\.weight", "{s}_emb", "{s}_sparse", "module"),
    (r"lm_head\.weight", "de_softmax", "de_sparse", "module"),
    (r"model\.(?P<s>en|de)coder\.layers\.(?P<n>\d)\..*", "{s}_{n}", "{s}_dense", "stack"),
]
LEARNED_POSITIONS = [
    (r"model\.(?P<s>en|de)coder\.embed_positions\.weight", "{s}_emb", "{s}_sparse", "module"),
    (r"model\.(?P<s>en|de)coder\.layernorm_embedding\.(weight|bias)", "other", "{s}_dense",
     "module"),
]
EXPECTED = {
    "marian": SEQ2SEQ_TIED,  # sinusoidal positions: frozen, recorded as state
    "bart": SEQ2SEQ_TIED + LEARNED_POSITIONS,
    "mbart": SEQ2SEQ_TIED + LEARNED_POSITIONS + [
        (r"model\.(?P<s>en|de)coder\.layer_norm\.(weight|bias)", "other", "{s}_dense", "module")],
    "t5": [
        (r"shared\.weight", "de_emb", "de_sparse", "module"),
        (r"(?P<s>en|de)coder\.embed_tokens\.weight", "{s}_emb", "{s}_sparse", "module"),
        (r"lm_head\.weight", "de_softmax", "de_sparse", "module"),
        # the relative position bias sits in block 0 and belongs to it
        (r"(?P<s>en|de)coder\.block\.(?P<n>\d)\..*", "{s}_{n}", "{s}_dense", "stack"),
        (r"(?P<s>en|de)coder\.final_layer_norm\.weight", "other", "{s}_dense", "module"),
    ],
    "gpt2": [
        (r"transformer\.wte\.weight", "de_emb", "de_sparse", "module"),
        (r"transformer\.wpe\.weight", "de_emb", "de_sparse", "module"),
        (r"transformer\.h\.(?P<n>\d)\..*", "de_{n}", "de_dense", "stack"),
        (r"transformer\.ln_f\.(weight|bias)", "other", "other", "module"),
        (r"lm_head\.weight", "de_softmax", "de_sparse", "module"),
    ],
    "llama": [
        (r"model\.embed_tokens\.weight", "de_emb", "de_sparse", "module"),
        (r"model\.layers\.(?P<n>\d)\..*", "de_{n}", "de_dense", "stack"),
        (r"model\.norm\.weight", "other", "other", "module"),
        (r"lm_head\.weight", "de_softmax", "de_sparse", "module"),
    ],
    "bert": [
        (r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight", "en_emb",
         "en_sparse", "module"),
        (r"bert\.embeddings\.LayerNorm\.(weight|bias)", "other", "other", "module"),
        (r"bert\.encoder\.layer\.(?P<n>\d)\..*", "en_{n}", "en_dense", "stack"),
        # the head's hidden layer is not the softmax; its vocabulary projection is
        (r"cls\.predictions\.transform\..*", "other", "other", "module"),
        (r"cls\.predictions\.(bias|decoder\.weight|decoder\.bias)", "de_softmax", "de_sparse",
         "module"),
    ],
}
EXPECTED["llama-tied"] = EXPECTED["llama"]
ALIASES = {
    "marian": {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
               "lm_head.weight"},
    "t5": {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"},
    "gpt2": {"lm_head.weight"}, "llama": set(), "llama-tied": {"lm_head.weight"},
    "bert": {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"},
}
ALIASES["bart"] = ALIASES["mbart"] = ALIASES["marian"]


def _names(arch):
    params, _, aliases = model_tensors(tiny(arch))
    shapes = {n: spec[0] for n, _, spec in params}
    return [n for n, _, _ in params], aliases, shapes


def _expected(table, name):
    hits = [(row, m) for row in table if (m := re.fullmatch(row[0], name))]
    assert len(hits) == 1, f"{name!r} matches {len(hits)} patterns"
    (pattern, tr, sd, layer), m = hits[0]
    fields = {k: v for k, v in m.groupdict().items() if v is not None}
    if "n" in fields:
        fields["n"] = str(int(fields["n"]) + 1)
    if layer == "stack":
        end = m.start("n") + len(m.group("n"))
        layer = name[:end]
    else:
        layer = name.rsplit(".", 1)[0]
    return tr.format(**fields), sd.format(**fields), layer, pattern


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_presets_label_every_tensor_and_every_tied_use_of_real_architectures(arch):
    names, aliases, shapes = _names(arch)
    assert set(aliases) == ALIASES[arch]
    uses = names + list(aliases)  # each use of a tied tensor as a tensor of its own
    tr, sd, layer = transformer_labels(uses), sparse_dense_labels(uses), layer_labels(uses)
    used = set()
    for name in uses:
        want_tr, want_sd, want_layer, pattern = _expected(EXPECTED[arch], name)
        assert (tr[name], sd[name], layer[name]) == (want_tr, want_sd, want_layer), name
        used.add(pattern)
    assert used == {row[0] for row in EXPECTED[arch]}  # no stale row in the table
    # As groupings: partitions of the tensors, the aliases given the shape of their tensor.
    shapes = {**shapes, **{a: shapes[c] for a, c in aliases.items()}}
    for preset in ("transformer", "sparse-dense", "layer"):
        (g,) = resolve_groupings(preset, uses, shapes)
        assert sum(g.sizes) == sum(math.prod(shapes[n]) for n in uses)


def test_the_paper_groups_of_a_tied_seq2seq_model_appear_only_with_its_uses():
    names, aliases, shapes = _names("marian")
    (joint,) = resolve_groupings("transformer", names, shapes)
    assert joint.labels == ("en_1", "en_2", "de_1", "de_2", "de_emb")  # all of it in de_emb
    uses = names + list(aliases)
    (split,) = resolve_groupings("transformer", uses,
                                 {**shapes, **{a: shapes[c] for a, c in aliases.items()}})
    assert split.labels == ("en_emb", "en_1", "en_2", "de_1", "de_2", "de_emb", "de_softmax")
    members = split.members()
    assert members["en_emb"] == ["model.encoder.embed_tokens.weight"]
    assert members["de_emb"] == ["model.shared.weight", "model.decoder.embed_tokens.weight"]
    assert members["de_softmax"] == ["lm_head.weight"]


def test_head_layers_and_final_logits_bias_by_name():
    roberta = transformer_labels(["roberta.encoder.layer.0.output.dense.weight",
                                  "lm_head.dense.weight", "lm_head.layer_norm.weight",
                                  "lm_head.decoder.weight", "lm_head.bias", "final_logits_bias",
                                  "classifier.dense.weight", "classifier.out_proj.weight"])
    assert roberta == {"roberta.encoder.layer.0.output.dense.weight": "en_1",
                       "lm_head.decoder.weight": "de_softmax", "lm_head.bias": "de_softmax",
                       "final_logits_bias": "de_softmax",
                       "classifier.out_proj.weight": "de_softmax",
                       "lm_head.dense.weight": "other", "lm_head.layer_norm.weight": "other",
                       "classifier.dense.weight": "other"}
