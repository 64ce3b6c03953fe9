"""jaxlm-train's step time against jaxlm-bench's on one config: one JSON line with both.

jaxlm-bench times the jitted step on synthetic batches already on device; jaxlm-train runs the
real loop (prefetch thread, metrics read one step late, logging). The two programs run as
subprocesses in turns (bench, train, bench, train, ...) so that load drift on a shared machine
hits both alike; each program's figure is the median over its rounds.

The train figure comes from the run's metrics.jsonl: tokens_per_sec of each log window, which
leaves out compilation and the eval/checkpoint windows; `train_wall_s` is the whole run,
set-up, compilation, evaluation and checkpoints included (what `make demo` waits for).

    python benchmarks/train_vs_bench.py --config experiments/pylm_tiny.py --steps 60
    python benchmarks/train_vs_bench.py --config experiments/pylm_tiny.py --steps 60 --keep_eval

By default evaluation and checkpoints are off (loop overhead alone); --keep_eval keeps the
config's eval_every and checkpoint_every (their cost shows in train_wall_s, not in the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def bench_step(config: str, steps: int, overrides: list[str]) -> tuple[float, int]:
    """(jaxlm-bench's median step time (ms), tokens per step)."""
    cmd = [sys.executable, "-m", "jaxlm.cli.bench", "--config", config, "--steps", str(steps)]
    out = _run(cmd + overrides)
    row = json.loads(out.strip().splitlines()[-1])
    step_ms = float(row["median_step_ms"])
    return step_ms, round(row["tokens_per_sec"] * step_ms / 1e3)


def train_step(
    config: str, steps: int, log_every: int, keep_eval: bool, overrides: list[str]
) -> tuple[list[float], float]:
    """(tokens/s of each of jaxlm-train's log windows, the run's wall time (s))."""
    with tempfile.TemporaryDirectory(prefix="train_vs_bench_") as workdir:
        cmd = [
            *(sys.executable, "-m", "jaxlm.cli.train", "--config", config),
            *("--workdir", workdir, f"--config.train.steps={steps}"),
            f"--config.train.log_every={log_every}",
        ]
        if not keep_eval:  # no eval, and the only checkpoint is the final one
            cmd += ["--config.train.eval_every=0", f"--config.train.checkpoint_every={steps}"]
        t0 = time.perf_counter()
        _run(cmd + overrides)
        wall_s = time.perf_counter() - t0
        records = [json.loads(line) for line in Path(workdir, "metrics.jsonl").open()]
    return [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r], wall_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=60, help="timed steps per program and round")
    p.add_argument("--rounds", type=int, default=2, help="bench/train pairs, interleaved")
    p.add_argument("--log_every", type=int, default=10, help="train's log window (steps)")
    p.add_argument("--keep_eval", action="store_true", help="keep eval and checkpoint intervals")
    # Anything else (--config.KEY=VALUE) goes to both programs.
    args, overrides = p.parse_known_args()
    bench, train, wall, windows = [], [], [], []
    for _ in range(args.rounds):
        step_ms, tokens_per_step = bench_step(args.config, args.steps, overrides)
        bench.append(step_ms)
        tok_s, s = train_step(args.config, args.steps, args.log_every, args.keep_eval, overrides)
        train.append(1e3 * tokens_per_step / statistics.median(tok_s))
        windows.append([round(1e3 * tokens_per_step / x, 1) for x in tok_s])
        wall.append(s)
    b, t = statistics.median(bench), statistics.median(train)
    row = {
        "config": args.config,
        "steps": args.steps,
        "overrides": overrides,
        "keep_eval": args.keep_eval,
        "bench_step_ms": round(b, 2),
        "train_step_ms": round(t, 2),
        "ratio": round(t / b, 4),  # train over bench: 1.10 is the limit
        "bench_rounds_ms": [round(x, 2) for x in bench],
        "train_rounds_ms": [round(x, 2) for x in train],
        "train_window_ms": windows,  # each log window's step time, per round
        "train_wall_s": [round(x, 1) for x in wall],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
