"""The pre-tokenized cache: one source's splits as token shards plus a JSON manifest.

A cache directory (local or gs://) holds

    manifest.json              source, tokenizer hash, cleaning settings and counts, shards
    tokenizer.model            the tokenizer the shards were made with
    train-00000.tokens.npy     uint16 (vocabularies up to 65536) or int32: documents, each + eos
    train-00000.docs.npy       int64: end offset of every document within its shard
    validation-00000.*.npy     the same for the validation split

The manifest is written last, so a directory without one is incomplete and gets rebuilt.
Reading needs numpy only: shards are memory-mapped and rows are cut at read time, so one cache
serves every seq_len, packed or padded. Remote caches are copied to a local directory first.
"""

from __future__ import annotations

import io
import itertools
import json
import pathlib

import numpy as np

from jaxlm.data import storage
from jaxlm.data.readers import DataError

FORMAT = 1
ROW_KEYS = ("tokens", "segment_ids", "positions")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"


def root(config) -> pathlib.Path:
    """Where a run's caches live locally: data.cache_dir, by default ~/.cache/jaxlm."""
    default = pathlib.Path.home() / ".cache" / "jaxlm"
    return pathlib.Path(config.data.cache_dir or default).expanduser()


def read_manifest(directory: str) -> dict | None:
    """The directory's manifest, or None when it has none (never written or incomplete)."""
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        manifest = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); delete {directory} and re-run jaxlm-data prepare"
        ) from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path} has cache format {manifest.get('format')}, this jaxlm reads {FORMAT}; "
            "re-run jaxlm-data prepare"
        )
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    text = json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True)
    storage.write_bytes(storage.join(directory, MANIFEST), text.encode())


def files_of(manifest: dict) -> list[str]:
    """Every file a cache's manifest refers to."""
    names = [TOKENIZER]
    for info in manifest["splits"].values():
        names += [n for shard in info["shards"] for n in (shard["tokens"], shard["docs"])]
    return names


def token_dtype(vocab_size: int):
    """The id dtype on disk: uint16 for vocabularies up to 65536 (half the bytes), else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


class ShardWriter:
    """Appends tokenized documents (eos added) to one split, cutting shards at document ends."""

    def __init__(self, directory: str, split: str, vocab_size: int, eos_id: int, shard_tokens: int):
        self.directory, self.split, self.eos_id = directory, split, eos_id
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._parts: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: list[list[int]]) -> int:
        """Append documents; returns the tokens added (eos included)."""
        if not ids:
            return 0
        lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
        ends = np.cumsum(lengths)
        stream = np.empty(int(ends[-1]), self.dtype)
        is_text = np.ones(stream.shape[0], bool)
        is_text[ends - 1] = False
        text_tokens = stream.shape[0] - len(ids)
        stream[is_text] = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, text_tokens)
        stream[ends - 1] = self.eos_id
        first, start = 0, 0
        while first < len(ids):  # fill shards to shard_tokens, cutting at document ends
            room = self.shard_tokens - self._buffered
            last = max(int(np.searchsorted(ends, start + room)), first)
            stop = min(last + 1, len(ids))
            self._parts.append(stream[start : ends[stop - 1]])
            self._lengths.append(lengths[first:stop])
            self._buffered += int(ends[stop - 1]) - start
            if self._buffered >= self.shard_tokens:
                self._flush()
            first, start = stop, int(ends[stop - 1])
        return stream.shape[0]

    def _flush(self) -> None:
        if not self._parts:
            return
        tokens = np.concatenate(self._parts)
        ends = np.cumsum(np.concatenate(self._lengths))
        # Rows find documents by their eos: a tokenizer that emits eos from text breaks that.
        if int(np.count_nonzero(tokens == self.eos_id)) != ends.shape[0]:
            raise DataError(
                "the tokenizer produced its eos id from plain text, so documents cannot be "
                "told apart; use a SentencePiece model whose eos is a control symbol"
            )
        name = f"{self.split}-{len(self.shards):05d}"
        for suffix, array in (("tokens", tokens), ("docs", ends)):
            buf = io.BytesIO()
            np.save(buf, array)
            storage.write_bytes(
                storage.join(self.directory, f"{name}.{suffix}.npy"), buf.getvalue()
            )
        self.shards.append(
            {
                "tokens": f"{name}.tokens.npy",
                "docs": f"{name}.docs.npy",
                "num_tokens": int(tokens.shape[0]),
                "num_docs": int(ends.shape[0]),
            }
        )
        self._parts, self._lengths, self._buffered = [], [], 0

    def close(self) -> dict:
        """Write the last shard; the split's manifest entry."""
        self._flush()
        return {
            "shards": self.shards,
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_docs": sum(s["num_docs"] for s in self.shards),
        }


