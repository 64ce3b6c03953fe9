"""Two local processes (jax.distributed on 127.0.0.1, 4 CPU devices each) train like one process
with 8 devices, evals included; SIGTERM to one of them stops both at the same step, and a restart
continues. A hang (processes meeting different collectives) ends with where each process is.
Multi-process evaluation has its own file, test_multiprocess_eval.py."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import tiny_config, xla_flags
from multiprocess_helpers import (
    ROOT,
    assert_same_metrics,
    evals,
    experiment_file,
    finish,
    free_port,
    launch_train,
    losses,
    stacks_and_kill,
)

from jaxlm import config_checks, distributed, train
from jaxlm.config import ConfigError

STEPS = 40


def run_config():
    c = tiny_config()
    c.train.steps = STEPS
    c.train.log_every = 4
    c.train.checkpoint_every = 1000  # only the preemption save and the final one
    c.train.eval_every = 15  # evals in both runs, before and after the restart
    return c


def test_two_processes_match_one_and_resume_after_sigterm(tmp_path):
    reference = tmp_path / "one"
    train.train(run_config(), reference)
    want = losses(reference)

    experiment, workdir = experiment_file(tmp_path, run_config()), tmp_path / "two"
    procs = launch_train(experiment, workdir)
    deadline = time.time() + 240
    while not losses(workdir) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # one host is preempted; both must save and exit 0
    outs = finish(procs, 240, "training until SIGTERM")
    assert "saved checkpoint at step" in outs[0][0], outs[0][0][-2000:]
    saved = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < STEPS

    finish(launch_train(experiment, workdir), 300, "the resumed training")
    got = losses(workdir)
    assert max(got) == STEPS
    common = sorted(set(got) & set(want))
    assert len(common) >= STEPS // 4 - 1
    np.testing.assert_allclose([got[s] for s in common], [want[s] for s in common], rtol=1e-5)
    want_evals, got_evals = evals(reference), evals(workdir)
    assert sorted(want_evals) == sorted(got_evals) == [15, 30, STEPS]
    for step, metrics in want_evals.items():
        assert_same_metrics(got_evals[step], metrics)


def test_a_hang_names_where_each_process_is(tmp_path):
    """Process 0 enters a collective that process 1 never joins: it stops after the deadline,
    naming its own place and the other's."""
    script = tmp_path / "hang.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            import jax, jax.numpy as jnp, numpy as np
            from jax.sharding import NamedSharding, PartitionSpec as P
            from jaxlm import distributed

            me = int(sys.argv[1])
            distributed.initialize(sys.argv[2], 2, me)
            if me == 1:
                with distributed.deadline("saving", 60):
                    pass
                time.sleep(120)  # elsewhere: never joins the sum
            mesh = jax.make_mesh((2,), ("data",))
            x = jax.make_array_from_process_local_data(
                NamedSharding(mesh, P("data")), np.ones(1, np.float32), (2,)
            )
            with distributed.deadline("eval batch 2 of 3", 5):
                np.asarray(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
            print("the sum returned")
            """
        )
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), address],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == distributed.HANG_EXIT_CODE, err[-2000:]
    assert "the sum returned" not in out
    line = next(x for x in err.splitlines() if x.startswith("jaxlm: "))
    assert "process 0 of 2 waited 5 s in eval batch 2 of 3" in line, line
    assert re.search(r"process 0: in eval batch 2 of 3 \(\d+ s ago\)", line), line
    assert "process 1: after saving (" in line, line
    assert "raise --config.train.hang_timeout" in line, line


def test_hang_timeout_is_checked_and_one_process_is_unwatched():
    c = tiny_config()
    c.train.hang_timeout = -1.0
    with pytest.raises(ConfigError, match="'train.hang_timeout' must be >= 0, got -1"):
        config_checks.validate(c)
    fired = []
    with distributed.deadline("eval batch 1 of 1", 0.01, on_timeout=lambda *a: fired.append(a)):
        time.sleep(0.2)  # one process: nothing else can keep it waiting
    assert fired == []


def _wait_for(condition, seconds: float = 10.0) -> None:
    until = time.monotonic() + seconds
    while not condition() and time.monotonic() < until:
        time.sleep(0.01)


def test_watch_publishes_the_latest_place_and_fires_once():
    """Watched blocks cost no key-value store round trip each: the watch thread publishes the
    latest place now and then, and an overdue block's on_timeout fires once, after its place
    is published."""
    published, fired = [], []
    watch = distributed.Watch(publish=published.append, publish_every=0.05)
    for i in range(2000):
        watch.leave(watch.enter(f"eval batch {i + 1} of 2000", 60, lambda *a: fired.append(a)))
    _wait_for(lambda: published and published[-1][0] == "after eval batch 2000 of 2000")
    assert published and published[-1][0] == "after eval batch 2000 of 2000", published[-3:]
    assert len(published) < 200, len(published)  # coalesced, not one per block
    start = time.monotonic()
    on_timeout = lambda *a: fired.append((*a, published[-1][0], time.monotonic() - start))
    block = watch.enter("the sums of 3 batches", 0.2, on_timeout)
    _wait_for(lambda: fired)
    watch.leave(block)
    assert len(fired) == 1 and fired[0][:3] == (
        "the sums of 3 batches",
        0.2,
        "in the sums of 3 batches",
    )
    assert 0.2 <= fired[0][3] < 5.0, fired  # not before its deadline
    time.sleep(0.3)
    assert len(fired) == 1
    assert watch.stop() is None and published[-1][0] == "after the sums of 3 batches"


def test_watch_keeps_each_nested_deadline_and_survives_a_failing_callback():
    fired = []
    # publish_every far above the deadlines: entering a short block must wake the thread.
    watch = distributed.Watch(publish=lambda place: None, publish_every=30.0)
    outer = watch.enter("outer", 0.1, lambda *a: fired.append(a[0]))
    inner = watch.enter("inner", 60, lambda *a: fired.append(a[0]))
    _wait_for(lambda: fired)  # the outer deadline passes while the inner block is open
    watch.leave(inner)
    watch.leave(outer)
    assert fired == ["outer"]

    def fail(*args):
        raise RuntimeError("report failed")

    watch.leave(watch.enter("X", 0.05, lambda *a: fired.append(a[0])))  # left in time
    block = watch.enter("Y", 0.05, fail)
    time.sleep(0.3)
    watch.leave(block)
    block = watch.enter("Z", 0.05, lambda *a: fired.append(a[0]))
    _wait_for(lambda: len(fired) == 2)
    watch.leave(block)
    assert fired == ["outer", "Z"]  # X never fires; Z does after a callback raised
    watch.stop()


def test_distributed_arguments_are_checked():
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        distributed.initialize("127.0.0.1:1234", environ={})
    with pytest.raises(ValueError, match="need --coordinator_address"):
        distributed.initialize(num_processes=2, environ={})
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2, environ={})
    assert distributed.initialize(environ={}) is False  # one process: nothing to start
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert distributed.cluster_detected({"SLURM_NTASKS": "4"})


def test_a_workdir_in_use_stops_every_process(tmp_path):
    experiment, workdir = experiment_file(tmp_path, run_config()), tmp_path / "run"
    holder = subprocess.Popen(["sleep", "60"])  # a live trainer holding the workdir
    workdir.mkdir()
    lock = {"pid": holder.pid, "host": socket.gethostname(), "token": "x"}
    lock.update({"started": time.time(), "heartbeat": time.time()})
    (workdir / "jaxlm.lock").write_text(json.dumps(lock))
    procs = launch_train(experiment, workdir)
    try:
        outs = [p.communicate(timeout=60) for p in procs]  # not waiting in a collective
    except subprocess.TimeoutExpired:
        tails = "\n".join(stacks_and_kill(procs))
        pytest.fail(f"a process refused the workdir hung instead of exiting:\n{tails}")
    finally:
        holder.kill()
        holder.wait()
    held = f"workdir {workdir} is in use by pid {holder.pid} on host {socket.gethostname()}"
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, f"process {i}: {err[-2000:]}"
        prefix = "jaxlm-train: error: " + ("process 0: " if i else "")
        assert lines[0].startswith(prefix + held), lines[0]
    assert not (workdir / "checkpoints").exists()
