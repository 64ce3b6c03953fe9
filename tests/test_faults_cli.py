"""Faults met by a jaxlm-train process: signals at any moment, kill -9, bad command lines."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import kill_trials
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import preemption, train
from jaxlm.workdir_lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
TINY = kill_trials.OVERRIDES  # pylm_tiny shrunk to a few seconds on synthetic data


def launch(workdir, *args, env=None):
    cmd = [sys.executable, "-m", "jaxlm.cli.train", "--config", "experiments/pylm_tiny.py"]
    cmd += ["--workdir", str(workdir), *TINY, *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env or dict(os.environ, PYTHONUNBUFFERED="1"), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def saved_steps(workdir):
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_the_first_step_exits_at_once(tmp_path, capsys, sig):
    # No compilation cache: the first compile takes seconds, and the signal lands in setup or
    # in that compile (the main thread inside XLA, not in Python).
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(PYTHONUNBUFFERED="1", JAX_ENABLE_COMPILATION_CACHE="false")
    proc = launch(tmp_path, "--config.train.steps=100000", env=env)
    while not (tmp_path / LOCK_NAME).exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert time.perf_counter() - t0 < 5.0, out  # at once, not after the compile and a step
    assert proc.returncode == 128 + sig, out
    assert f"received signal {int(sig)} before the first step: nothing to save" in out
    assert "step 1/" not in out and saved_steps(tmp_path) == []
    assert not (tmp_path / "metrics.jsonl").exists()
    if sig == signal.SIGINT:  # what is left does not break the next run (a stale lock)
        c = tiny_config()
        c.train.steps = 2
        train.train(c, tmp_path)
        assert "taking over" in capsys.readouterr().out and saved_steps(tmp_path) == [2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_an_eval_abandons_it_and_saves(tmp_path, sig):
    proc = launch(tmp_path, "--config.train.eval_every=2", "--config.train.eval_steps=100000")
    for line in proc.stdout:
        if line.startswith("step 2/"):  # the eval at step 2 starts after this line
            time.sleep(0.5)
            proc.send_signal(sig)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert f"received signal {int(sig)}: evaluation at step 2 abandoned" in out
    assert f"received signal {int(sig)}: saved checkpoint at step 2; run the same command" in out
    assert saved_steps(tmp_path) == [2]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # no eval record
    assert not (tmp_path / LOCK_NAME).exists()


def test_kill_9_at_a_random_moment_resumes_equal(tmp_path, capsys):
    assert kill_trials.main(["--trials", "1", "--seed", "1", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1/1 resumed runs equal the uninterrupted one" in out, out


def run_cli(*args, cwd=ROOT):
    cmd = [sys.executable, "-m", "jaxlm.cli.train", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "case,args,status,message",
    [
        (
            "syntax error", ["--config", "{bad}", "--workdir", "{tmp}/run"], 2,
            "{bad}:2: syntax error (invalid syntax): fix the experiment file",
        ),
        (
            "error in get_config", ["--config", "{bad}", "--workdir", "{tmp}/run"], 2,
            "{bad}:2: NameError: name 'base_confg' is not defined (raised while running",
        ),
        (
            "missing config", ["--config", "{tmp}/nope.py", "--workdir", "{tmp}/run"], 2,
            "nope.py not found; pass --config experiments/NAME.py",
        ),
        (
            "missing workdir", ["--config", "experiments/pylm_tiny.py"], 2,
            "--config and --workdir are required",
        ),
        (
            "unknown flag", ["--config", "experiments/pylm_tiny.py", "--wokdir", "x"], 2,
            "Unknown command line flag 'wokdir'. Did you mean: workdir ?",
        ),
        (
            "mesh", ["--config", "experiments/pylm_tiny.py", "--workdir", "{tmp}/run",
                     "--config.mesh.data=3"], 2, "needs 3 devices but 8 are present",
        ),
        (
            "read-only workdir", ["--config", "experiments/pylm_tiny.py", "--workdir",
                                  "/sys/jaxlm-run"], 1,
            "workdir /sys/jaxlm-run is not writable (Operation not permitted): pick a --workdir",
        ),
    ],
)  # fmt: skip
def test_bad_command_lines_are_one_line(tmp_path, case, args, status, message):
    bad = tmp_path / "bad.py"
    body = "return base_confg()" if case == "error in get_config" else "return 1 +"
    bad.write_text(f"def get_config():\n    {body}\n")
    args = [a.replace("{bad}", str(bad)).replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{bad}", str(bad))
    r = run_cli(*args)
    assert r.returncode == status, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxlm-train: error: "), r.stderr
    assert message in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_second_trainer_on_a_workdir_in_use_is_refused(tmp_path):
    first = subprocess.Popen(["sleep", "60"])  # a live process holding the lock, as a trainer
    lock = {"pid": first.pid, "host": socket.gethostname(), "token": "x"}
    lock.update({"started": time.time(), "heartbeat": time.time()})
    (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
    try:
        second = run_cli("--config", "experiments/pylm_tiny.py", "--workdir", str(tmp_path))
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(
        f"jaxlm-train: error: workdir {tmp_path} is in use by pid {first.pid} on host "
        f"{socket.gethostname()} (since "
    )
    assert lines[0].endswith("wait for that run or stop it, or pick another --workdir")


# jaxlm-eval with the evaluation itself stubbed: only its writes are under test.
EVAL_STUB = """
import errno, os, sys
from jaxlm import inference
inference.evaluate_run = lambda *a, **k: {"loss": 1.0, "step": 3}
real_write = os.write
def full(fd, data):
    if b"validation/loss" in data:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)
if sys.argv[1] == "full":
    os.write = full
sys.argv = ["jaxlm-eval", *sys.argv[2:]]
from jaxlm.cli import eval
eval.run()
"""


@pytest.mark.parametrize("case", ["full disk", "bad --output"])
def test_eval_write_errors_are_one_line(tmp_path, case):
    config_lib.save_config(tiny_config(), tmp_path)  # a run's config.json: jaxlm-eval checks it
    (tmp_path / "file").write_text("")
    output = tmp_path / "file" / "eval.json"  # its parent is a file
    mode = "full" if case == "full disk" else "ok"
    cmd = [sys.executable, "-c", EVAL_STUB, mode, "--workdir", str(tmp_path)]
    r = subprocess.run(
        cmd + ["--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    if case == "full disk":
        assert lines[0].startswith(
            f"jaxlm-eval: error: could not write {tmp_path / 'eval_metrics.jsonl'}: No space "
            "left on device (errno 28)"
        )
    else:
        assert lines[0] == (
            f"jaxlm-eval: error: could not write --output {output}: Not a directory "
            "(errno 20); free space, fix its permissions or pick another --output"
        )
    assert r.stdout == ""


def test_sigint_in_a_multiprocess_run_is_sent_on_as_sigterm(monkeypatch):
    monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
    before = signal.getsignal(signal.SIGINT)
    got = []
    jax_handler = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # stands for JAX's
    try:
        with preemption.StopSignal() as stop:
            ours = signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
            deadline = time.time() + 10
            while not got and time.time() < deadline:
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGTERM, jax_handler)
    assert got == [signal.SIGTERM]
    assert ours is not stop._handle  # SIGTERM stays JAX's (its preemption sync point)
    assert stop.received is None  # the step to stop at is agreed in should_stop
    assert signal.getsignal(signal.SIGINT) is before
