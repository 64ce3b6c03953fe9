"""T5 span corruption on host: the noise spans of one example, and span-corruption batches from
rows of the document cache (or synthetic rows).

Each row of `raw_len` real tokens becomes encoder inputs (clean tokens, a sentinel for every
noise span, EOS) and decoder targets (each sentinel followed by the span it replaced, EOS),
right-padded to data.seq_len and data.target_len. `raw_len` is the longest row whose corrupted
lengths fit both, so no token is truncated. The corruption of row r at step s is drawn from
NumPy's generator seeded by (seed, s, r): batches stay a pure function of the step, on any
number of processes. Packed rows span document boundaries (their EOS tokens stay), as in T5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from jaxlm.data import sampling
from jaxlm.data.batches import padded, seq2seq_batch
from jaxlm.data.documents.text import TextData
from jaxlm.data.specs import DataSpec
from jaxlm.data.types import DataError, DataSource

EVAL_SALT = 0xE7A1  # keeps validation corruption apart from training steps


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, spans): at least one of each, and never more spans than either part."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def corrupted_lengths(length: int, noise_density=0.15, mean_span_length=3.0) -> tuple[int, int]:
    """(encoder input length, target length) of a corrupted `length`-token example, no EOS."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans, num_noise + num_spans


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Bool [length]: alternating clean and noise spans of random lengths, clean first (T5)."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
    noise = _random_segmentation(num_noise, num_spans, rng)
    clean = _random_segmentation(length - num_noise, num_spans, rng)
    lengths = np.stack([clean, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), lengths)


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive integers summing to `total`, uniformly over such compositions."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def span_corruption(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    sentinel_ids: Sequence[int],
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    eos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(encoder inputs, decoder targets) for one example of real token ids [L].

    Noise span k becomes `sentinel_ids[k]` in the inputs; the targets are each sentinel followed
    by the span it replaced. Pass the tokenizer's `<extra_id_0>`, `<extra_id_1>`, ... ids in
    that order. `eos_id`, if given, ends both sequences.
    """
    tokens = np.asarray(tokens)
    noise = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    num_spans = int(starts.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(
            f"{num_spans} noise spans but only {len(sentinel_ids)} sentinel ids; pass more "
            "sentinels or shorter examples"
        )
    sentinel = np.asarray(sentinel_ids, tokens.dtype)[np.cumsum(starts) - 1]
    inputs = np.where(starts, sentinel, tokens)[~noise | starts]
    # Targets: every noise token, with its span's sentinel placed just before the span start.
    noisy = np.flatnonzero(noise)
    span_starts = starts[noisy]
    at = np.arange(len(noisy)) + np.cumsum(span_starts)  # shifted by the sentinels so far
    targets = np.empty(len(noisy) + num_spans, tokens.dtype)
    targets[at] = tokens[noisy]
    targets[at[span_starts] - 1] = sentinel[noisy][span_starts]
    if eos_id is not None:
        inputs, targets = np.append(inputs, eos_id), np.append(targets, eos_id)
    return inputs.astype(tokens.dtype), targets.astype(tokens.dtype)


def raw_length(seq_len: int, target_len: int, noise_density: float, mean_span: float) -> int:
    """The longest row whose inputs and targets, each plus EOS, fit seq_len and target_len."""
    best = 0
    for length in range(2, 4 * seq_len + 2):
        inputs, targets = corrupted_lengths(length, noise_density, mean_span)
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
    _, spans = noise_counts(raw_len, noise_density, mean_span)
    if spans > sentinels:
        raise DataError(
            f"rows of {raw_len} tokens get {spans} noise spans but the tokenizer has {sentinels} "
            "<extra_id_N> pieces; raise data.tokenizer_sentinels (T5: 100) or lower data.seq_len"
        )


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
        enc, dec = span_corruption(
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


def sentinels_of(tok) -> tuple[int, ...]:
    """The tokenizer's <extra_id_0>, <extra_id_1>, ... ids, in order."""
    out = []
    while (i := tok.sentinel_id(len(out))) is not None:
        out.append(i)
    if not out:
        raise DataError(
            f"tokenizer {tok.path} has no <extra_id_N> pieces for span corruption; set "
            "data.tokenizer_sentinels=100 to train one that has them"
        )
    return tuple(out)


def build(spec: DataSpec, tok, log: Callable[[str], None]) -> tuple[DataSource, dict]:
    """(T5 span-corruption batches from the document rows, the describe() dict)."""
    sp = spec.spans
    raw = raw_length(spec.seq_len, spec.target_len, sp.noise_density, sp.mean_span_length)
    text = TextData(spec, tok, log, row_len=raw - 1)
    return _source(spec, text, raw), text.describe()


def _source(spec: DataSpec, text: TextData, raw_len: int) -> DataSource:
    tok, sp, seed = text.tok, spec.spans, spec.seed
    sentinel_ids = sentinels_of(tok)
    check_sentinels(raw_len, sp.noise_density, sp.mean_span_length, len(sentinel_ids))

    def corrupt(rows_read, seeds):
        return corrupt_rows(
            rows_read["tokens"][:, :raw_len],
            rows_read["segment_ids"][:, :raw_len],
            seeds,
            sentinel_ids=sentinel_ids,
            eos_id=tok.eos_id,
            seq_len=spec.seq_len,
            target_len=spec.target_len,
            noise_density=sp.noise_density,
            mean_span=sp.mean_span_length,
        )

    def train_batch(step: int, process_index=None, process_count=None) -> dict:
        rows_read, index = text.train_rows(step, process_index, process_count)
        return corrupt(rows_read, [(seed, step, int(i)) for i in index])

    def eval_batches(max_batches: int, process_index=None, process_count=None) -> list[dict]:
        out = []
        # Seeded by the batch and the row's place in it: each process corrupts its own rows.
        first = sampling.process_share(spec.batch_size, process_index, process_count)
        for b, (rows_read, real) in enumerate(
            text.eval_rows(max_batches, process_index, process_count)
        ):
            seeds = [(seed, EVAL_SALT, b, first.start + i) for i in range(len(real))]
            batch = corrupt(rows_read, seeds)
            batch["loss_mask"] = batch["loss_mask"] * real[:, None]
            out.append(batch)
        return out

    return DataSource(
        tok.vocab_size,
        train_batch,
        eval_batches,
        tok.sha256,
        packed=False,
        text=text,
        special_ids=tok.special_ids,
        tokenizer=tok,
        sentinel_ids=sentinel_ids,
    )
