"""The sampling order both pipelines share: which rows make the global batch at step s, which
of them a process reads, and the fixed evaluation set in full batches with fill rows.

The rows of the global batch at step s are a pure function of (seed, s, data spec), so a
resumed run needs no iterator state, and any number of processes can each compute the same
global batch and read only their own share of it. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

# Epoch permutations of up to this many rows are computed whole and kept (one per order);
# larger splits permute row by row, so memory does not grow with the data.
_WHOLE_PERMUTATION_ROWS = 1 << 22


def process_share(
    batch_size: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """A process's contiguous rows of the global batch (the batch sharding's layout); by
    default this process's, as JAX numbers it."""
    if process_index is None or process_count is None:
        import jax  # only here: the rest of this module is numpy

        process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size % process_count:
        raise ValueError(
            f"data.batch_size={batch_size} does not divide over {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fast, well-mixed hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_permutation(idx: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """perm[idx] for a pseudo-random permutation of range(n) chosen by keys, in O(len(idx)).

    A 4-round Feistel network is a bijection on [0, 4**h); cycle walking (re-applying it to
    values >= n) restricts it to a bijection on [0, n) without materializing the permutation.
    """
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << np.uint64(half)) | right

    y = feistel(np.asarray(idx, np.uint64))
    while (out := y >= n).any():
        y[out] = feistel(y[out])
    return y.astype(np.int64)


class RowOrder:
    """An endless order of a split's rows: epoch e is a permutation keyed by (seed, salt, e)."""

    def __init__(self, num_rows: int, seed: int, salt: int = 0, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise ValueError("no data: the split has no rows; use more text or a shorter seq_len")
        self.num_rows, self.seed, self.salt, self.shuffle = num_rows, seed, salt, shuffle
        self._whole: tuple[int, np.ndarray] | None = None

    def _keys(self, epoch: int) -> np.ndarray:
        seq = np.random.SeedSequence([self.seed, self.salt, epoch])
        return seq.generate_state(4, np.uint64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The row order of one epoch."""
        if self._whole is not None and self._whole[0] == epoch:
            return self._whole[1]
        idx = np.arange(self.num_rows, dtype=np.int64)
        perm = keyed_permutation(idx, self.num_rows, self._keys(epoch)) if self.shuffle else idx
        self._whole = (epoch, perm)
        return perm

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """int64 row ids at these positions of the endless order."""
        epochs, offsets = np.divmod(np.asarray(positions, np.int64), self.num_rows)
        if not self.shuffle or offsets.size == 0:
            return offsets
        if epochs[0] == epochs[-1]:  # positions of a step are consecutive: usually one epoch
            return self._permute(int(epochs[0]), offsets)
        out = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            at = epochs == epoch
            out[at] = self._permute(int(epoch), offsets[at])
        return out

    def _permute(self, epoch: int, offsets: np.ndarray) -> np.ndarray:
        if self.num_rows <= _WHOLE_PERMUTATION_ROWS:
            return self.permutation(epoch)[offsets]
        return keyed_permutation(offsets, self.num_rows, self._keys(epoch))


def source_counts(weights: np.ndarray, slots: int) -> np.ndarray:
    """Rows each source gets among the first `slots` slots: floor(w * slots), the largest
    source taking the remainder. Non-decreasing in `slots`, so per-step counts are differences
    of prefix counts and a step needs no history."""
    counts = np.floor(weights * float(slots)).astype(np.int64)
    big = int(np.argmax(weights))
    counts[big] = slots - (counts.sum() - counts[big])
    return counts


class StepSampler:
    """(source, row) for every slot of the global batch at any step: a pure function of
    (seed, step, sizes, weights). Each source walks its own endless RowOrder."""

    def __init__(
        self,
        num_rows: Sequence[int],
        weights: Sequence[float],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        w = np.asarray(weights, np.float64)
        self.weights = w / w.sum()
        if self.weights.max() * batch_size < len(w) - 1:  # see source_counts
            raise ValueError(
                f"data.batch_size={batch_size} is too small for a mixture of {len(w)} sources; "
                f"use at least {int(np.ceil((len(w) - 1) / self.weights.max()))}"
            )
        self.batch_size, self.seed = batch_size, seed
        self.orders = [RowOrder(n, seed, salt=i, shuffle=shuffle) for i, n in enumerate(num_rows)]

    def rows_for_step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, row id) int64 arrays of the global batch at this step."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if len(self.orders) == 1:
            positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
            return np.zeros(self.batch_size, np.int64), self.orders[0].rows(positions)
        before = source_counts(self.weights, step * self.batch_size)
        after = source_counts(self.weights, (step + 1) * self.batch_size)
        sources = np.repeat(np.arange(len(self.orders)), after - before)
        rows = np.concatenate(
            [
                order.rows(np.arange(b, a))
                for order, b, a in zip(self.orders, before, after, strict=True)
            ]
        )
        # Interleave the sources so that every process's share is a mixture too.
        slots = np.random.default_rng([self.seed, 0x5107, step]).permutation(self.batch_size)
        return sources[slots], rows[slots]


def eval_rows(
    num_rows: Sequence[int], weights: Sequence[float], batch_size: int, max_batches: int
) -> tuple[np.ndarray, np.ndarray]:
    """(source, row) of a fixed evaluation set in order: every row of every source
    (max_batches 0), or max_batches * batch_size rows shared by weight, each source from
    its first row."""
    n = np.asarray(num_rows, np.int64)
    if max_batches > 0:
        w = np.asarray(weights, np.float64)
        n = np.minimum(n, source_counts(w / w.sum(), max_batches * batch_size))
    sources = np.repeat(np.arange(len(n)), n)
    rows = np.concatenate([np.arange(k) for k in n]) if len(n) else np.zeros(0, np.int64)
    return sources, rows


def eval_slots(
    total: int, batch_size: int, process_index: int | None = None, process_count=None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per validation batch, in order: (positions in the fixed evaluation set of this
    process's rows, which of them are real). The last batch is filled up to batch_size with
    repeated positions whose rows must count nothing (fill rows)."""
    share = process_share(batch_size, process_index, process_count)
    for start in range(0, total, batch_size):
        positions = np.resize(np.arange(start, min(start + batch_size, total)), batch_size)
        real = np.arange(start, start + batch_size) < total
        yield positions[share], real[share]
