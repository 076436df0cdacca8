"""A synthetic parallel corpus: Zipfian source words, a fixed translation "grammar".

Source sentences are i.i.d. words drawn with probability ∝ 1 / rank**zipf_exponent, so a few
words are very frequent and many are rare — what the frequency-bucket analysis of Zhu et al.
needs. The target side is a deterministic function of the source:

- every source word has one fixed target word (a random bijection, so target frequencies are
  Zipfian too but target ids are not sorted by frequency);
- a fraction of source words are *modifiers*; a modifier followed by a non-modifier swaps
  places with it in the target (like adjective–noun order between English and French).

The translation is therefore learnable exactly (the loss can go far below the unigram
entropy), but it needs attention: a target word depends on its neighbours in the source.
Everything is drawn from ``numpy.random.default_rng([seed, purpose])``, so the corpus is a
pure function of its arguments on every platform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3

# Sub-stream ids for default_rng([seed, purpose]): splits never share random numbers.
_GRAMMAR, _SPLITS = 0, 1
SPLITS = ("train", "valid", "test")

Pair = tuple[tuple[int, ...], tuple[int, ...]]
"""One sentence pair: (source word ids, target word ids), without BOS/EOS/PAD."""


@dataclass(frozen=True)
class Grammar:
    """The fixed translation rules of one corpus.

    ``translation[w]``: target id of source word ``w`` (specials map to themselves);
    ``modifier[w]``: whether source word ``w`` swaps with a following non-modifier.
    """

    translation: np.ndarray  # (vocab_size,) int64
    modifier: np.ndarray  # (vocab_size,) bool

    def translate(self, source: Sequence[int]) -> tuple[int, ...]:
        out: list[int] = []
        i, n = 0, len(source)
        while i < n:
            w = source[i]
            if self.modifier[w] and i + 1 < n and not self.modifier[source[i + 1]]:
                out += (int(self.translation[source[i + 1]]), int(self.translation[w]))
                i += 2
            else:
                out.append(int(self.translation[w]))
                i += 1
        return tuple(out)


def make_grammar(seed: int, vocab_size: int, modifier_fraction: float) -> Grammar:
    rng = np.random.default_rng([seed, _GRAMMAR])
    n_words = vocab_size - N_SPECIAL
    translation = np.arange(vocab_size, dtype=np.int64)
    translation[N_SPECIAL:] = N_SPECIAL + rng.permutation(n_words)
    modifier = np.zeros(vocab_size, dtype=bool)
    n_mod = round(modifier_fraction * n_words)
    modifier[N_SPECIAL + rng.choice(n_words, size=n_mod, replace=False)] = True
    return Grammar(translation=translation, modifier=modifier)


def zipf_probabilities(n_words: int, exponent: float) -> np.ndarray:
    """(n_words,) probabilities ∝ 1 / rank**exponent; word id N_SPECIAL + r has rank r + 1."""
    p = 1.0 / np.arange(1, n_words + 1, dtype=np.float64) ** exponent
    return p / p.sum()


def make_corpus(
    seed: int,
    vocab_size: int,
    sizes: dict[str, int],
    min_len: int,
    max_len: int,
    zipf_exponent: float,
    modifier_fraction: float,
) -> tuple[Grammar, dict[str, list[Pair]]]:
    """The grammar and {split: list of pairs}; ``sizes`` maps each of SPLITS to its size."""
    grammar = make_grammar(seed, vocab_size, modifier_fraction)
    p = zipf_probabilities(vocab_size - N_SPECIAL, zipf_exponent)
    rng = np.random.default_rng([seed, _SPLITS])
    splits: dict[str, list[Pair]] = {}
    for name in SPLITS:
        n = sizes[name]
        lengths = rng.integers(min_len, max_len + 1, size=n)
        words = N_SPECIAL + rng.choice(len(p), size=int(lengths.sum()), p=p)
        pairs: list[Pair] = []
        start = 0
        for length in lengths:
            src = tuple(int(w) for w in words[start : start + length])
            start += length
            pairs.append((src, grammar.translate(src)))
        splits[name] = pairs
    return grammar, splits
