"""Corpus BLEU with ``sacrebleu``, and the floor every translator must clear: copying the source.

Software messages share much with their translations (format specifiers, option names, file
names, numbers), so copying the source verbatim scores well above zero; a model that does not
beat :func:`copy_baseline` has learnt nothing a ``cp`` could not do.
"""

from __future__ import annotations

from collections.abc import Sequence

from replay.errors import TaskError

# sacrebleu tokenisers for target languages written without spaces between words.
_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char", "th": "char", "lo": "char", "km": "char",
             "my": "char"}


def bleu_tokenizer(target_language: str) -> str:
    """The sacrebleu tokeniser for a target language ("13a", sacrebleu's default, for most)."""
    base = target_language.split("_")[0].split("@")[0].lower()
    return _TOKENIZE.get(base, "13a")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str],
                target_language: str = "en") -> dict:
    """{"score": BLEU (0–100), "signature": sacrebleu's signature, "sentences": n}."""
    try:
        import sacrebleu
    except ModuleNotFoundError:
        raise TaskError("BLEU needs the 'sacrebleu' package: pip install 'lca-replay[paper]'"
                        ) from None
    if len(hypotheses) != len(references):
        raise TaskError(f"BLEU needs one hypothesis per reference, got {len(hypotheses)} and "
                        f"{len(references)}")
    metric = sacrebleu.metrics.BLEU(tokenize=bleu_tokenizer(target_language))
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return {"score": float(result.score), "signature": str(metric.get_signature()),
            "sentences": len(references)}


def copy_baseline(sources: Sequence[str], references: Sequence[str],
                  target_language: str = "en") -> dict:
    """BLEU of the "translation" that copies each source sentence unchanged."""
    return corpus_bleu(sources, references, target_language)
