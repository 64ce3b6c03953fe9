"""Host batches onto the mesh: `to_device` makes global arrays of this process's rows, and
`Prefetcher` builds and places the next batches in a background thread while a step runs."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_device(batch: dict, batch_sh: NamedSharding) -> dict:
    """This process's rows of the global batch (DataSource.train_batch) -> global jax.Arrays."""
    n = jax.process_count()
    out = {}
    for key in batch:
        x = np.asarray(batch[key])
        global_shape = (x.shape[0] * n, *x.shape[1:])
        out[key] = jax.make_array_from_process_local_data(batch_sh, x, global_shape)
    return out


class Prefetcher:
    """Builds and places batches for steps [start, end) on device in a background thread."""

    def __init__(self, make_batch, batch_sh, start: int, end: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(make_batch, batch_sh, start, end), daemon=True
        )
        self._thread.start()

    def _work(self, make_batch, batch_sh, start, end):
        try:
            for step in range(start, end):
                item = to_device(make_batch(step), batch_sh)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Exception as e:  # surfaced to the training thread by next()
            self._queue.put(e)

    def next(self) -> dict:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
