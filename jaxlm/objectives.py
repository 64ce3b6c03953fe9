"""Objectives of the model families: BERT masking, T5 span corruption, and their metric sums.

Shape legend: B batch, T length, V vocabulary, C classes.

Masking runs on device as a pure function of a JAX key. Span corruption is host-side NumPy on one
example at a time (it changes lengths). Metrics are sums in the style of jaxlm/evaluate.py, so the
training loop and the eval program add them over batches (eval_loop.make_eval_step) and `finish_*`
turns them into numbers once: token objectives (masked LM, seq2seq) sum NLL, counted tokens and
correct argmax predictions; classification also sums per-class counts for macro F1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.evaluate import token_nll

# --- BERT masked-LM inputs -------------------------------------------------------------------


def bert_mask(
    key: jax.Array,
    tokens_BT: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    segment_ids_BT: jax.Array | None = None,
    special_ids: Sequence[int] = (),
    rate: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> dict[str, jax.Array]:
    """BERT's corruption: {"inputs", "targets", "loss_mask"} for a batch of token ids.

    Each real token (segment id != 0, not in `special_ids`) is chosen with probability `rate`;
    a chosen token becomes `mask_id` with probability `mask_frac`, a random non-special token
    with probability `random_frac`, and stays itself otherwise. The loss mask covers exactly
    the chosen positions, so unchanged chosen tokens are still predicted (BERT's point of them).
    """
    if not 0.0 <= rate <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(
            f"masking rates rate={rate}, mask_frac={mask_frac}, random_frac={random_frac}: "
            "rate must be in [0, 1] and mask_frac + random_frac <= 1"
        )
    k_choose, k_kind, k_random = jax.random.split(key, 3)
    shape = tokens_BT.shape
    eligible_BT = jnp.ones(shape, bool) if segment_ids_BT is None else segment_ids_BT != 0
    for sid in special_ids:
        eligible_BT &= tokens_BT != sid
    chosen_BT = eligible_BT & jax.random.bernoulli(k_choose, rate, shape)
    u_BT = jax.random.uniform(k_kind, shape)
    to_mask_BT = chosen_BT & (u_BT < mask_frac)
    to_random_BT = chosen_BT & (u_BT >= mask_frac) & (u_BT < mask_frac + random_frac)
    excluded = sorted({int(i) for i in special_ids} | {int(mask_id)})
    random_BT = _draw_excluding(k_random, shape, vocab_size, excluded)
    inputs_BT = jnp.where(to_mask_BT, mask_id, jnp.where(to_random_BT, random_BT, tokens_BT))
    return {
        "inputs": inputs_BT.astype(tokens_BT.dtype),
        "targets": tokens_BT,
        "loss_mask": chosen_BT.astype(jnp.float32),
    }


def _draw_excluding(key, shape, vocab_size: int, excluded: list[int]):
    """Uniform ids in [0, vocab_size) minus `excluded` (sorted): draw, then step over each."""
    ids = jax.random.randint(key, shape, 0, vocab_size - len(excluded), dtype=jnp.int32)
    for e in excluded:
        ids = ids + (ids >= e)
    return ids


# --- T5 span corruption (host side) ----------------------------------------------------------


def shift_right(targets_BT: jax.Array, start_id: int, segment_ids_BT: jax.Array | None = None):
    """Teacher-forcing decoder inputs: each target's predecessor, `start_id` at segment starts."""
    prev_BT = jnp.pad(targets_BT[:, :-1], ((0, 0), (1, 0)), constant_values=start_id)
    if segment_ids_BT is None:
        return prev_BT
    prev_seg_BT = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return jnp.where(prev_seg_BT == segment_ids_BT, prev_BT, start_id)


def prefix_lm_rows(inputs_BS, input_segment_ids_BS, targets_BT, target_segment_ids_BT):
    """One causal row per seq2seq example for a decoder-only model: (tokens, segment ids,
    positions), each [B, S + T].

    The right-padded input is rotated so that its padding comes first and its last token (the
    EOS that separates input from output) sits in column S - 1, right before the targets. The
    padding gets segment id 0, so real tokens never attend to it, and positions count from the
    first real token: the row is exactly what generation sees when it is prompted with the input.
    """
    s = inputs_BS.shape[1]
    lengths_B = jnp.sum(input_segment_ids_BS > 0, axis=1)
    index_BS = (jnp.arange(s)[None, :] + lengths_B[:, None]) % s
    inputs_BS = jnp.take_along_axis(inputs_BS, index_BS, axis=1)
    input_seg_BS = jnp.take_along_axis(input_segment_ids_BS, index_BS, axis=1)
    tokens = jnp.concatenate([inputs_BS, targets_BT], axis=1)
    real = jnp.concatenate([input_seg_BS > 0, target_segment_ids_BT > 0], axis=1)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)
    return tokens, real.astype(jnp.int32), positions


