"""Batch arrays of one example per row, shared by example tasks, span corruption and synthetic
data: padded encoder/decoder rows (seq2seq) and padded inputs with labels (classify)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Keys of a seq2seq batch: encoder tokens and padding, decoder targets, padding and loss mask.
SEQ2SEQ_KEYS = ("inputs", "input_segment_ids", "targets", "target_segment_ids", "loss_mask")


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
