"""Corpus-level metrics of generated text against one reference per example.

BLEU and chrF are sacrebleu's (0 to 100, its default 13a tokenization and smoothing, so numbers
compare with published ones); exact match is a fraction in [0, 1], like the token accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: one each is needed"
        )
    if not hypotheses:
        raise ValueError("no examples to score: the metrics of an empty corpus are undefined")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (0-100) with one reference per hypothesis."""
    _check(hypotheses, references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus chrF (0-100): character n-grams, kinder to short or rare-word outputs."""
    _check(hypotheses, references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference once surrounding whitespace is stripped."""
    _check(hypotheses, references)
    same = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return same / len(hypotheses)
