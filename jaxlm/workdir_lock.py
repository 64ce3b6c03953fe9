"""One trainer per workdir: WORKDIR/jaxlm.lock holds the pid, host and a heartbeat time.

A second `jaxlm-train` on a workdir in use is refused at once, naming the pid and host holding
it. A lock left by a killed run does not block: on the same host its process is gone, or its pid
is ours (a container restarted with the same hostname and pid); on any host its heartbeat,
refreshed every HEARTBEAT_S by a thread, stops and the lock expires after EXPIRE_S. Local paths
and gs:// alike (etils.epath); on local disks, judging and taking the lock happen under an
flock of the workdir, so two launches cannot both take over one stale lock. Only process 0 of a
multi-process run takes it, and every process learns the outcome (`agree`): a refusal stops all
of them with the same line, rather than leaving the others waiting in collectives.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from etils import epath

LOCK_NAME = "jaxlm.lock"
HEARTBEAT_S = 30.0
EXPIRE_S = 300.0
HALF_WRITTEN_S = 5.0
_MESSAGE_BYTES = 1024
_HELD: set[str] = set()  # tokens of the locks this process holds


class WorkdirError(RuntimeError):
    """The workdir is in use by another trainer, or not writable; the message names the fix."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


class WorkdirLock:
    """Context manager: take WORKDIR/jaxlm.lock (or refuse), refresh it, remove it on exit."""

    def __init__(self, workdir: str | Path, enabled: bool = True, agree: bool = False):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self.agree = agree  # gather every process's outcome (a collective: all must call it)
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "token": os.urandom(8).hex()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WorkdirLock:
        error = None
        try:
            self._enter()
        except WorkdirError as e:
            if not self.agree:
                raise
            error = e
        if self.agree and (error := _agree(error)) is not None:
            self.__exit__(None, None, None)  # another process failed: release what we took
            raise error from None
        return self

    def _enter(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.enabled:
                with _exclusive(self.path.parent):
                    self._take()
                    _HELD.add(self.mine["token"])
        except OSError as e:
            raise WorkdirError(
                f"workdir {self.path.parent} is not writable ({e.strerror or e}): pick a "
                "--workdir you can write to, or fix its permissions"
            ) from None

    def _take(self) -> None:
        held = self._read()
        if held is not None:
            if not self._stale(held):
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by pid {held.get('pid')} on host "
                    f"{held.get('host')} (since {_when(held.get('started'))}, lock "
                    f"{self.path}): wait for that run or stop it, or pick another --workdir"
                )
            print(
                f"taking over {self.path}: its run (pid {held.get('pid')} on "
                f"{held.get('host')}) is no longer running",
                flush=True,
            )
        if held is None and not self._create_exclusive():
            return self._take()  # another launch created it just now: judge it like any lock
        if held is not None:
            self._write(started=time.time())
        # Two launches at once (gs:// has no exclusive create): the last write wins, and the
        # other sees a token not its own.
        if (self._read() or {}).get("token") != self.mine["token"]:
            raise WorkdirError(
                f"workdir {self.path.parent} was taken by another launch at the same moment; "
                "run one trainer per workdir"
            )
        self._thread = threading.Thread(target=self._beat, daemon=True, name="jaxlm-lock")
        self._thread.start()

    def __exit__(self, *exc) -> None:
        _HELD.discard(self.mine["token"])
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        try:
            if (self._read() or {}).get("token") == self.mine["token"]:
                self.path.unlink()
        except OSError:
            pass  # a stale lock does not block the next run

    def _stale(self, held: dict) -> bool:
        if time.time() - float(held.get("heartbeat", 0)) > EXPIRE_S:
            return True
        if held.get("host") != self.mine["host"]:
            return False
        pid = int(held.get("pid", -1))
        # Our own pid but not a lock of this process: a restarted container's earlier life.
        reused = pid == os.getpid() and held.get("token") not in _HELD
        return reused or not _alive(pid)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            # Being written by a launch this instant, or half written by a killed one: stale
            # once it has stayed so for a few seconds.
            return {"heartbeat": self.path.stat().mtime - EXPIRE_S + HALF_WRITTEN_S}

    def _write(self, started: float) -> None:
        self._started = started
        record = {**self.mine, "started": started, "heartbeat": time.time()}
        tmp = self.path.parent / f"{LOCK_NAME}.{self.mine['token']}.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)

    def _create_exclusive(self) -> bool:
        """Create the lock if none exists (atomic on local disks); False if one does."""
        if str(self.path).startswith("gs://"):
            self._write(started=time.time())  # no O_EXCL on GCS: the token read-back decides
            return True
        self._started = time.time()
        record = {**self.mine, "started": self._started, "heartbeat": self._started}
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(self._started)
            except OSError:
                pass  # the next beat retries; a full disk is reported by the run's own writes


def _agree(error: WorkdirError | None) -> WorkdirError | None:
    """The first error of any process (None if none), on every process: each sends its message
    (empty if it succeeded) in a fixed-size byte row to all."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    row = np.zeros(_MESSAGE_BYTES, np.uint8)
    message = str(error).encode()[:_MESSAGE_BYTES] if error is not None else b""
    row[: len(message)] = np.frombuffer(message, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))
    for i, got in enumerate(rows):
        text = bytes(got).rstrip(b"\0").decode(errors="replace")
        if text:
            return WorkdirError(text if i == jax.process_index() else f"process {i}: {text}")
    return None


@contextlib.contextmanager
def _exclusive(directory):
    """An flock of a local `directory` (released if the process dies); nothing for gs://."""
    if str(directory).startswith("gs://"):
        yield
        return
    fd = os.open(os.fspath(directory), os.O_RDONLY)
    try:
        # Best effort: NFS emulates flock with byte-range locks, which a directory opened
        # read-only cannot take (EBADF); the token read-back still catches most races there.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _when(t) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError):
        return "an unknown time"
