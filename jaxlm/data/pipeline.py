"""Tokenize + pack splits into fixed rows, and address batches by (seed, step).

Data order is a pure function of (seed, step), so resuming needs no iterator state. Nothing
here imports TensorFlow at module import; only the TFDS-backed source path pulls it in.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import lzma
import os
import pathlib
import tempfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from jaxlm.data import corpus
from jaxlm.data.tokenizer import Tokenizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "target_bytes")
# Bumped when the on-disk layout of packed caches changes, so stale files are rebuilt.
_PACKED_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """A split packed into rows of seq_len + 1 tokens (consecutive rows overlap by one)."""

    tokens: np.ndarray  # int32 [num_rows, seq_len + 1]
    segment_ids: np.ndarray  # int32 [num_rows, seq_len + 1]; 0 = padding, 1, 2, ... per doc
    positions: np.ndarray  # int32 [num_rows, seq_len + 1]; resets at doc and row starts
    num_docs: int
    num_bytes: int  # UTF-8 bytes of the split's text

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1]) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in the packed stream (documents plus one eos each)."""
        if self.num_rows == 0:
            return 0
        return self.num_rows * self.seq_len + 1 - int((self.segment_ids[-1] == 0).sum())


def _texts_of(texts_ds: Any) -> list[str]:
    """Texts from a tf.data dataset of {"text": ...} dicts or from an iterable of str."""
    if hasattr(texts_ds, "as_numpy_iterator"):  # tf.data.Dataset, detected without importing TF
        texts_only = texts_ds.map(lambda ex: ex["text"]) if _is_dict_ds(texts_ds) else texts_ds
        return [t.decode("utf-8") for t in texts_only.as_numpy_iterator()]
    return [t if isinstance(t, str) else t.decode("utf-8") for t in texts_ds]


def _is_dict_ds(ds: Any) -> bool:
    return isinstance(ds.element_spec, dict)