# --- Metric sums -------------------------------------------------------------------------------


def token_sums(logits_BTV, targets_BT, mask_BT) -> dict[str, jax.Array]:
    """Sums of NLL, counted tokens and correct argmax predictions over mask_BT (0/1).

    The masked-LM objective passes its loss mask (masked positions only); seq2seq passes the
    decoder's real-target mask.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    correct_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return {
        "nll": jnp.sum(token_nll(logits_BTV, targets_BT) * mask_BT),
        "tokens": jnp.sum(mask_BT),
        "correct": jnp.sum(correct_BT * mask_BT),
    }


def token_loss(logits_BTV, targets_BT, mask_BT) -> tuple[jax.Array, dict]:
    """(mean NLL over counted tokens, the sums): the training loss of a token objective."""
    sums = token_sums(logits_BTV, targets_BT, mask_BT)
    return sums["nll"] / jnp.maximum(sums["tokens"], 1.0), sums


def finish_tokens(sums: dict) -> dict[str, float]:
    """loss, perplexity and accuracy from accumulated `token_sums`."""
    tokens = float(sums["tokens"])
    if tokens == 0:
        raise ValueError("no target tokens were evaluated; check the masking rate and eval_steps")
    loss = float(sums["nll"]) / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": float(sums["correct"]) / tokens,
        "tokens": tokens,
    }


def classification_sums(
    logits_BC, labels_B, *, class_weights_C=None, example_mask_B=None
) -> dict[str, jax.Array]:
    """Sums of (weighted) NLL, weight, examples, correct, and per-class counts [C].

    With class weights the loss is sum w[y] NLL / sum w[y] (as in weighted cross-entropy);
    accuracy and F1 stay unweighted. `example_mask_B` (0/1) drops padding rows.
    """
    c = logits_BC.shape[-1]
    m_B = jnp.ones(labels_B.shape, jnp.float32) if example_mask_B is None else example_mask_B
    m_B = m_B.astype(jnp.float32)
    w_B = m_B if class_weights_C is None else m_B * jnp.asarray(class_weights_C)[labels_B]
    nll_B = token_nll(logits_BC, labels_B)
    pred_B = jnp.argmax(logits_BC, axis=-1)
    pred_BC = jax.nn.one_hot(pred_B, c) * m_B[:, None]
    actual_BC = jax.nn.one_hot(labels_B, c) * m_B[:, None]
    return {
        "nll": jnp.sum(nll_B * w_B),
        "weight": jnp.sum(w_B),
        "examples": jnp.sum(m_B),
        "correct": jnp.sum((pred_B == labels_B) * m_B),
        "true_positive": jnp.sum(pred_BC * actual_BC, axis=0),
        "predicted": jnp.sum(pred_BC, axis=0),
        "actual": jnp.sum(actual_BC, axis=0),
    }


def classification_loss(
    logits_BC, labels_B, *, class_weights_C=None, example_mask_B=None
) -> tuple[jax.Array, dict]:
    """(weighted mean cross-entropy, the sums): the training loss of classification."""
    sums = classification_sums(
        logits_BC, labels_B, class_weights_C=class_weights_C, example_mask_B=example_mask_B
    )
    return sums["nll"] / jnp.maximum(sums["weight"], 1e-9), sums


def finish_classification(sums: dict) -> dict[str, float]:
    """loss, accuracy and macro F1 from accumulated `classification_sums`.

    Macro F1 averages F1 = 2 TP / (predicted + actual) over the classes that occur as a label
    or a prediction (sklearn's default set of labels); classes that never occur are skipped.
    """
    examples = float(sums["examples"])
    if examples == 0:
        raise ValueError("no examples were evaluated; check the data split and eval_steps")
    tp = np.asarray(sums["true_positive"], np.float64)
    seen = np.asarray(sums["predicted"], np.float64) + np.asarray(sums["actual"], np.float64)
    f1 = np.divide(2 * tp, seen, out=np.zeros_like(tp), where=seen > 0)
    return {
        "loss": float(sums["nll"]) / max(float(sums["weight"]), 1e-9),
        "accuracy": float(sums["correct"]) / examples,
        "macro_f1": float(f1[seen > 0].mean()) if np.any(seen > 0) else 0.0,
        "examples": examples,
    }
