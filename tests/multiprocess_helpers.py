"""Two local processes of one job (jax.distributed on 127.0.0.1, 4 CPU devices each): launching
them, waiting for both, and reading what their runs wrote. Used by test_multiprocess*.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags

from jaxlm.config import base_config

ROOT = Path(__file__).resolve().parents[1]


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def experiment_file(tmp_path: Path, config, name: str = "tiny") -> Path:
    """An experiment file holding `config`: a subprocess must not import conftest, which sets 8
    devices."""
    base = dict(_flat(base_config().to_dict()))
    changed = [f"{k}={v}" for k, v in _flat(config.to_dict()) if base[k] != v]
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from jaxlm.config import apply_overrides, base_config\n\n\n"
        f"def get_config():\n    c = base_config()\n    apply_overrides(c, {changed!r})\n"
        "    return c\n"
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, *args: str) -> list[subprocess.Popen]:
    """`python -m module args` as processes 0 and 1 of one job, 4 CPU devices each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = xla_flags(4)
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT prints every thread's stack: see stacks_and_kill
    port = free_port()
    procs = []
    for i in range(2):
        cmd = [
            sys.executable, "-m", module, *args, "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", "2", "--process_id", str(i),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return procs


def stacks_and_kill(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's output tail, ending with its Python stacks where it was still running (a
    hang): SIGABRT makes the fault handler (`launch` turns it on) print every thread's stack.
    Every process has ended when this returns."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGABRT)
    tails = []
    for i, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        tails.append(f"process {i} (exit {p.returncode}): ...{(out + err)[-3000:]}")
    return tails


def launch_train(experiment: Path, workdir: Path) -> list[subprocess.Popen]:
    return launch("jaxlm.cli.train", "--config", str(experiment), "--workdir", str(workdir))


def finish(procs: list[subprocess.Popen], timeout: float, what: str) -> list[tuple[str, str]]:
    """Both processes' (stdout, stderr) once they exit 0; a hang fails the test, naming it."""
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{what} hung: the 2 processes did not exit within {timeout:g} s (a collective one "
            "of them never joins); their output ends:\n" + "\n".join(stacks_and_kill(procs))
        )
    for i, (p, (_, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"{what}: process {i} exited {p.returncode}: {err[-2000:]}"
    return outs


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(workdir) if "train/loss" in r}


def evals(workdir: Path) -> dict[int, dict]:
    """{step: {metric: value}} of the training loop's evals."""
    out: dict[int, dict] = {}
    for r in records(workdir):
        metrics = {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
        if metrics:
            out.setdefault(r["step"], {}).update(metrics)
    return out


def assert_same_metrics(got: dict, want: dict) -> None:
    """Losses to 1e-5 (float sums in another order); counts, accuracy and F1 exactly."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key in ("loss", "perplexity", "bits_per_byte"):
            np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
        else:
            assert got[key] == value, (key, got[key], value)