def _pack_stream(
    stream: np.ndarray, doc_starts: np.ndarray, seq_len: int
) -> tuple[np.ndarray, ...]:
    """Cut a token stream into overlapping rows with per-row segment ids and positions."""
    length = stream.shape[0]
    if length <= 1:  # Nothing to predict.
        empty = np.zeros((0, seq_len + 1), np.int32)
        return empty, empty.copy(), empty.copy()
    num_rows = -(-(length - 1) // seq_len)
    idx = np.arange(num_rows, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    valid = idx < length
    idx = np.minimum(idx, length - 1)
    # Document of every stream position, and each position's offset inside its document.
    doc_of = np.repeat(np.arange(doc_starts.shape[0] - 1), np.diff(doc_starts))
    offset = np.arange(length) - doc_starts[doc_of]
    tokens = np.where(valid, stream[idx], 0).astype(np.int32)
    row_doc = doc_of[idx]
    segment_ids = np.where(valid, row_doc - row_doc[:, :1] + 1, 0).astype(np.int32)
    # A document that started in an earlier row restarts its positions at this row's start.
    positions = np.minimum(offset[idx], np.arange(seq_len + 1)[None, :])
    positions = np.where(valid, positions, 0).astype(np.int32)
    return tokens, segment_ids, positions


def pack_split(texts_ds: Any, tokenizer: Tokenizer, seq_len: int) -> PackedSplit:
    """Tokenize every document, append eos, concatenate in order and cut into rows."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    texts = _texts_of(texts_ds)
    ids = tokenizer.encode_batch(texts) if texts else []
    lengths = np.array([len(x) + 1 for x in ids], np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    eos = [tokenizer.eos_id]
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids),
        dtype=np.int32,
        count=int(doc_starts[-1]),
    )
    tokens, segment_ids, positions = _pack_stream(stream, doc_starts, seq_len)
    return PackedSplit(
        tokens=tokens,
        segment_ids=segment_ids,
        positions=positions,
        num_docs=len(texts),
        num_bytes=sum(len(t.encode("utf-8")) for t in texts),
    )


def packed_cache_path(
    cache_dir: str | os.PathLike[str],
    source_key: str,
    tokenizer: Tokenizer,
    seq_len: int,
    split: str,
) -> pathlib.Path:
    """Where load_packed keeps a packed split."""
    name = f"{source_key}_{tokenizer.sha256[:12]}_{seq_len}_{split}.npz"
    return pathlib.Path(cache_dir) / "packed" / name


def _save_packed(path: pathlib.Path, packed: PackedSplit) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(
        buf,
        tokens=packed.tokens,
        segment_ids=packed.segment_ids,
        positions=packed.positions,
        num_docs=np.int64(packed.num_docs),
        num_bytes=np.int64(packed.num_bytes),
        format=np.int64(_PACKED_FORMAT),
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _load_packed_file(path: pathlib.Path, seq_len: int) -> PackedSplit | None:
    """The cached split, or None if the file is unreadable or from another layout."""
    try:
        with np.load(path) as z:
            if int(z["format"]) != _PACKED_FORMAT or z["tokens"].shape[1] != seq_len + 1:
                return None
            return PackedSplit(
                tokens=z["tokens"],
                segment_ids=z["segment_ids"],
                positions=z["positions"],
                num_docs=int(z["num_docs"]),
                num_bytes=int(z["num_bytes"]),
            )
    except (OSError, ValueError, KeyError):
        return None


def _source_texts(source_key: str, split: str, cache_dir: pathlib.Path) -> Any:
    """The split's documents for a known source (tf.data dataset for the TFDS-backed one)."""
    if source_key in ("python_stdlib", corpus.default_source_key()):
        from jaxlm.data import stdlib_builder  # Lazy: pulls in TensorFlow.

        return stdlib_builder.load_split(split, data_dir=str(cache_dir / "tfds"))
    raise ValueError(
        f"unknown data source {source_key!r}; expected 'python_stdlib' or "
        f"{corpus.default_source_key()!r} (the running interpreter's standard library)"
    )


def load_packed(
    split: str,
    tokenizer: Tokenizer,
    seq_len: int,
    cache_dir: str | os.PathLike[str],
    source_key: str,
    texts_fn: Callable[[], Iterable[str]] | None = None,
) -> PackedSplit:
    """Packed split from the .npz cache, packing (and caching) it on a miss.

    texts_fn, if given, supplies the documents instead of the named source.
    """
    cache_dir = pathlib.Path(cache_dir)
    path = packed_cache_path(cache_dir, source_key, tokenizer, seq_len, split)
    if path.is_file():
        cached = _load_packed_file(path, seq_len)
        if cached is not None:
            return cached
    texts = texts_fn() if texts_fn is not None else _source_texts(source_key, split, cache_dir)
    packed = pack_split(texts, tokenizer, seq_len)
    _save_packed(path, packed)
    return packed


def make_batch(
    split: PackedSplit, row_ids: np.ndarray, byte_lengths: np.ndarray
) -> dict[str, np.ndarray]:
    """Model-ready [B, seq_len] arrays for the given rows."""
    row_ids = np.asarray(row_ids, np.int64)
    tokens = split.tokens[row_ids]
    seg = split.segment_ids[row_ids]
    # A target counts only if it continues the input's document: never padding, never the
    # first token of the next document predicted from the previous one.
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    targets = tokens[:, 1:]
    return {
        "inputs": tokens[:, :-1],
        "targets": targets,
        "segment_ids": seg[:, :-1],
        "positions": split.positions[row_ids][:, :-1],
        "loss_mask": mask.astype(np.float32),
        "target_bytes": (np.asarray(byte_lengths, np.int32)[targets] * mask).astype(np.int32),
    }


class StepSampler:
    """Rows of the global batch at any step, as a pure function of (seed, step)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise ValueError("no data: the split has no rows; use more text or a shorter seq_len")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """Row order of an epoch."""
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            # Consecutive steps touch at most two epochs; keep only a few permutations.
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def rows_for_step(self, step: int) -> np.ndarray:
        """int64 [batch_size] row indices of the global batch at this step."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        start = step * self.batch_size
        epoch, offset = divmod(start, self.num_rows)
        parts, need = [], self.batch_size
        while need > 0:  # A batch may straddle one (or, for tiny splits, several) epochs.
            take = self.permutation(epoch)[offset : offset + need]
            parts.append(take)
            need -= take.shape[0]
            epoch, offset = epoch + 1, 0
        return np.concatenate(parts).astype(np.int64)


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


def compression_bits_per_byte(texts: list[str]) -> dict[str, float]:
    """Bits per byte of zlib -9 and xz -9 on the texts joined with "\\n", as UTF-8."""
    data = "\n".join(texts).encode("utf-8")
    if not data:
        raise ValueError("compression_bits_per_byte needs non-empty text")
    return {
        "zlib-9": 8.0 * len(zlib.compress(data, 9)) / len(data),
        "xz-9": 8.0 * len(lzma.compress(data, preset=9)) / len(data),
    }
