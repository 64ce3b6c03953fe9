"""Joining a multi-process run: one JAX process per host (TPU pod worker, GPU node, SLURM task).

`initialize` calls `jax.distributed.initialize` when the command line or the environment asks for
it: explicitly with a coordinator address (GPU clusters, local tests), or by auto-detection on
Cloud TPU pods, SLURM and Open MPI. A single process on one machine needs none of it.

`deadline(where, seconds)` bounds a block holding collectives: when processes run different
steps, a collective waits forever; the deadline ends such a hang with one line saying where
each process is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

import jax

# Set by the launcher on hosts that belong to a multi-host job; a single host sets none of them.
_CLUSTER_ENV = {
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # Cloud TPU pod slice: one name per worker
    "MEGASCALE_COORDINATOR_ADDRESS": bool,  # Cloud TPU multislice
    "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1,
}


def cluster_detected(environ=os.environ) -> bool:
    return any(k in environ and test(environ[k]) for k, test in _CLUSTER_ENV.items())


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    environ=os.environ,
) -> bool:
    """Start JAX's multi-process runtime when asked or detected; True when it was started.

    Explicit arguments fall back to JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. `auto` (or a detected cluster) lets JAX find its peers itself.
    """
    address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(environ["JAX_NUM_PROCESSES"])
    if process_id is None and environ.get("JAX_PROCESS_ID"):
        process_id = int(environ["JAX_PROCESS_ID"])
    if address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "--coordinator_address needs --num_processes and --process_id "
                "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id {process_id} must be in [0, {num_processes})")
    elif num_processes is not None or process_id is not None:
        raise ValueError("--num_processes and --process_id need --coordinator_address HOST:PORT")
    elif not (auto or cluster_detected(environ)):
        return False
    # CPU processes exchange collectives over gloo; other backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes, process_id)
    return True


_WHERE = "jaxlm/where/"  # key-value store directory: each process's place, for hang reports
HANG_EXIT_CODE = 3


def _client():
    from jax._src import distributed as jax_distributed  # the coordinator's key-value store

    return jax_distributed.global_state.client


def _publish(place: tuple[str, float]) -> None:
    text, since = place
    record = json.dumps({"place": text, "time": since})
    _client().key_value_set(f"{_WHERE}{jax.process_index()}", record, allow_overwrite=True)


def where_processes() -> str:
    """'process 0: in eval batch 3 of 9 (41 s ago); process 1: ...', the places the processes
    published last ('no report' for one that published none)."""
    now, places = time.time(), {}
    with contextlib.suppress(Exception):  # the coordinator may be gone: report what is known
        for key, value in _client().key_value_dir_get(_WHERE):
            record = json.loads(value)
            places[int(key.rsplit("/", 1)[-1])] = (
                f"{record['place']} ({now - record['time']:.0f} s ago)"
            )
    return "; ".join(
        f"process {i}: {places.get(i, 'no report')}" for i in range(jax.process_count())
    )


def _hang(where: str, timeout_s: float) -> None:
    me, n = jax.process_index(), jax.process_count()
    print(
        f"jaxlm: process {me} of {n} waited {timeout_s:g} s in {where} for the others "
        f"({where_processes()}); stopping, as a collective that another process never joins "
        "waits forever. If a step can take this long, raise --config.train.hang_timeout",
        file=sys.stderr,
        flush=True,
    )
    os._exit(HANG_EXIT_CODE)  # the main thread is blocked inside a collective: no unwinding


class Watch:
    """One daemon thread that watches the blocks of `deadline` and publishes this process's place.

    Entering and leaving a block only records the place and the expiry under a lock: each eval
    batch of a multi-process run passes through a block, and a key-value store round trip plus a
    timer thread per block cost more than a small eval step. The thread publishes the place when
    it changed, at most every `publish_every` seconds (a hang report comes after seconds, and
    gives each place's own time), and calls on_timeout(where, timeout_s) once when a block
    outlives its deadline, after publishing the place that block is in.
    """

    def __init__(self, publish=_publish, publish_every: float = 0.5):
        self._publish, self._every = publish, publish_every
        self._cond = threading.Condition()
        self._place: tuple[str, float] | None = None  # (text, time.time() when it was entered)
        self._expiry: tuple | None = None  # (monotonic time, where, timeout_s, on_timeout)
        self._published: tuple[str, float] | None = None
        threading.Thread(target=self._run, name="jaxlm-deadline", daemon=True).start()

    def enter(self, where: str, timeout_s: float, on_timeout) -> tuple | None:
        """Watch a block from now; returns the enclosing block's expiry, for `leave`."""
        with self._cond:
            outer = self._expiry
            self._place = (f"in {where}", time.time())
            self._expiry = (time.monotonic() + timeout_s, where, timeout_s, on_timeout)
            if timeout_s < self._every:  # otherwise the thread's next look is soon enough
                self._cond.notify()
            return outer

    def leave(self, where: str, outer: tuple | None) -> None:
        with self._cond:
            self._place = (f"after {where}", time.time())
            self._expiry = outer

    def _run(self) -> None:
        while True:
            with self._cond:
                expiry = self._expiry
                wait = (
                    self._every
                    if expiry is None
                    else min(self._every, expiry[0] - time.monotonic())
                )
                if wait > 0:
                    self._cond.wait(wait)
                place, expiry = self._place, self._expiry
            if place is not None and place != self._published:
                with contextlib.suppress(Exception):  # the coordinator may be gone at exit
                    self._publish(place)
                self._published = place
            if expiry is not None and time.monotonic() >= expiry[0]:
                with self._cond:
                    if self._expiry is expiry:
                        self._expiry = None  # fire once
                expiry[3](expiry[1], expiry[2])


_watch: list[Watch] = []  # the process's Watch, started by the first watched block


def _the_watch() -> Watch:
    if not _watch:
        _watch.append(Watch())
    return _watch[0]


@contextlib.contextmanager
def deadline(where: str, timeout_s: float, on_timeout=_hang):
    """Run the block; in a multi-process run, one lasting over `timeout_s` seconds calls
    on_timeout(where, timeout_s), by default: print where every process is and exit.

    Each process publishes its place ("in WHERE", then "after WHERE") in the coordinator's
    key-value store, so the report names the others' places too. A single process, or
    timeout_s <= 0, runs the block unwatched (nothing else can keep it waiting).
    """
    if jax.process_count() == 1 or timeout_s <= 0:
        yield
        return
    watch = _the_watch()
    outer = watch.enter(where, timeout_s, on_timeout)
    try:
        yield
    finally:
        watch.leave(where, outer)
