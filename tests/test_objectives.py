"""Objectives: BERT masking rates, span corruption round trip, metric sums against hand math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import evaluate
from jaxlm.data.documents.span_corruption import corrupted_lengths, span_corruption
from jaxlm.objectives import (
    bert_mask,
    classification_loss,
    classification_sums,
    finish_classification,
    finish_tokens,
    shift_right,
    token_loss,
    token_sums,
)

MASK, CLS, SEP, PAD = 4, 2, 3, 0


def test_bert_mask_rates_and_exclusions():
    rng = np.random.default_rng(0)
    b, t, v = 64, 256, 1000
    tokens = rng.integers(5, v, (b, t)).astype(np.int32)
    tokens[:, 0], tokens[:, 100] = CLS, SEP
    seg = np.ones((b, t), np.int32)
    seg[:, 200:] = 0
    tokens[:, 200:] = PAD
    mask = jax.jit(
        lambda k, x, s: bert_mask(
            k, x, mask_id=MASK, vocab_size=v, segment_ids_BT=s, special_ids=(CLS, SEP, PAD)
        )
    )
    out = mask(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(seg))
    inputs, targets, chosen = (np.asarray(out[k]) for k in ("inputs", "targets", "loss_mask"))
    np.testing.assert_array_equal(targets, tokens)
    chosen = chosen.astype(bool)
    eligible = (seg != 0) & ~np.isin(tokens, [CLS, SEP, PAD])
    assert not chosen[~eligible].any()  # pads and specials never chosen
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    n = chosen.sum()
    masked = (inputs == MASK) & chosen
    same = (inputs == tokens) & chosen
    random = chosen & ~masked & ~same
    assert abs(masked.sum() / n - 0.8) < 0.02
    assert abs(same.sum() / n - 0.1) < 0.02
    # A random draw can repeat the original token (1 / vocab): it then counts as unchanged.
    assert abs(random.sum() / n - 0.1) < 0.02
    assert not np.isin(inputs[random], [CLS, SEP, PAD, MASK]).any()
    again = mask(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(seg))
    np.testing.assert_array_equal(again["inputs"], inputs)  # deterministic given the key
    other = mask(jax.random.key(1), jnp.asarray(tokens), jnp.asarray(seg))
    assert not np.array_equal(other["loss_mask"], out["loss_mask"])
    with pytest.raises(ValueError, match="mask_frac \\+ random_frac <= 1"):
        bert_mask(
            jax.random.key(0), jnp.asarray(tokens), mask_id=MASK, vocab_size=v, mask_frac=0.95
        )


def reconstruct(inputs, targets, sentinels) -> list[int]:
    """Put each sentinel's span (from the targets) back in its place in the inputs."""
    spans, current = {}, None
    for tok in targets:
        if tok in sentinels:
            current = spans.setdefault(tok, [])
        else:
            current.append(tok)
    out = []
    for tok in inputs:
        out.extend(spans[tok] if tok in sentinels else [tok])
    return out


def test_span_corruption_round_trip_and_density():
    rng = np.random.default_rng(1)
    sentinels = list(range(999, 899, -1))  # <extra_id_0> is the highest id, as in T5
    noise, total = 0, 0
    for length in [2, 7, 50, 113, 512]:
        for _ in range(20):
            tokens = rng.integers(10, 800, length)
            inputs, targets = span_corruption(tokens, rng, sentinel_ids=sentinels, eos_id=1)
            assert inputs[-1] == targets[-1] == 1
            inputs, targets = inputs[:-1], targets[:-1]
            assert reconstruct(list(inputs), list(targets), set(sentinels)) == list(tokens)
            assert (len(inputs), len(targets)) == corrupted_lengths(length)
            used = [t for t in targets if t in sentinels]
            assert used == sentinels[: len(used)]  # sentinels in order, each once
            if length >= 50:
                noise += len(targets) - len(used)
                total += length
    assert abs(noise / total - 0.15) < 0.01
    # Mean span length 3: about 0.15 * 512 / 3 spans.
    _, targets = span_corruption(np.arange(10, 522), rng, sentinel_ids=sentinels)
    assert sum(t in sentinels for t in targets) == round(0.15 * 512 / 3)
    with pytest.raises(ValueError, match="only 2 sentinel ids"):
        span_corruption(np.arange(10, 522), rng, sentinel_ids=sentinels[:2])


def test_shift_right_starts_each_segment():
    targets = jnp.asarray([[5, 6, 7, 8, 9, 0]])
    np.testing.assert_array_equal(shift_right(targets, 1), [[1, 5, 6, 7, 8, 9]])
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(shift_right(targets, 1, seg), [[1, 5, 1, 7, 8, 1]])


def test_token_sums_against_hand_computation():
    logits = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]]))
    targets = jnp.asarray([[0, 1, 2]])
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    loss, sums = token_loss(logits, targets, mask)
    nll = -np.log(0.7) - np.log(0.3)
    np.testing.assert_allclose(loss, nll / 2, rtol=1e-6)
    both = evaluate.add_sums(sums, token_sums(logits, targets, jnp.ones((1, 3))))
    out = finish_tokens(both)
    assert out["tokens"] == 5 and out["accuracy"] == pytest.approx(2 / 5)  # argmax 0, 2, 0
    np.testing.assert_allclose(out["loss"], (2 * nll - np.log(0.25)) / 5, rtol=1e-6)


def macro_f1_reference(labels, preds, num_classes) -> float:
    """sklearn's f1_score(average='macro') written out: classes seen as label or prediction."""
    scores = []
    for c in range(num_classes):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        if tp + fp + fn == 0:
            continue
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(
            0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        )
    return float(np.mean(scores))


def test_classification_finish_equals_hand_computation():
    rng = np.random.default_rng(2)
    c, weights = 5, np.array([1.0, 2.0, 0.5, 1.0, 3.0], np.float32)
    sums_fn = jax.jit(
        lambda x, y, m: classification_sums(x, y, class_weights_C=weights, example_mask_B=m)
    )
    sums, labels_all, preds_all, logits_all = None, [], [], []
    for _ in range(3):  # accumulated over batches, the last one with padding rows
        logits = rng.normal(size=(16, c)).astype(np.float32)
        logits[:, 4] -= 10  # class 4 is never predicted
        labels = rng.integers(0, 4, 16)  # and never a label: it must not count
        mask = np.ones(16, np.float32)
        if len(labels_all) == 2:
            mask[10:] = 0
        batch = sums_fn(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
        sums = evaluate.add_sums(sums, batch)
        keep = mask > 0
        labels_all.append(labels[keep])
        preds_all.append(logits[keep].argmax(-1))
        logits_all.append(logits[keep])
    labels, preds, logits = (np.concatenate(x) for x in (labels_all, preds_all, logits_all))
    out = finish_classification(sums)
    assert out["examples"] == len(labels) == 42
    assert out["accuracy"] == pytest.approx(np.mean(labels == preds))
    assert out["macro_f1"] == pytest.approx(macro_f1_reference(labels, preds, c))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(labels)), labels]
    w = weights[labels]
    assert out["loss"] == pytest.approx(np.sum(w * nll) / np.sum(w), rel=1e-5)
    loss, _ = classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(loss, nll.mean(), rtol=1e-5)