class TokenSplit:
    """One split of a local cache as a single token stream over memory-mapped shards."""

    def __init__(self, directory: pathlib.Path, manifest: dict, split: str) -> None:
        info = manifest["splits"][split]
        self.directory, self.split, self.info = directory, split, info
        self.eos_id = int(manifest["eos_id"])
        # Plain ndarray views of the memory maps: np.memmap's indexing is slower.
        self._shards = [
            np.asarray(np.load(directory / s["tokens"], mmap_mode="r")) for s in info["shards"]
        ]
        sizes = np.array([s.shape[0] for s in self._shards], np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._sizes = np.append(sizes, 0)  # a start at the very end has an empty shard
        self._windows: dict[tuple[int, int], np.ndarray] = {}
        self.num_tokens = int(self.bounds[-1])
        self.num_docs = int(info["num_docs"])
        self.num_bytes = int(info["num_bytes"])

    def doc_ends(self) -> np.ndarray:
        """int64 [num_docs]: end offset of every document in the stream (read on demand)."""
        parts = [
            np.load(self.directory / s["docs"]) + start
            for s, start in zip(self.info["shards"], self.bounds[:-1], strict=True)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _window(self, shard: int, length: int) -> np.ndarray:
        """[n - length + 1, length] view of a shard: row gathers become row copies."""
        key = (shard, length)
        if key not in self._windows:
            view = np.lib.stride_tricks.sliding_window_view(self._shards[shard], length)
            self._windows[key] = view
        return self._windows[key]

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int32 [len(starts), length]: stream[start : start + length]; -1 past the end."""
        starts = np.asarray(starts, np.int64)
        shard = np.searchsorted(self.bounds, starts, "right") - 1
        local = starts - self.bounds[shard]
        fits = local + length <= self._sizes[shard]  # wholly inside one shard
        if starts.size and fits.all() and (shard == shard[0]).all():  # the usual case
            return self._window(int(shard[0]), length)[local].astype(np.int32)
        out = np.full((starts.shape[0], length), -1, np.int32)
        for s in np.unique(shard[fits]):
            rows = np.flatnonzero(fits & (shard == s))
            out[rows] = self._window(s, length)[local[rows]]
        for r in np.flatnonzero(~fits):  # across a shard boundary or the stream end: rare
            end = min(starts[r] + length, self.num_tokens)
            pieces = [
                self._shards[k][max(starts[r], lo) - lo : min(end, hi) - lo]
                for k in range(shard[r], len(self._shards))
                for lo, hi in [(self.bounds[k], self.bounds[k + 1])]
                if lo < end
            ]
            out[r, : end - starts[r]] = np.concatenate(pieces)
        return out


class Rows:
    """A split cut into model rows of seq_len + 1 tokens.

    Packed: the stream cut every seq_len tokens (consecutive rows share one token, so every
    token is a target exactly once). Padded: one chunk of one document per row, padded at the
    end. Segment ids count documents within a row from 1 (0 is padding); positions restart at
    every document and at every row start.
    """

    def __init__(self, split: TokenSplit, seq_len: int, pack: bool) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.split, self.seq_len, self.pack = split, seq_len, pack
        if pack:
            self.num_rows = max(0, -(-(split.num_tokens - 1) // seq_len))
        else:
            self._doc_ends = split.doc_ends()
            self._doc_starts = np.concatenate([[0], self._doc_ends[:-1]]).astype(np.int64)
            chunks = np.maximum(-(-(self._doc_ends - self._doc_starts - 1) // seq_len), 0)
            self._cum_rows = np.cumsum(chunks)
            self.num_rows = int(self._cum_rows[-1]) if chunks.size else 0

    def spans(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stream start, tokens in the row) of each row."""
        row_ids = np.asarray(row_ids, np.int64)
        if self.pack:
            starts = row_ids * self.seq_len
            return starts, np.minimum(self.seq_len + 1, self.split.num_tokens - starts)
        doc = np.searchsorted(self._cum_rows, row_ids, "right")
        before = np.where(doc > 0, self._cum_rows[doc - 1], 0)
        starts = self._doc_starts[doc] + (row_ids - before) * self.seq_len
        return starts, np.minimum(self.seq_len + 1, self._doc_ends[doc] - starts)

    def read(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """int32 [B, seq_len + 1] tokens, segment_ids and positions of the rows."""
        starts, lengths = self.spans(row_ids)
        width = self.seq_len + 1
        offsets = np.arange(width, dtype=np.int32)
        tokens = self.split.gather(starts, width)
        short = bool((lengths < width).any())  # padded rows, or the stream's last row
        if short:
            valid = offsets < lengths[:, None]
            tokens = np.where(valid, tokens, 0)
        # Documents end with eos, so a new one starts after every eos and at every row start.
        is_start = np.empty(tokens.shape, bool)
        is_start[:, 0] = True
        np.equal(tokens[:, :-1], self.split.eos_id, out=is_start[:, 1:])
        segment_ids = np.cumsum(is_start, axis=1, dtype=np.int32)
        positions = offsets - np.maximum.accumulate(np.where(is_start, offsets, 0), axis=1)
        if short:
            segment_ids *= valid
            positions *= valid
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}
