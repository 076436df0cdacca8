"""The built-in task for Hugging Face language models: ``replay.tasks.hf:HFTask``.

:class:`replay.integrations.hf.LCACallback` stores it (with ``data=``) together with the
model's config, so that ``lca replay TRAJ --trust-task`` replays a ``Trainer`` run without a
Task written by the user. Nothing is downloaded: the config class comes from transformers'
own table (``model_type`` → class, :func:`rebuild_config`), the model from
``ModelClass._from_config`` with random values that the replay overwrites, the data from folders
written by ``datasets.Dataset.save_to_disk``.

The loss is the model's own, as (sum, count) over the label tokens, so that Σ sum / Σ count
over any batching is the mean that the model (or the Trainer's label smoother) computes on
one batch holding all the items:

- ``seq2seq`` (encoder–decoder LMs: Marian, BART, T5 …): logits at every decoder position
  against ``labels``; the decoder input is ``labels`` shifted right, as the model makes it.
- ``causal`` (GPT-2, Llama …): logits at position i against ``labels[i + 1]``.
- ``masked`` (BERT-style masked LMs): logits at position i against ``labels[i]``.

Labels ``-100`` are ignored; ``label_smoothing`` ε gives each token
(1-ε)·(-log p_y) + ε·mean_v(-log p_v), which is both ``torch``'s and the Trainer's
``label_smoothing_factor``. Half-precision logits are taken to float32 first, as the model's
loss does; float64 logits (a float64 replay) stay float64.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from replay.errors import TaskError

__all__ = ["HFTask", "LOSSES", "PAD_VALUES", "embedding_uses", "load_split", "rebuild_config",
           "resolve_model_class"]

LOSSES = ("seq2seq", "causal", "masked")
IGNORE = -100
# How each column the model takes is padded (None: the pad token of the config); a batch then
# gives every item the loss it has alone: padded positions are masked or ignored.
PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "position_ids": 0,
              "labels": IGNORE, "decoder_input_ids": None, "decoder_attention_mask": 0}


def rebuild_config(config: Mapping[str, Any]):
    """A ``PretrainedConfig`` from its ``to_dict()``, by transformers' own ``model_type`` table.

    TaskError (one line) for a config that cannot be rebuilt so: no or an unknown
    ``model_type`` (a model defined outside transformers), or code to fetch (``auto_map``).
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    fix = "pass task= with a Task that builds the model (see replay.Task)"
    if config.get("auto_map") if isinstance(config, Mapping) else False:
        raise TaskError(f"the model's config (model_type {model_type!r}) needs code from the "
                        f"Hugging Face Hub (auto_map), so it cannot be rebuilt offline; {fix}")
    if not model_type or model_type not in CONFIG_MAPPING:
        raise TaskError(f"the model's config has model_type {model_type!r}, which transformers "
                        f"does not know, so it cannot be rebuilt offline; {fix}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as err:  # transformers validates configs with assorted error types
        raise TaskError(f"the stored {model_type!r} config cannot be rebuilt ({err}); {fix}") \
            from None


def resolve_model_class(name: str):
    """The transformers model class called ``name`` (e.g. ``"MarianMTModel"``)."""
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise TaskError(f"model class {name!r} is not a transformers model class, so it cannot be "
                        "rebuilt offline; pass task= with a Task that builds the model "
                        "(see replay.Task)")
    return cls


def load_split(name: str, path: str):
    """The ``datasets.Dataset`` saved at ``path`` (split ``name``); one-line TaskError if not one."""
    import datasets

    where = f"data[{name!r}] = {os.fspath(path)!r}"
    fix = "save each split with datasets.Dataset.save_to_disk(path) and pass that folder"
    if not os.path.isdir(path):
        raise TaskError(f"{where}: no such folder; {fix}")
    try:
        ds = datasets.load_from_disk(os.fspath(path))
    except FileNotFoundError:
        raise TaskError(f"{where} is not a dataset saved with datasets.Dataset.save_to_disk; "
                        f"{fix}") from None
    except Exception as err:  # a damaged arrow file, a wrong version …
        raise TaskError(f"{where}: cannot be loaded as a dataset ({err}); {fix}") from None
    if isinstance(ds, datasets.DatasetDict):
        first = next(iter(ds), "train")
        raise TaskError(f"{where} holds a DatasetDict (splits {', '.join(ds)}), not one split; "
                        f"pass one folder per split, e.g. {{{first!r}: '{path}/{first}'}}")
    if "input_ids" not in ds.column_names:
        raise TaskError(f"{where} has no column 'input_ids' (columns: "
                        f"{', '.join(ds.column_names)}); give the columns the model takes, "
                        "tokenized")
    return ds


class HFTask:
    """Replays a Hugging Face LM trained on saved ``datasets`` splits (see the module docstring).

    config: the model's ``config.to_dict()``; model_class: its transformers class name;
    data: split name -> ``save_to_disk`` folder; loss: one of :data:`LOSSES`;
    label_smoothing: the Trainer's ``label_smoothing_factor``; attn_implementation: the
    attention kernel trained with (``"eager"``, ``"sdpa"`` …); eval_batch_size: items per replay
    batch (the engine's default when None).
    """

    def __init__(self, config: Mapping[str, Any], model_class: str, data: Mapping[str, str],
                 loss: str, label_smoothing: float = 0.0, attn_implementation: str | None = None,
                 eval_batch_size: int | None = None):
        try:
            import datasets  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as err:
            raise TaskError(f"the built-in task {__name__}:HFTask needs transformers and datasets "
                            f"({err}); install them with pip install 'lca-replay[hf]'") from None
        if loss not in LOSSES:
            raise TaskError(f"HFTask loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise TaskError(f"HFTask label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not isinstance(data, Mapping) or not data or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise TaskError("HFTask data must map split names to dataset folders, got "
                            f"{data!r}")
        self.config = rebuild_config(config)
        self.model_class = model_class
        self._cls = resolve_model_class(model_class)
        self.loss_kind, self.label_smoothing = loss, float(label_smoothing)
        self.attn_implementation = attn_implementation
        if eval_batch_size is not None:
            self.eval_batch_size = int(eval_batch_size)
        self.data = dict(data)
        self._splits: dict | None = None
        self._inputs = _forward_inputs(self._cls)
        self.pad_token_id = _pad_id(self.config)

    # ------------------------------------------------------------------ the Task protocol
    def build_model(self) -> torch.nn.Module:
        """A fresh model of the recorded class and config (random values, overwritten)."""
        kwargs = {}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return self._cls._from_config(self.config, **kwargs)

    def datasets(self) -> dict[str, Any]:
        """Split name -> ``datasets.Dataset`` (items: dicts of token id lists)."""
        if self._splits is None:
            splits = {name: load_split(name, path) for name, path in self.data.items()}
            for name, ds in splits.items():
                self._check_columns(name, ds.column_names)
            self._splits = splits
        return self._splits

    def collate(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Items -> a batch: each column the model takes, padded on the right to the longest item
        ((B, T) int64); an ``attention_mask`` where the items have none; causal LMs without
        ``labels`` predict their ``input_ids``."""
        first = items[0]
        batch = {}
        for key in first:
            if key not in self._inputs:
                continue  # as the Trainer's remove_unused_columns
            pad = PAD_VALUES[key] if PAD_VALUES[key] is not None else self.pad_token_id
            batch[key] = _pad([item[key] for item in items], pad)
        if "attention_mask" not in batch:
            batch["attention_mask"] = _pad([[1] * len(item["input_ids"]) for item in items], 0)
        if "labels" not in batch:  # causal only (checked with the columns)
            batch["labels"] = _pad([item["input_ids"] for item in items], IGNORE)
        elif self.loss_kind != "seq2seq" and batch["labels"].shape != batch["input_ids"].shape:
            raise TaskError(f"a {self.loss_kind} LM needs labels as long as input_ids in each "
                            f"item, got a batch with labels {tuple(batch['labels'].shape)} and "
                            f"input_ids {tuple(batch['input_ids'].shape)}")
        return batch

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        """(Σ token losses as a 0-d tensor, number of label tokens) of the batch."""
        labels = batch["labels"]  # (B, T)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.loss_kind == "seq2seq" and "decoder_input_ids" not in inputs:
            if callable(getattr(model, "prepare_decoder_input_ids_from_labels", None)):
                inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(
                    labels=labels)
            else:  # the model shifts the labels itself (and computes a loss we do not use)
                inputs["labels"] = labels
        if "use_cache" in self._inputs:
            inputs["use_cache"] = False
        logits = model(**inputs).logits  # (B, T, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.loss_kind == "causal":
            logits, labels = logits[:, :-1], labels[:, 1:]
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                ignore_index=IGNORE, reduction="sum",
                                label_smoothing=self.label_smoothing)
        return total, int((labels != IGNORE).sum())

    # ------------------------------------------------------------------ optional hooks
    def item_size(self, item: Mapping[str, Any]) -> int:
        """Tokens of an item (source + target for seq2seq), so batches hold similar lengths."""
        size = len(item["input_ids"])
        if self.loss_kind == "seq2seq":
            size += len(item["labels"])
        return size

    def token_counts(self) -> dict[str, torch.Tensor]:
        """Per-row token frequencies (float64, one per row) of the train split (the first split
        if none is called ``train``): one count vector per use of a token embedding, keyed by
        the name of that use (with ``tied="joint"`` the replay adds a tied tensor's uses):
        encoder input ← ``input_ids``; decoder input ← the tokens the decoder reads (``labels``
        shifted right, or ``decoder_input_ids``); output projection ← the predicted labels
        (causal: ``labels[1:]``); a causal or masked LM's input ← ``input_ids``. A tensor that
        is tied but not used under its own name (Marian's ``model.shared.weight``) has none."""
        splits = self.datasets()
        ds = splits.get("train", next(iter(splits.values())))
        uses = self._embedding_uses()
        ids = {role: self._role_ids(role, ds) for role in {role for role, _ in uses.values()}}
        return {name: _bincount(ids[role], self._rows[name], name)
                for name, (role, _) in uses.items()}

    def _embedding_uses(self) -> dict[str, tuple[str, str]]:
        if not hasattr(self, "_uses"):
            with torch.device("meta"):
                model = self.build_model()
            self._uses = embedding_uses(model, self.loss_kind)
            params = dict(model.named_parameters(remove_duplicate=False))
            self._rows = {n: int(params[n].shape[0]) for n in self._uses}
        return self._uses

    # ------------------------------------------------------------------ internals
    def _role_ids(self, role: str, ds) -> list[list[int]]:
        """Token ids per item that the embedding in ``role`` looks up (or predicts)."""
        cols = ds.column_names
        if role == "input":
            return ds["input_ids"]
        labels = ds["labels"] if "labels" in cols else ds["input_ids"]
        if role == "output":
            if self.loss_kind == "causal":
                return [[t for t in row[1:] if t != IGNORE] for row in labels]
            return [[t for t in row if t != IGNORE] for row in labels]
        # role == "decoder": what the decoder reads, as prepare_decoder_input_ids_from_labels
        if "decoder_input_ids" in cols:
            return ds["decoder_input_ids"]
        start = self.config.decoder_start_token_id
        start = self.pad_token_id if start is None else start
        return [[start] + [self.pad_token_id if t == IGNORE else t for t in row[:-1]]
                for row in labels]

    def _check_columns(self, name: str, columns: Sequence[str]) -> None:
        where = f"data[{name!r}] = {self.data[name]!r}"
        unknown = [c for c in columns if c in self._inputs and c not in PAD_VALUES]
        if unknown:
            raise TaskError(f"{where}: column {unknown[0]!r} is taken by {self.model_class} but "
                            f"has no padding rule; the built-in task pads "
                            f"{', '.join(PAD_VALUES)}: drop the column or pass task= with a Task")
        if self.loss_kind != "causal" and "labels" not in columns:
            raise TaskError(f"{where} has no column 'labels', which a {self.loss_kind} model "
                            f"needs (columns: {', '.join(columns)})")


def _pad_id(config) -> int:
    """The config's pad token; without one (GPT-2 …) its end-of-sequence token or 0: padded
    positions are masked and ignored, so any id inside the vocabulary gives the same loss."""
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and value >= 0 and (vocab is None or value < vocab):
            return value
    return 0


def _forward_inputs(cls) -> frozenset[str]:
    """Names of the arguments the model's forward takes explicitly."""
    params = inspect.signature(cls.forward).parameters
    return frozenset(n for n, p in params.items()
                     if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(B, T) int64, rows padded on the right with ``value`` to the longest."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(r, dtype=torch.int64)
    return out


def _bincount(rows: Sequence[Sequence[int]], size: int, name: str) -> torch.Tensor:
    flat = torch.as_tensor([t for r in rows for t in r], dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= size):
        raise TaskError(f"token id {int(flat.max()) if int(flat.max()) >= size else int(flat.min())}"
                        f" is outside the {size} rows of {name!r}; the data does not fit the model")
    return torch.bincount(flat, minlength=size).to(torch.float64)


def embedding_uses(model: torch.nn.Module, loss: str) -> dict[str, tuple[str, str]]:
    """Use name -> (role, recorded name) for each place a token embedding matrix is used.

    Roles: ``input`` (the encoder's, or a decoder-only / encoder-only model's, input
    embedding), ``decoder`` (an encoder–decoder model's decoder input embedding), ``output``
    (the projection to the vocabulary). The use name is the parameter's name under the module
    that uses it (``model.encoder.embed_tokens.weight``, ``lm_head.weight``); the recorded name
    is the first name of that parameter in ``named_parameters`` order, as the Recorder keeps it.
    """
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    sites = []
    if loss == "seq2seq":
        for role, getter in (("input", "get_encoder"), ("decoder", "get_decoder")):
            owner = _call(model, getter)
            sites.append((role, owner, _call(owner, "get_input_embeddings")))
    else:
        sites.append(("input", model, _call(model, "get_input_embeddings")))
    sites.append(("output", model, _call(model, "get_output_embeddings")))
    prefixes = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefixes.setdefault(id(module), name)
    uses = {}
    for role, owner, module in sites:
        weight = getattr(module, "weight", None)
        if owner is None or not isinstance(weight, torch.nn.Parameter) or id(owner) not in prefixes:
            continue
        for sub, m in owner.named_modules(remove_duplicate=False):
            if m is module:
                name = ".".join(x for x in (prefixes[id(owner)], sub, "weight") if x)
                uses.setdefault(name, (role, first[id(weight)]))
                break
    return uses


def _call(obj, method: str):
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else None
    except (AttributeError, NotImplementedError):
        return None
