"""Name-based presets: which group each parameter tensor belongs to, from its name alone.

Each preset maps recorded parameter names (canonical order) to one label per tensor. The rules
are written for PyTorch naming in general — ``torch.nn.Transformer``, fairseq, HuggingFace
(BERT, GPT-2, T5, BART/Marian, Llama), the Annotated Transformer, ResNets, MLPs — not for one
model. :mod:`replay.grouping.resolve` turns the labels into a
:class:`replay.grouping.partition.Grouping`.

Vocabulary (all matched per dot-separated name component, case-insensitively):

- **layer stack**: a component ``layers|layer|h|block|blocks`` followed by an integer component N
  that is not the last component (``encoder.layers.3.fc1.weight``, ``transformer.h.0.attn…``,
  ``encoder.block.2.layer.0…``); the leftmost such pair counts.
- **side**: the first component equal to ``encoder|enc|src`` (encoder) or ``decoder|dec|tgt``
  (decoder), or starting/ending with one of them plus ``_`` (``src_embed``, ``text_encoder``).
  For a layer parameter only the components before the stack are looked at.
- **softmax**: a component ``output_projection|lm_head|generator|softmax|adaptive_softmax|
  proj_out|classifier|embed_out|final_logits_bias``; ``out_proj`` only directly under a side or
  at the top level (an ``out_proj`` inside ``layers.N`` is attention, and belongs to its layer);
  ``head|cls`` only as the first component. Inside such a head, the hidden layer that some
  heads put before the vocabulary projection (a component ``transform|dense`` or a norm after
  the head's: BERT's ``cls.predictions.transform.*``, RoBERTa's ``lm_head.dense``) is not the
  softmax but a **head layer**, grouped like ``other`` tensors.
- **norm**: a component containing ``norm`` or equal to ``ln``/``ln_*`` (GPT-2 ``ln_f``).
- **embedding**: a component containing ``emb`` (``embed_tokens``, ``word_embeddings``,
  ``embed_positions``, ``pos_embed``) or equal to ``wte|wpe|shared|lut``, unless a norm component
  is present (``layernorm_embedding`` and ``embeddings.LayerNorm`` are norms, hence ``other``).

Side-less layers and embeddings (decoder-only LMs such as GPT-2, or a ``shared`` embedding tied
between encoder and decoder) are put on the *default side*: the encoder if every layer stack in
the model is on the encoder side (encoder-only models such as BERT), else the decoder.

Positions: learned position embeddings (``embed_positions``, GPT-2's ``wpe``, BERT's
``position_embeddings``, and its ``token_type_embeddings``) belong to their side's embedding
group: with the token embedding they are the input layer of that side. Relative position biases
(T5's ``relative_attention_bias``) live inside a layer and belong to it; sinusoidal positions
(Marian, the demo model) are no parameters at all.

Tied weights: a tied tensor is recorded once, under its first name (``model.shared.weight``,
``transformer.wte.weight``); each use of it has an alias name (``model.encoder.embed_tokens.
weight``, ``model.decoder.embed_tokens.weight``, ``lm_head.weight``). Given as tensors of their
own, the uses land where the rules above put them (``en_emb``, ``de_emb``, ``de_softmax``),
since each name says where the tensor is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "PRESETS",
    "layer_labels",
    "sparse_dense_labels",
    "tensor_labels",
    "transformer_labels",
]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.", re.IGNORECASE)
_SIDES = (("en", ("encoder", "enc", "src")), ("de", ("decoder", "dec", "tgt")))
_SOFTMAX = {"output_projection", "lm_head", "generator", "softmax", "adaptive_softmax",
            "proj_out", "classifier", "embed_out", "final_logits_bias"}
_HEAD_LAYER = {"transform", "dense"}
_SOFTMAX_FIRST = {"head", "cls"}
_EMB_EXACT = {"wte", "wpe", "shared", "lut"}


def tensor_labels(names: Sequence[str]) -> dict[str, str]:
    """``tensor``: one group per tensor, labelled by the parameter name."""
    return {n: n for n in names}


def layer_labels(names: Sequence[str]) -> dict[str, str]:
    """``layer``: one group per layer of each stack, labelled by the name up to and including N
    (``encoder.layers.0``); every other tensor grouped by its module, i.e. the name without its
    last component (``decoder.output_projection``); top-level parameters by their own name."""
    out = {}
    for n in names:
        m = _LAYER.search(n)
        out[n] = n[: m.end() - 1] if m else (n.rsplit(".", 1)[0] if "." in n else n)
    return out


def _side(parts: Sequence[str]) -> str | None:
    for p in parts:
        q = p.lower()
        for side, tokens in _SIDES:
            if any(q == t or q.startswith(t + "_") or q.endswith("_" + t) for t in tokens):
                return side
    return None


def _head(parts: Sequence[str]) -> int | None:
    """Index of the component that makes ``parts`` a softmax/output head, or None."""
    low = [p.lower() for p in parts]
    if low[0] in _SOFTMAX_FIRST:
        return 0
    for i, p in enumerate(low):
        # out_proj only directly under a side (decoder.out_proj) or at the top level
        if p in _SOFTMAX or (p == "out_proj" and (i == 0 or _side(parts[i - 1:i]) is not None)):
            return i
    return None


def _is_head_layer(parts: Sequence[str], head: int) -> bool:
    """A hidden layer of the head before its vocabulary projection (BERT's transform)."""
    rest = parts[head + 1:]
    return any(p.lower() in _HEAD_LAYER for p in rest) or _is_norm(rest)


def _is_norm(parts: Sequence[str]) -> bool:
    return any("norm" in p.lower() or re.fullmatch(r"ln(_\w+|\d+)?", p.lower()) for p in parts)


def _is_embedding(parts: Sequence[str]) -> bool:
    return not _is_norm(parts) and any("emb" in p.lower() or p.lower() in _EMB_EXACT
                                       for p in parts)


def _classify(names: Sequence[str]) -> dict[str, tuple[str, str | None, int | None]]:
    """name -> (kind, side, layer index N) with kind in layer|softmax|emb|other and side
    en|de|None (None: the name has no side component)."""
    raw = {}
    for n in names:
        parts = n.split(".")
        m = _LAYER.search(n)
        if m:
            raw[n] = ("layer", _side(n[: m.start()].split(".")), int(m.group(1)))
        elif (head := _head(parts)) is not None:
            kind = "other" if _is_head_layer(parts, head) else "softmax"
            raw[n] = (kind, _side(parts), None)
        elif _is_embedding(parts):
            raw[n] = ("emb", _side(parts), None)
        else:
            raw[n] = ("other", _side(parts), None)
    return raw


def _default_side(raw) -> str:
    stack_sides = {side for kind, side, _ in raw.values() if kind == "layer"}
    return "en" if stack_sides == {"en"} else "de"


def transformer_labels(names: Sequence[str]) -> dict[str, str]:
    """``transformer`` (Zhu et al. §2.3): ``en_emb``, ``en_1…en_L``, ``de_1…de_L``, ``de_emb``,
    ``de_softmax``, ``other``.

    Layer N (0-based in names) of a stack on side s → ``s_{N+1}`` (all stacks of one side share
    the numbering); embeddings → ``s_emb``; any softmax/output projection → ``de_softmax``;
    norms outside layers and everything else → ``other``. Side-less layers and embeddings go to
    the default side (module docstring), so a tied top-level ``shared`` embedding is ``de_emb``.
    Empty groups are omitted.
    """
    raw = _classify(names)
    default = _default_side(raw)
    labels = {}
    for n, (kind, side, idx) in raw.items():
        if kind == "layer":
            labels[n] = f"{side or default}_{idx + 1}"
        elif kind == "softmax":
            labels[n] = "de_softmax"
        elif kind == "emb":
            labels[n] = f"{side or default}_emb"
        else:
            labels[n] = "other"
    return _ordered(labels, _transformer_order)


def _transformer_order(label: str) -> tuple:
    fixed = {"en_emb": (0, 0), "de_emb": (3, 0), "de_softmax": (4, 0), "other": (5, 0)}
    if label in fixed:
        return fixed[label]
    side, idx = label.split("_")
    return (1 if side == "en" else 2, int(idx))


def sparse_dense_labels(names: Sequence[str]) -> dict[str, str]:
    """``sparse-dense``: ``en_sparse`` (encoder embeddings), ``en_dense`` (encoder layers and any
    other encoder-side tensor, e.g. the stack's final norm), ``de_sparse`` (decoder embeddings and
    the softmax/output projection), ``de_dense`` (decoder layers and other decoder-side tensors),
    ``other`` (tensors with no side, such as a side-less final norm). Side-less layers and
    embeddings go to the default side exactly as in ``transformer``. Empty groups are omitted."""
    raw = _classify(names)
    default = _default_side(raw)
    labels = {}
    for n, (kind, side, _) in raw.items():
        if kind == "softmax":
            labels[n] = "de_sparse"
        elif kind == "emb":
            labels[n] = f"{side or default}_sparse"
        elif kind == "layer":
            labels[n] = f"{side or default}_dense"
        else:
            labels[n] = f"{side}_dense" if side else "other"
    order = ["en_sparse", "en_dense", "de_sparse", "de_dense", "other"]
    return _ordered(labels, order.index)


def _ordered(labels: dict[str, str], key) -> dict[str, str]:
    # Tensors keep canonical order; the caller numbers labels by first appearance, so reorder the
    # mapping by label rank (stable, hence canonical order within a label).
    return dict(sorted(labels.items(), key=lambda item: key(item[1])))


PRESETS = {
    "tensor": tensor_labels,
    "layer": layer_labels,
    "transformer": transformer_labels,
    "sparse-dense": sparse_dense_labels,
}
