"""Joining a multi-process run: one JAX process per host (TPU pod worker, GPU node, SLURM task).

`initialize` calls `jax.distributed.initialize` when the command line or the environment asks for
it: explicitly with a coordinator address (GPU clusters, local tests), or by auto-detection on
Cloud TPU pods, SLURM and Open MPI. A single process on one machine needs none of it.

`deadline(where, seconds)` bounds a block holding collectives: when processes run different
steps, a collective waits forever; the deadline ends such a hang with one line saying where
each process is.
"""

from __future__ import annotations

import atexit
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


class _Block:
    """A watched block: its place, when it is due, and what to call then."""

    def __init__(self, where: str, timeout_s: float, on_timeout):
        self.where, self.timeout_s, self.on_timeout = where, timeout_s, on_timeout
        self.due = time.monotonic() + timeout_s
        self.fired = False


class Watch:
    """One daemon thread that watches the blocks of `deadline` and publishes this process's place.

    Entering and leaving a block only records the place and the block under a lock: each eval
    batch of a multi-process run passes through a block, and a key-value store round trip plus a
    timer thread per block cost more than a small eval step. The thread publishes the place when
    it changed, at most every `publish_every` seconds (a hang report comes after seconds, and
    gives each place's own time), and calls on_timeout(where, timeout_s) once for each block
    still open at its deadline (nested blocks each keep their own), after publishing the place.
    At exit it publishes the last place, so the others never see a finished process as inside a
    block. For the main thread: blocks are a stack.
    """

    def __init__(self, publish=_publish, publish_every: float = 0.5):
        self._publish, self._every = publish, publish_every
        self._cond = threading.Condition()
        self._place: tuple[str, float] | None = None  # (text, time.time() when it was entered)
        self._blocks: list[_Block] = []  # open blocks, innermost last
        self._published: tuple[str, float] | None = None
        self._last_publish = float("-inf")
        self._stopped = False
        threading.Thread(target=self._run, name="jaxlm-deadline", daemon=True).start()
        atexit.register(self.stop)  # before jax's own exit handler shuts the client down

    def enter(self, where: str, timeout_s: float, on_timeout) -> _Block:
        with self._cond:
            block = _Block(where, timeout_s, on_timeout)
            self._blocks.append(block)
            self._place = (f"in {where}", time.time())
            if timeout_s < self._every:  # otherwise the thread's next look is soon enough
                self._cond.notify()
            return block

    def leave(self, block: _Block) -> None:
        with self._cond:
            self._blocks.remove(block)
            self._place = (f"after {block.where}", time.time())

    def stop(self) -> None:
        """End the thread and publish the last place (at exit)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._publish_place(force=True)

    def _publish_place(self, force: bool = False) -> None:
        place = self._place
        if place is None or place == self._published:
            return
        if not force and time.monotonic() - self._last_publish < self._every:
            return
        self._last_publish = time.monotonic()
        try:
            self._publish(place)
        except Exception:  # the coordinator may be gone at exit: the report is best effort
            return
        self._published = place

    def _run(self) -> None:
        while True:
            with self._cond:
                pending = [b.due for b in self._blocks if not b.fired]
                wait = min([self._every, *(due - time.monotonic() for due in pending)])
                if wait > 0 and not self._stopped:
                    self._cond.wait(wait)
                if self._stopped:
                    return
                now = time.monotonic()
                # Decided under the lock: a block that left in time is no longer in the list.
                due = [b for b in self._blocks if not b.fired and b.due <= now]
                for block in due:
                    block.fired = True
            self._publish_place(force=bool(due))  # the report reads this process's place too
            for block in due:
                try:
                    block.on_timeout(block.where, block.timeout_s)
                except Exception as e:  # the thread must keep watching the other blocks
                    print(f"jaxlm: on_timeout for {block.where} failed: {e!r}", file=sys.stderr)


_watch: list[Watch] = []  # the process's Watch, started by the first watched block
_watch_lock = threading.Lock()


def _the_watch() -> Watch:
    with _watch_lock:
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
    block = watch.enter(where, timeout_s, on_timeout)
    try:
        yield
    finally:
        watch.leave(block)
