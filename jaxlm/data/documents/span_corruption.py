"""T5 span-corruption batches: rows of the document cache (or synthetic rows), corrupted on host.

Each row of `raw_len` real tokens becomes encoder inputs (clean tokens, a sentinel for every
noise span, EOS) and decoder targets (each sentinel followed by the span it replaced, EOS),
right-padded to data.seq_len and data.target_len. `raw_len` is the longest row whose corrupted
lengths fit both, so no token is truncated. The corruption of row r at step s is drawn from
NumPy's generator seeded by (seed, s, r): batches stay a pure function of the step, on any
number of processes. Packed rows span document boundaries (their EOS tokens stay), as in T5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlm import objectives
from jaxlm.data.readers import DataError

# Keys of a seq2seq batch: encoder tokens and padding, decoder targets, padding and loss mask.
SEQ2SEQ_KEYS = ("inputs", "input_segment_ids", "targets", "target_segment_ids", "loss_mask")
EVAL_SALT = 0xE7A1  # keeps validation corruption apart from training steps


def raw_length(seq_len: int, target_len: int, noise_density: float, mean_span: float) -> int:
    """The longest row whose inputs and targets, each plus EOS, fit seq_len and target_len."""
    best = 0
    for length in range(2, 4 * seq_len + 2):
        inputs, targets = objectives.corrupted_lengths(length, noise_density, mean_span)
        if inputs + 1 > seq_len:
            break
        if targets + 1 <= target_len:
            best = length
    if best == 0:
        raise DataError(
            f"data.seq_len={seq_len} and data.target_len={target_len} leave no room for a "
            "corrupted row; raise them"
        )
    return best


def check_sentinels(raw_len: int, noise_density: float, mean_span: float, sentinels: int):
    """Refuse rows that could need more sentinel pieces than the tokenizer has."""
    _, spans = objectives.noise_counts(raw_len, noise_density, mean_span)
    if spans > sentinels:
        raise DataError(
            f"rows of {raw_len} tokens get {spans} noise spans but the tokenizer has {sentinels} "
            "<extra_id_N> pieces; raise data.tokenizer_sentinels (T5: 100) or lower data.seq_len"
        )


def seq2seq_batch(inputs, input_segment_ids, targets, target_segment_ids) -> dict:
    """The SEQ2SEQ_KEYS batch of padded encoder and decoder rows: every real target counts."""
    return {
        "inputs": inputs,
        "input_segment_ids": input_segment_ids,
        "targets": targets,
        "target_segment_ids": target_segment_ids,
        "loss_mask": target_segment_ids.astype(np.float32),
    }


def classify_batch(inputs, segment_ids, labels) -> dict:
    """The classification batch of padded input rows and their labels: every row counts."""
    return {
        "inputs": inputs,
        "segment_ids": segment_ids,
        "labels": np.asarray(labels, np.int32),
        "example_mask": np.ones(len(inputs), np.float32),
    }


def padded(seqs: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, width] right-padded with 0, segment ids: 1 on tokens, 0 on padding)."""
    ids = np.zeros((len(seqs), width), np.int32)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = seq
    lengths = np.array([len(seq) for seq in seqs])
    return ids, (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)


def corrupt_rows(
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    seeds: Sequence[Sequence[int]],
    *,
    sentinel_ids: Sequence[int],
    eos_id: int,
    seq_len: int,
    target_len: int,
    noise_density: float,
    mean_span: float,
) -> dict[str, np.ndarray]:
    """A seq2seq batch (SEQ2SEQ_KEYS) from token rows; segment id 0 marks padding."""
    inputs, targets = [], []
    for row, seg, seed in zip(tokens, segment_ids, seeds, strict=True):
        real = row[seg != 0]
        if len(real) < 2:  # nothing to corrupt: predict the lone token back
            inputs.append(np.array([eos_id]))
            targets.append(np.append(real, eos_id))
            continue
        enc, dec = objectives.span_corruption(
            real,
            np.random.default_rng(seed),
            sentinel_ids=sentinel_ids,
            noise_density=noise_density,
            mean_span_length=mean_span,
            eos_id=eos_id,
        )
        inputs.append(enc)
        targets.append(dec)
    return seq2seq_batch(*padded(inputs, seq_len), *padded(targets, target_len))
