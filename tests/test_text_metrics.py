"""BLEU, chrF and exact match on cases small enough to compute by hand."""

import math

import pytest

from jaxlm.text_metrics import bleu, chrf, exact_match


def test_identical_and_disjoint_corpora():
    refs = ["the cat sat on the mat", "a dog barked at the mailman twice"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert bleu(["one two three four five"], ["six seven eight nine ten"]) == 0.0
    assert chrf(["abc"], ["xyz"]) == 0.0


def test_bleu_matches_a_hand_computation():
    """Corpus BLEU adds n-gram counts over sentences before taking precisions."""
    hyps = ["the cat sat on the mat", "hello world"]
    refs = ["the cat sat on a mat today", "hello world"]
    # Clipped matches / hypothesis n-grams, summed over both sentences:
    # 1-grams: (the x1 of 2, cat, sat, on, mat) 5/6 + 2/2; 2-grams: (the cat, cat sat, sat on)
    # 3/5 + 1/1; 3-grams: (the cat sat, cat sat on) 2/4 + 0/0; 4-grams: (the cat sat on) 1/3.
    precisions = [7 / 8, 4 / 6, 2 / 4, 1 / 3]
    hyp_len, ref_len = 8, 9
    brevity = math.exp(1 - ref_len / hyp_len)
    expected = 100 * brevity * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert bleu(hyps, refs) == pytest.approx(expected, abs=1e-6)


def test_bleu_uses_13a_tokenization():
    """13a splits punctuation off words, so the glued and spaced forms score the same."""
    assert bleu(["the cat sat on the mat."], ["the cat sat on the mat ."]) == pytest.approx(100.0)


def test_exact_match_strips_surrounding_whitespace_only():
    hyps = [" yes\n", "no", "Maybe", "a  b"]
    refs = ["yes", "no ", "maybe", "a b"]
    assert exact_match(hyps, refs) == 0.5


def test_mismatched_or_empty_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no examples"):
        exact_match([], [])
