"""What every part of the data layer shares: the DataSource a run reads, DataError, and the
special token ids (their one home: tokenizers are trained with them, synthetic data and
seq2seq decoding use them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

# Ids jaxlm's SentencePiece tokenizers are trained with; synthetic data uses the same.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPLITS = ("train", "validation")


class DataError(ValueError):
    """Bad data input or settings; the one-line message names the fix."""


@dataclasses.dataclass
class DataSource:
    vocab_size: int
    # (step, process_index=None, process_count=None) -> that process's rows of the global batch
    # at `step` (None: this process, from jax).
    train_batch: Callable[..., dict]
    # (max_batches (0: all), process_index=None, process_count=None) -> fixed validation
    # batches, that process's rows of each.
    eval_batches: Callable[..., list[dict]]
    tokenizer_sha256: str | None = None
    baselines: dict | None = None  # compressor bits per byte on the validation text
    packed: bool = True  # rows hold several documents: the model needs segment ids
    text: object | None = None  # the TextData behind the batches (documents only)
    mask_id: int | None = None  # the <mask> piece (masked LM); None: the tokenizer has none
    special_ids: tuple[int, ...] = ()  # ids masking and random replacement never touch
    tokenizer: object | None = None  # the run's Tokenizer (None for synthetic data)
    # Example tasks (seq2seq, classify): (max_examples (0: all)) -> validation examples in
    # order, each {"input_ids": np.ndarray, "input": str, "reference": str or "label": int}.
    eval_examples: Callable[[int], list[dict]] | None = None
    sentinel_ids: tuple[int, ...] = ()  # <extra_id_0>, <extra_id_1>, ... (span corruption)
    # What the run reads (tokenizer hash, caches, counts); training writes it to data.json.
    description: dict | None = None
