"""Task ``replay.tasks.catalog_nmt:CatalogNMT``: translation on the machine's gettext catalogs.

A real parallel corpus (:mod:`replay.tasks.catalog_corpus`), a joint byte-level BPE
(:mod:`replay.tasks.subword`) trained on the train split and stored with the run, and a
Transformer in the shape of fairseq's ``transformer_iwslt_de_en``
(:mod:`replay.tasks.nmt_model`). Keyword arguments (all JSON data):

- ``language`` (required): a locale directory name with catalogs, e.g. ``"de"``, ``"fr"``,
  ``"pt_BR"``.
- ``direction``: ``"to_en"`` (default; translation → English, like IWSLT14 De→En) or
  ``"from_en"``.
- ``train_size``, ``valid_size``, ``test_size``: pairs per split (default all the rest, 500,
  1000). Test and valid are dealt first from the seeded permutation, so they do not change
  with ``train_size`` and a smaller train split is a subset of a larger one.
- ``seed``: the split permutation and the initial weights.
- ``min_words``, ``max_words``: English messages of this many words are kept (default 2–25).
- ``locale_dir``: read only this directory (default: search
  :data:`~replay.tasks.catalog_corpus.SEARCH_DIRS`).
- ``vocab_size``: the most entries the BPE trains (fewer if the train split offers fewer
  merges); the model's vocabulary is the tokenizer's.
- ``tokenizer``: path of the tokenizer file. Missing → trained on the train split and written
  there; present → loaded, never retrained. null → trained in memory (then the task cannot be
  recorded: :meth:`CatalogNMT.record_args` needs the file).
- ``tokenizer_sha256``, ``fingerprint``: the tokenizer file's and the corpus's sha256, stored
  by :meth:`CatalogNMT.record_args`; given, they are checked (TaskError on a mismatch) and the
  tokenizer file must exist.
- ``d_model``, ``heads``, ``ffn_dim``, ``encoder_layers``, ``decoder_layers``,
  ``normalize_before``, ``dropout``, ``share_decoder_embeddings``, ``share_all_embeddings``:
  the model (defaults: fairseq's ``transformer_iwslt_de_en``, post-norm, dropout 0.1, nothing
  shared).
- ``label_smoothing``: ε of fairseq's label-smoothed cross-entropy, in train mode only.
- ``eval_batch_size``: sentences per batch when a replay evaluates a split or a sample (pairs
  sorted by length first, so small batches waste little padding).

**What is replayed**: :meth:`CatalogNMT.loss` in eval mode — the summed token cross-entropy
(nats, no label smoothing, no dropout) over the non-pad target tokens. Training in train mode
optimises the label-smoothed loss with dropout; LCA allocates the change of the plain loss.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from replay.errors import TaskError
from replay.tasks import catalog_corpus as corpus
from replay.tasks import subword
from replay.tasks.bleu import copy_baseline, corpus_bleu
from replay.tasks.nmt_model import TransformerNMT
from replay.tasks.subword import BOS, EOS, PAD

Item = tuple[tuple[int, ...], tuple[int, ...]]
"""(source token ids, target token ids), without BOS/EOS/PAD."""

_MODEL_KEYS = ("d_model", "heads", "ffn_dim", "encoder_layers", "decoder_layers",
               "normalize_before", "dropout", "share_decoder_embeddings", "share_all_embeddings")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class CatalogNMT:
    """Translate gettext catalog messages (module docstring: arguments and what is replayed).

    Items are :data:`Item` pairs; a batch is a dict of int64 tensors ``src`` (B, S) = source
    + EOS, ``tgt_in`` (B, T) = BOS + target, ``tgt_out`` (B, T) = target + EOS, right-padded
    with PAD. One vocabulary for both sides (PAD=0, BOS=1, EOS=2).
    """

    def __init__(self, *, language: str, direction: str = "to_en", train_size: int | None = None,
                 valid_size: int = 500, test_size: int = 1000, seed: int = 0,
                 min_words: int = 2, max_words: int = 25, locale_dir: str | None = None,
                 vocab_size: int = 4000, tokenizer: str | None = None,
                 tokenizer_sha256: str | None = None, fingerprint: str | None = None,
                 d_model: int = 512, heads: int = 4, ffn_dim: int = 1024,
                 encoder_layers: int = 6, decoder_layers: int = 6,
                 normalize_before: bool = False, dropout: float = 0.1,
                 label_smoothing: float = 0.0, share_decoder_embeddings: bool = False,
                 share_all_embeddings: bool = False, eval_batch_size: int = 32):
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        _check(self._args)
        self.language, self.direction = language, direction
        self.label_smoothing, self.eval_batch_size, self.seed = label_smoothing, eval_batch_size, seed
        pairs, self.stats = corpus.load_corpus(language, locale_dir, min_words, max_words)
        where = f"language {language!r} in {', '.join(self.stats.directories)}"
        self.fingerprint = corpus.fingerprint(pairs)
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise TaskError(f"CatalogNMT: the catalogs of {where} give corpus sha256 "
                            f"{self.fingerprint[:16]}…, but the run was recorded on a corpus with "
                            f"sha256 {fingerprint[:16]}…; replay on a machine with the same "
                            "catalog packages (same versions) as the recording one")
        sizes = {"train": train_size, "valid": valid_size, "test": test_size}
        self.texts = corpus.split(pairs, sizes, seed, where)  # split -> [(English, other)]
        self.tokenizer, self.tokenizer_sha256 = self._tokenizer(tokenizer, tokenizer_sha256)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self._items = {name: self._encode(texts) for name, texts in self.texts.items()}

    def _tokenizer(self, path: str | None, sha256: str | None):
        if path is not None and (os.path.exists(path) or sha256 is not None):
            return subword.load_tokenizer(path, sha256), subword.file_sha256(path)
        if sha256 is not None:
            raise TaskError("CatalogNMT: tokenizer_sha256 is set but tokenizer (its file) is "
                            "not; pass tokenizer=<path of the run's tokenizer file>")
        texts = [t for pair in self.texts["train"] for t in pair]
        tok = subword.train_tokenizer(texts, self._args["vocab_size"])
        return tok, (subword.save_tokenizer(tok, path) if path is not None else None)

    def _encode(self, texts: list[corpus.Pair]) -> list[Item]:
        english = subword.encode(self.tokenizer, [e for e, _ in texts])
        other = subword.encode(self.tokenizer, [t for _, t in texts])
        return list(zip(other, english)) if self.direction == "to_en" else list(zip(english, other))

    # --- recording -------------------------------------------------------------------------

    def record_args(self) -> dict:
        """The JSON arguments that rebuild this very task: the constructor's, plus the corpus
        fingerprint and the tokenizer file (absolute path) with its sha256."""
        if self._args["tokenizer"] is None:
            raise TaskError("CatalogNMT: a recorded run needs its tokenizer stored: pass "
                            "tokenizer=<path of a tokenizer file> (trained there if missing)")
        return {**self._args, "tokenizer": os.path.abspath(self._args["tokenizer"]),
                "tokenizer_sha256": self.tokenizer_sha256, "fingerprint": self.fingerprint}

    # --- the Task protocol -----------------------------------------------------------------

    def build_model(self) -> TransformerNMT:
        """A fresh model initialised from ``seed`` (the global torch RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
            model = TransformerNMT(self.vocab_size, **{k: self._args[k] for k in _MODEL_KEYS},
                                   pad=PAD)
        if not any(p.is_meta for p in model.parameters()):
            model.reset_parameters(torch.Generator().manual_seed(self.seed))
        return model

    def datasets(self) -> dict[str, list[Item]]:
        return {name: self._items[name] for name in ("train", "valid", "test")
                if self._items[name]}

    def collate(self, items: Sequence[Item]) -> dict[str, Tensor]:
        B = len(items)
        S = max(len(s) for s, _ in items) + 1
        T = max(len(t) for _, t in items) + 1
        src = np.full((B, S), PAD, dtype=np.int64)
        tgt_in = np.full((B, T), PAD, dtype=np.int64)
        tgt_out = np.full((B, T), PAD, dtype=np.int64)
        for b, (s, t) in enumerate(items):
            src[b, :len(s)], src[b, len(s)] = s, EOS
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = BOS, t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, EOS
        return {"src": torch.from_numpy(src), "tgt_in": torch.from_numpy(tgt_in),
                "tgt_out": torch.from_numpy(tgt_out)}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        """(Σ token cross-entropy in nats over non-pad targets, 0-d; number of target tokens).
        Label-smoothed (ε = ``label_smoothing``) only while ``model.training``."""
        logits = model(batch["src"], batch["tgt_in"])  # (B, T, V)
        target = batch["tgt_out"]  # (B, T)
        eps = self.label_smoothing if model.training else 0.0
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD,
                                reduction="sum", label_smoothing=eps)
        return total, int((target != PAD).sum())

    def item_size(self, item: Item) -> int:
        """Source plus target tokens: replays batch pairs of similar length together."""
        return len(item[0]) + len(item[1])

    def token_counts(self) -> dict[str, Tensor]:
        """Per-row token counts in the train split — source tokens + EOS for the encoder
        embedding, BOS + target for the decoder embedding, target + EOS for the output
        projection — keyed by recorded (not alias) names; a shared tensor gets the sum."""
        src, tgt_in, tgt_out = self._counts("train")
        if self._args["share_all_embeddings"]:
            counts = {"encoder.embed_tokens.weight": src + tgt_in + tgt_out}
        elif self._args["share_decoder_embeddings"]:
            counts = {"encoder.embed_tokens.weight": src,
                      "decoder.embed_tokens.weight": tgt_in + tgt_out}
        else:
            counts = {"encoder.embed_tokens.weight": src, "decoder.embed_tokens.weight": tgt_in,
                      "decoder.output_projection.weight": tgt_out}
        return {k: torch.from_numpy(v) for k, v in counts.items()}

    # --- training, evaluation, reports -----------------------------------------------------

    def training_batches(self, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
        """Endless batches of the train split, as fairseq forms them: each epoch (seeded by
        ``(seed, epoch)``) shuffles, sorts windows of 64 batches' worth by length (less
        padding), cuts them into batches and shuffles the batches."""
        train = self._items["train"]
        if not train:
            raise TaskError("CatalogNMT: the train split is empty; set train_size >= 1")
        epoch, window = 0, 64 * batch_size
        while True:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(train))
            batches = []
            for w in range(0, len(order), window):
                part = sorted(order[w:w + window], key=lambda i: self.item_size(train[i]))
                batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
            for b in rng.permutation(len(batches)):
                yield self.collate([train[i] for i in batches[b]])
            epoch += 1

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats) of the target tokens (+ EOS) of ``split``: the loss of the best model
        that ignores the source."""
        counts = self._counts(split)[2].astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def translate(self, model: nn.Module, split: str = "test", limit: int | None = None,
                  batch_size: int = 128) -> list[str]:
        """Greedy translations of the sources of ``split`` (the first ``limit``), in order, in
        batches of similar length; at most 1.2 × source length + 10 tokens each (fairseq's
        default bound)."""
        items = self._items[split][:limit]
        was = model.training
        model.eval()
        out: list[str] = [""] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            batch = self.collate([items[i] for i in idx])
            max_len = torch.tensor([int(1.2 * len(items[i][0])) + 10 for i in idx])
            ids = model.greedy(batch["src"], BOS, EOS, max_len)
            for i, text in zip(idx, subword.decode(self.tokenizer, ids)):
                out[i] = text
        model.train(was)
        return out

    def sides(self, split: str) -> tuple[list[str], list[str]]:
        """(source texts, reference texts) of ``split`` in the task's direction."""
        pairs = self.texts[split]
        english, other = [e for e, _ in pairs], [t for _, t in pairs]
        return (other, english) if self.direction == "to_en" else (english, other)

    @property
    def target_language(self) -> str:
        return "en" if self.direction == "to_en" else self.language

    def bleu(self, model: nn.Module, split: str = "test", limit: int | None = None) -> dict:
        """sacrebleu BLEU of greedy translations of ``split``, and of copying the source."""
        sources, refs = self.sides(split)
        sources, refs = sources[:limit], refs[:limit]
        hyps = self.translate(model, split, limit)
        return {"bleu": corpus_bleu(hyps, refs, self.target_language),
                "copy_baseline": copy_baseline(sources, refs, self.target_language),
                "examples": [{"source": s, "reference": r, "hypothesis": h}
                             for s, r, h in list(zip(sources, refs, hyps))[:5]]}

    def _counts(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(V,) int64 counts of the tokens in ``src``, ``tgt_in`` and ``tgt_out`` of a split."""
        items, V = self._items[split], self.vocab_size

        def count(seqs) -> np.ndarray:
            flat = np.fromiter((w for s in seqs for w in s), dtype=np.int64)
            return np.bincount(flat, minlength=V).astype(np.int64)

        src = count(s for s, _ in items)
        tgt = count(t for _, t in items)
        n = len(items)
        src[EOS] += n
        tgt_in, tgt_out = tgt.copy(), tgt.copy()
        tgt_in[BOS] += n
        tgt_out[EOS] += n
        return src, tgt_in, tgt_out


def _check(a: dict) -> None:
    """One-line TaskErrors for arguments of the wrong type or out of range."""
    sizes_ok = all(_is_int(a[k]) and a[k] >= 0 for k in ("valid_size", "test_size"))
    checks = [
        (isinstance(a["language"], str) and a["language"].strip() != "" and "/" not in a["language"],
         f"language={a['language']!r} must be a locale name such as 'de' or 'pt_BR'"),
        (a["direction"] in ("to_en", "from_en"),
         f"direction={a['direction']!r} must be 'to_en' or 'from_en'"),
        (a["train_size"] is None or (_is_int(a["train_size"]) and a["train_size"] >= 1),
         f"train_size={a['train_size']!r} must be an integer >= 1, or null for all the rest"),
        (sizes_ok, f"valid_size={a['valid_size']!r} and test_size={a['test_size']!r} must be "
                   "integers >= 0"),
        (_is_int(a["seed"]) and a["seed"] >= 0, f"seed={a['seed']!r} must be an integer >= 0"),
        (_is_int(a["min_words"]) and _is_int(a["max_words"])
         and 1 <= a["min_words"] <= a["max_words"],
         f"need integers 1 <= min_words <= max_words, got {a['min_words']!r}, {a['max_words']!r}"),
        (_is_int(a["vocab_size"]), f"vocab_size={a['vocab_size']!r} must be an integer"),
        (all(_is_int(a[k]) and a[k] >= 1 for k in ("d_model", "heads", "ffn_dim",
                                                   "encoder_layers", "decoder_layers",
                                                   "eval_batch_size")),
         "d_model, heads, ffn_dim, encoder_layers, decoder_layers and eval_batch_size must be "
         "integers >= 1"),
        (not _is_int(a["d_model"]) or not _is_int(a["heads"]) or a["heads"] < 1
         or (a["d_model"] % 2 == 0 and a["d_model"] % a["heads"] == 0),
         f"d_model={a['d_model']!r} must be even and divisible by heads={a['heads']!r}"),
        (all(isinstance(a[k], int | float) and not isinstance(a[k], bool) and 0 <= a[k] < 1
             for k in ("dropout", "label_smoothing")),
         f"dropout={a['dropout']!r} and label_smoothing={a['label_smoothing']!r} must be "
         "numbers in [0, 1)"),
        (all(isinstance(a[k], bool) for k in ("normalize_before", "share_decoder_embeddings",
                                              "share_all_embeddings")),
         "normalize_before, share_decoder_embeddings and share_all_embeddings must be true or "
         "false"),
        (all(a[k] is None or isinstance(a[k], str)
             for k in ("locale_dir", "tokenizer", "tokenizer_sha256", "fingerprint")),
         "locale_dir, tokenizer, tokenizer_sha256 and fingerprint must be strings or null"),
    ]
    for ok, message in checks:
        if not ok:
            raise TaskError(f"CatalogNMT: {message}")
