"""Synthetic data for every objective: learnable, seeded, and free of TensorFlow and text.

Tokens come from a seeded Markov chain (pipeline.synthetic_batch). Per objective:
lm: the chain itself; mlm: the same, with the last id reserved as <mask>;
span_corruption: chain rows corrupted like text rows (the last 16 ids are the sentinels);
seq2seq: copy a chain of random length (targets: its first target_len - 1 tokens, then EOS);
classify: a chain of random length labelled by its first token modulo num_classes.
Ids 0 (padding) and 1 (EOS) are kept out of the example tasks' chains. Validation batches use
steps no run reaches, so they never appear in training.
"""

from __future__ import annotations

import numpy as np

from jaxlm.data import pipeline, spans
from jaxlm.data.source import DataSource

EVAL_STEP_OFFSET = 2**40
PAD_ID, EOS_ID = 0, 1
NUM_SENTINELS = 16


def make_source(config) -> DataSource:
    d, objective = config.data, config.task.objective
    vocab = config.model.vocab_size or d.tokenizer_vocab_size
    make = {
        "lm": _lm,
        "mlm": _lm,
        "span_corruption": _span_corruption,
        "seq2seq": _seq2seq,
        "classify": _classify,
    }[objective]
    global_batch, extra = make(config, vocab)

    def batch(step: int, process_index=None, process_count=None) -> dict:
        share = pipeline.process_share(d.batch_size, process_index, process_count)
        return {k: v[share] for k, v in global_batch(step).items()}

    def eval_batches(n: int, process_index=None, process_count=None) -> list[dict]:
        return [batch(EVAL_STEP_OFFSET + i, process_index, process_count) for i in range(n or 4)]

    return DataSource(vocab, batch, eval_batches, packed=False, **extra)


def _lm(config, vocab: int):
    d, seed = config.data, config.train.seed
    # Masked LM reserves the last id as <mask>: the chain never emits it.
    mask_id = vocab - 1 if config.task.objective == "mlm" else None
    chain_vocab = vocab if mask_id is None else mask_id

    def global_batch(step: int) -> dict:
        out = pipeline.synthetic_batch(step, d.batch_size, d.seq_len, chain_vocab, seed)
        out["target_bytes"] = np.zeros_like(out["target_bytes"])  # no text: no bits per byte
        return out

    return global_batch, {"mask_id": mask_id}


def _chains(step: int, config, vocab: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, length] in [2, vocab), random lengths in [length // 2, length])."""
    d, seed = config.data, config.train.seed
    raw = pipeline.synthetic_batch(step, d.batch_size, length, vocab - 2, seed)["inputs"]
    lengths = np.random.default_rng([seed, step, 0x1E6]).integers(
        max(length // 2, 1), length + 1, d.batch_size
    )
    return raw + 2, lengths


def _span_corruption(config, vocab: int):
    d, t, seed = config.data, config.task, config.train.seed
    sentinel_ids = tuple(range(vocab - 1, vocab - 1 - NUM_SENTINELS, -1))
    raw = spans.raw_length(d.seq_len, d.target_len, t.noise_density, t.mean_span_length)
    spans.check_sentinels(raw, t.noise_density, t.mean_span_length, NUM_SENTINELS)

    def global_batch(step: int) -> dict:
        tokens = pipeline.synthetic_batch(step, d.batch_size, raw, vocab - NUM_SENTINELS, seed)
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


def _seq2seq(config, vocab: int):
    d = config.data

    def global_batch(step: int) -> dict:
        tokens, lengths = _chains(step, config, vocab, d.seq_len - 1)
        sources = [np.append(row[:n], EOS_ID) for row, n in zip(tokens, lengths, strict=True)]
        targets = [
            np.append(row[: min(n, d.target_len - 1)], EOS_ID)
            for row, n in zip(tokens, lengths, strict=True)
        ]
        return spans.seq2seq_batch(
            *spans.padded(sources, d.seq_len), *spans.padded(targets, d.target_len)
        )

    return global_batch, {}


def _classify(config, vocab: int):
    d, classes = config.data, config.model.num_classes

    def global_batch(step: int) -> dict:
        tokens, lengths = _chains(step, config, vocab, d.seq_len - 1)
        rows = [np.append(row[:n], EOS_ID) for row, n in zip(tokens, lengths, strict=True)]
        return spans.classify_batch(*spans.padded(rows, d.seq_len), tokens[:, 0] % classes)

    return global_batch, {}
