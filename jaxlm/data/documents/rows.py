"""Document rows: a cached split as one token stream over memory-mapped shards, cut into
model rows (packed or one document per row), and the LM arrays of a batch of rows."""

from __future__ import annotations

import pathlib

import numpy as np

from jaxlm.data import cache_format

ROW_KEYS = ("tokens", "segment_ids", "positions")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask", "target_bytes")


def files_of(manifest: dict) -> list[str]:
    """Every file a document cache's manifest refers to."""
    names = [cache_format.tokenizer_file(manifest)]
    for info in manifest["splits"].values():
        names += [n for shard in info["shards"] for n in (shard["tokens"], shard["docs"])]
    return names


class TokenSplit:
    """One split of a local cache as a single token stream over memory-mapped shards."""

    def __init__(self, directory: pathlib.Path, manifest: dict, split: str) -> None:
        info = manifest["splits"][split]
        self.directory, self.split, self.info = directory, split, info
        self.eos_id = int(manifest["eos_id"])
        self._shards = [
            cache_format.load_array(directory, s["tokens"], mmap=True) for s in info["shards"]
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
            cache_format.load_array(self.directory, s["docs"]) + start
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


def make_batch(rows: dict[str, np.ndarray], byte_lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Model-ready [B, seq_len] arrays from rows of seq_len + 1 tokens (see Rows.read)."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    # A target counts only if it continues the input's document: never padding, never the
    # first token of the next document predicted from the previous one.
    mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    targets = tokens[:, 1:]
    return {
        "inputs": tokens[:, :-1],
        "targets": targets,
        "segment_ids": seg[:, :-1],
        "positions": rows["positions"][:, :-1],
        "loss_mask": mask.astype(np.float32),
        "target_bytes": byte_lengths[targets] * mask,
    }
