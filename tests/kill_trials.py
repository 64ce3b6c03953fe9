"""kill -9 at seeded random moments, then resume: every resumed run must equal an uninterrupted one.

    python tests/kill_trials.py --trials 20 [--seed 0] [--root DIR]

A tiny run (experiments/pylm_tiny.py shrunk to synthetic data, 8 fake CPU devices) is trained
once without interruption (which also times the startup). Each trial starts the same
`jaxlm-train` command, sends it SIGKILL at a seeded random moment (before the first step, or
shortly after a random step's line), re-runs the command to the end and checks: the final
training and eval losses equal the uninterrupted run's (to 1e-5), and metrics.jsonl holds each
step once. Each line says what the kill interrupted (startup or the first compile, a training
step, an async save, an eval). Exit status 1 when a trial fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 16, 6
OVERRIDES = [
    "--config.data.source=synthetic",
    "--config.model.vocab_size=64",
    "--config.model.num_layers=1",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=4",
    f"--config.train.eval_every={EVAL_EVERY}",
    "--config.train.eval_steps=8",
]


def environment() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    env.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    return env


def start(workdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxlm.cli.train", "--config", "experiments/pylm_tiny.py"]
    cmd += ["--workdir", str(workdir), *OVERRIDES]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=environment(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def run_to_end(workdir: Path) -> tuple[float, float]:
    """Run (or resume) to the last step: (seconds to the first step's line, wall time)."""
    t0 = time.perf_counter()
    proc = start(workdir)
    out, first = [], None
    for line in proc.stdout:
        out.append(line)
        if first is None and line.startswith("step "):
            first = time.perf_counter() - t0
    proc.wait(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"jaxlm-train exited {proc.returncode}:\n{''.join(out)[-3000:]}")
    total = time.perf_counter() - t0
    return (total if first is None else first), total


def results(workdir: Path) -> dict:
    """Final train and eval loss, and the (kind, step) of each metrics line."""
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    return {
        "train_loss": train[-1]["train/loss"],
        "eval_loss": evals[-1]["eval/loss"],
        "lines": [("eval" if "eval/loss" in r else "train", r["step"]) for r in records],
    }


def kill_after(workdir: Path, after_step: int, delay: float) -> str:
    """Start a run, SIGKILL it `delay` seconds after its line for `after_step` (after its start
    for 0): the moment follows the run's own progress, whatever the machine's load."""
    proc = start(workdir)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {after_step}/"):
                seen.set()
        seen.set()  # the run ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if after_step > 0:
        seen.wait()
    try:
        proc.wait(timeout=delay)
        reader.join()
        return "finished before the kill"
    except subprocess.TimeoutExpired:
        pass
    saving = any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    return phase(lines, saving)


def phase(lines: list[str], saving: bool) -> str:
    """What the run was doing, from its last lines (as read, which may lag a little)."""
    return _last_step_phase(lines) + (", a checkpoint save in flight" if saving else "")


def _last_step_phase(lines: list[str]) -> str:
    steps = [x for x in lines if x.startswith("step ")]
    if not steps:
        return "startup or the first compile"
    last = lines[-1]
    step = int(steps[-1].split()[1].split("/")[0])
    if last.startswith("step ") and (step % EVAL_EVERY == 0 or step == STEPS):
        return f"the eval at step {step}"
    if step == STEPS:
        return "the final save"
    return f"training after step {step}"


def moment(rng: random.Random, first: float) -> tuple[int, float]:
    """(step, seconds after its line): a fifth of the draws before the first step (startup and
    the first compile, `first` seconds in the uninterrupted run), the rest up to 0.4 s after a
    random step's line, which lands in that step's eval or save, or in the next steps."""
    if rng.random() < 0.2:
        return 0, rng.uniform(0.0, first)
    return rng.randint(1, STEPS), rng.uniform(0.0, 0.4)


def trial(root: Path, reference: dict, after_step: int, delay: float) -> dict:
    workdir = root / f"trial-{after_step}-{delay:.3f}"
    what = kill_after(workdir, after_step, delay)
    run_to_end(workdir)
    got = results(workdir)
    diff = max(
        abs(got["train_loss"] - reference["train_loss"]),
        abs(got["eval_loss"] - reference["eval_loss"]),
    )
    ok = diff <= 1e-5 * abs(reference["train_loss"]) and got["lines"] == reference["lines"]
    return {"killed during": what, "max loss diff": diff, "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=None, help="where the runs go (default: a temp dir)")
    args = parser.parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="jaxlm-kill-"))
    first, _ = run_to_end(root / "uninterrupted")
    reference = results(root / "uninterrupted")
    rng = random.Random(args.seed)
    failed = 0
    for i in range(args.trials):
        after_step, delay = moment(rng, first)
        r = trial(root, reference, after_step, delay)
        failed += not r["ok"]
        when = f"{delay:.2f}s after " + (f"step {after_step}" if after_step else "the start")
        print(
            f"trial {i + 1}/{args.trials}: kill -9 {when} ({r['killed during']}): "
            f"max loss diff {r['max loss diff']:.2e}, {'OK' if r['ok'] else 'FAILED'}",
            flush=True,
        )
    print(f"{args.trials - failed}/{args.trials} resumed runs equal the uninterrupted one ({root})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
