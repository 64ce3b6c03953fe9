"""Stopping cleanly on SIGTERM/SIGINT (preemption): every host saves the same step, then exits."""

from __future__ import annotations

import signal
import threading

import jax


class StopSignal:
    """SIGTERM/SIGINT: save at the current step and return cleanly, on every host together.

    One process: a Python handler sets a flag. Several processes: JAX's runtime catches SIGTERM
    on any host and agrees with the others on a step to stop at
    (`multihost_utils.reached_preemption_sync_point`, asked every step), so all save the same
    step; no Python handler is installed there, as it would replace JAX's.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def should_stop(self, step: int) -> bool:
        if self._multiprocess and self.received is None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = signal.SIGTERM
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
