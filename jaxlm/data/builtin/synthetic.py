"""Synthetic data for every objective: learnable, seeded, and free of TensorFlow and text.

Tokens come from a seeded Markov chain (synthetic_batch). Per objective:
lm: the chain itself; mlm: the same, with the last id reserved as <mask>;
span_corruption: chain rows corrupted like text rows (the last 16 ids are the sentinels);
seq2seq: copy a chain of random length (targets: its first target_len - 1 tokens, then EOS);
classify: a chain of random length labelled by its first token modulo num_classes.
Ids 0 (padding) and 1 (EOS) are kept out of the example tasks' chains. Validation batches use
steps no run reaches, so they never appear in training.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data import sampling
from jaxlm.data.batches import classify_batch, padded, seq2seq_batch
from jaxlm.data.documents import span_corruption as spans
from jaxlm.data.specs import DataSpec
from jaxlm.data.types import EOS_ID, DataSource

EVAL_STEP_OFFSET = 2**40
NUM_SENTINELS = 16


def build(spec: DataSpec) -> DataSource:
    """Seeded batches of spec.objective's shape over spec.vocab_size ids."""
    vocab = spec.vocab_size
    make = {
        "lm": _lm,
        "mlm": _lm,
        "span_corruption": _span_corruption,
        "seq2seq": _seq2seq,
        "classify": _classify,
    }[spec.objective]
    global_batch, extra = make(spec, vocab)

    def batch(step: int, process_index=None, process_count=None) -> dict:
        share = sampling.process_share(spec.batch_size, process_index, process_count)
        return {k: v[share] for k, v in global_batch(step).items()}

    def eval_batches(n: int, process_index=None, process_count=None) -> list[dict]:
        return [batch(EVAL_STEP_OFFSET + i, process_index, process_count) for i in range(n or 4)]

    return DataSource(vocab, batch, eval_batches, packed=False, **extra)


def _lm(spec: DataSpec, vocab: int):
    d, seed = spec, spec.seed
    # Masked LM reserves the last id as <mask>: the chain never emits it.
    mask_id = vocab - 1 if spec.objective == "mlm" else None
    chain_vocab = vocab if mask_id is None else mask_id

    def global_batch(step: int) -> dict:
        out = synthetic_batch(step, d.batch_size, d.seq_len, chain_vocab, seed)
        out["target_bytes"] = np.zeros_like(out["target_bytes"])  # no text: no bits per byte
        return out

    return global_batch, {"mask_id": mask_id}


def _chains(step: int, spec: DataSpec, vocab: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, length] in [2, vocab), random lengths in [length // 2, length])."""
    d, seed = spec, spec.seed
    raw = synthetic_batch(step, d.batch_size, length, vocab - 2, seed)["inputs"]
    lengths = np.random.default_rng([seed, step, 0x1E6]).integers(
        max(length // 2, 1), length + 1, d.batch_size
    )
    return raw + 2, lengths


def _span_corruption(spec: DataSpec, vocab: int):
    d, t, seed = spec, spec.spans, spec.seed
    sentinel_ids = tuple(range(vocab - 1, vocab - 1 - NUM_SENTINELS, -1))
    raw = spans.raw_length(d.seq_len, d.target_len, t.noise_density, t.mean_span_length)
    spans.check_sentinels(raw, t.noise_density, t.mean_span_length, NUM_SENTINELS)

    def global_batch(step: int) -> dict:
        tokens = synthetic_batch(step, d.batch_size, raw, vocab - NUM_SENTINELS, seed)
        rows = tokens["inputs"]
        return spans.corrupt_rows(
            rows,
            np.ones_like(rows),
            [(seed, step, i) for i in range(len(rows))],
            sentinel_ids=sentinel_ids,
            eos_id=EOS_ID,
            seq_len=d.seq_len,
            target_len=d.target_len,
            noise_density=t.noise_density,
            mean_span=t.mean_span_length,
        )

    return global_batch, {"sentinel_ids": sentinel_ids}


def _seq2seq(spec: DataSpec, vocab: int):
    d = spec

    def global_batch(step: int) -> dict:
        tokens, lengths = _chains(step, spec, vocab, d.seq_len - 1)
        sources = [np.append(row[:n], EOS_ID) for row, n in zip(tokens, lengths, strict=True)]
        targets = [
            np.append(row[: min(n, d.target_len - 1)], EOS_ID)
            for row, n in zip(tokens, lengths, strict=True)
        ]
        return seq2seq_batch(*padded(sources, d.seq_len), *padded(targets, d.target_len))

    return global_batch, {}


def _classify(spec: DataSpec, vocab: int):
    d, classes = spec, spec.num_classes

    def global_batch(step: int) -> dict:
        tokens, lengths = _chains(step, spec, vocab, d.seq_len - 1)
        rows = [np.append(row[:n], EOS_ID) for row, n in zip(tokens, lengths, strict=True)]
        return classify_batch(*padded(rows, d.seq_len), tokens[:, 0] % classes)

    return global_batch, {}


def synthetic_batch(
    step: int, batch_size: int, seq_len: int, vocab_size: int, seed: int
) -> dict[str, np.ndarray]:
    """A learnable batch from a seeded Markov chain: mostly a fixed successor, 10% noise."""
    successor = np.random.default_rng([seed, 0x5EED]).permutation(vocab_size)
    rng = np.random.default_rng([seed, step])
    noise = rng.random((batch_size, seq_len + 1)) < 0.1
    random_tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1))
    tokens = np.empty((batch_size, seq_len + 1), np.int64)
    tokens[:, 0] = random_tokens[:, 0]
    for t in range(1, seq_len + 1):
        tokens[:, t] = np.where(noise[:, t], random_tokens[:, t], successor[tokens[:, t - 1]])
    tokens = tokens.astype(np.int32)
    shape = (batch_size, seq_len)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, np.float32),
        "target_bytes": np.ones(shape, np.int32),
    }
