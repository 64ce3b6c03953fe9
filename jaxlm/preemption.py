"""Stopping cleanly on SIGTERM/SIGINT (preemption): every host saves the same step, then exits.

Three moments, one process:
- before the first step has finished (setup, restore, the first compile): there is nothing new
  to save, so the run exits at once with 128 + the signal number (130 for Ctrl-C, 143 for
  SIGTERM), even in the middle of XLA's compile; nothing half-written is left behind (checkpoints
  and metrics are written only after the first step).
- during training: the step in flight finishes, a checkpoint is saved at it, and the run exits 0.
- during an evaluation: the evaluation is abandoned (`interruptible`), then as during training.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax


class Interrupted(Exception):
    """Raised inside an `interruptible` block when a stop signal arrives."""


class StopSignal:
    """SIGTERM/SIGINT: save at the current step and return cleanly, on every host together.

    One process: a Python handler sets a flag; before `started()`, a watcher thread exits the
    process at once (a Python handler would wait for the compile to return). Several processes:
    JAX's runtime catches SIGTERM on any host and agrees with the others on a step to stop at
    (`multihost_utils.reached_preemption_sync_point`, asked every step), so all save the same
    step; no Python SIGTERM handler is installed there, as it would replace JAX's. SIGINT
    (Ctrl-C) is re-sent as SIGTERM by the watcher thread, so it stops the run the same way (a
    KeyboardInterrupt would stop one process and leave the others waiting for it).
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._multiprocess = jax.process_count() > 1
        self._early = True  # no step finished yet: a signal exits at once
        self._interruptible = False
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None
        self._old_wakeup = -1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            if self._multiprocess:  # JAX's runtime keeps SIGTERM; the watcher forwards SIGINT
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, _forwarded)
            else:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._previous[sig] = signal.signal(sig, self._handle)
            # The C-level handler writes the signal number here at once, while the main thread
            # may be inside a compile that will not return to Python for minutes.
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[1], False)
            self._old_wakeup = signal.set_wakeup_fd(self._pipe[1])
            self._watcher = threading.Thread(target=self._watch, daemon=True, name="jaxlm-signals")
            self._watcher.start()
        return self

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._pipe[0], 1)
            except OSError:
                return
            if not data:
                return  # the pipe was closed by __exit__
            if self._multiprocess:
                if data[0] == signal.SIGINT:  # at once, even while the main thread compiles
                    os.kill(os.getpid(), signal.SIGTERM)
                continue
            if self._early and data[0] in (signal.SIGTERM, signal.SIGINT):
                print(
                    f"received signal {data[0]} before the first step: nothing to save, "
                    "exiting; run the same command to start (or resume) again",
                    flush=True,
                )
                os._exit(128 + data[0])

    def _handle(self, signum, frame):
        self.received = signum
        if self._interruptible:
            self._interruptible = False
            raise Interrupted(signum)

    def started(self) -> None:
        """A step has finished: from now on a signal saves at the current step."""
        self._early = False

    @contextlib.contextmanager
    def interruptible(self):
        """A signal inside the block raises Interrupted (an eval is abandoned, not finished)."""
        self._interruptible = self.received is None and not self._multiprocess
        try:
            yield
        finally:
            self._interruptible = False

    def should_stop(self, step: int) -> bool:
        if self._multiprocess and self.received is None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.received = signal.SIGTERM
        return self.received is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self._pipe[1])  # the watcher reads EOF and returns
            self._watcher.join()
            os.close(self._pipe[0])
            self._pipe = None


def _forwarded(signum, frame) -> None:
    """Python's part of SIGINT in a multi-process run: nothing (no KeyboardInterrupt); the
    watcher thread has already re-sent it as SIGTERM."""
