"""A joint byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained, saved and reloaded.

One vocabulary serves both languages (as fairseq's joint BPE for IWSLT), so source and target
embeddings can be shared as an option and copying the source is expressible. Byte-level
pre-tokenisation makes every string encodable (no unknown token, any script) and decoding
exact: ``decode(encode(text)) == text``. Training is deterministic: the same texts in the same
order give the same file, byte for byte, in every process.

The trained tokenizer is a JSON file; its sha256 is recorded with a run so that a replay
loads exactly the tokenizer the model was trained with and never trains another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

from replay.errors import TaskError

SPECIALS = ("<pad>", "<s>", "</s>")
PAD, BOS, EOS = 0, 1, 2


def _tokenizers():
    try:
        import tokenizers
    except ModuleNotFoundError:
        raise TaskError("CatalogNMT needs the Hugging Face 'tokenizers' package: "
                        "pip install 'lca-replay[paper]'") from None
    return tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A BPE ``tokenizers.Tokenizer`` of ``vocab_size`` entries (specials first: PAD=0, BOS=1,
    EOS=2, then the 256 byte symbols, then merges) trained on ``texts``."""
    tk = _tokenizers()
    if vocab_size < len(SPECIALS) + 256:
        raise TaskError(f"CatalogNMT: vocab_size={vocab_size} is too small: a byte-level BPE "
                        f"needs at least {len(SPECIALS) + 256} entries (3 specials + 256 bytes)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    return tok


def save_tokenizer(tok, path: str) -> str:
    """Write ``tok`` to ``path`` atomically (temp file + rename); returns its sha256."""
    text = tok.to_str()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return file_sha256(path)


def load_tokenizer(path: str, sha256: str | None = None):
    """The tokenizer stored at ``path``; TaskError if missing or not the recorded file."""
    tk = _tokenizers()
    if not os.path.isfile(path):
        raise TaskError(f"CatalogNMT: tokenizer file {path} not found; the run was trained with "
                        "it: copy it back, or pass task_args with tokenizer=<its new path>")
    got = file_sha256(path)
    if sha256 is not None and got != sha256:
        raise TaskError(f"CatalogNMT: tokenizer file {path} has sha256 {got[:12]}…, but the run "
                        f"was trained with {sha256[:12]}…; restore the run's own tokenizer file")
    try:
        return tk.Tokenizer.from_file(path)
    except Exception as err:  # the Rust parser raises its own exception type
        raise TaskError(f"CatalogNMT: cannot read tokenizer file {path}: {err}") from None


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def encode(tok, texts: Sequence[str]) -> list[tuple[int, ...]]:
    """Token ids of each text (no specials added)."""
    return [tuple(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def decode(tok, ids: Sequence[Sequence[int]]) -> list[str]:
    """Texts of token id sequences (specials dropped)."""
    return tok.decode_batch([list(map(int, s)) for s in ids], skip_special_tokens=True)
