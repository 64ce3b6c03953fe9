"""--help on each console script shows its usage and its own flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the venv's console scripts (pip install -e)


@pytest.mark.parametrize(
    "program,flag",
    [
        ("jaxlm-train", "--coordinator_address"),
        ("jaxlm-eval", "--beam_size"),
        ("jaxlm-generate", "--top_p"),
        ("jaxlm-bench", "--topology"),
        ("jaxlm-data", "--shard_tokens"),
        ("jaxlm-convert", "--max_shard_size"),
        ("jaxlm-compress", "--calibration_batches"),
    ],
)
def test_help_lists_the_programs_flags(program, flag):
    script = BIN / program
    if not script.exists():
        pytest.skip(f"{script} is not installed (make install)")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    # absl's --help exits 1 after printing (its convention): the text is what matters.
    assert out.stdout.startswith(program), (out.stdout[:200], out.stderr[-2000:])
    assert flag in out.stdout


def test_a_flag_value_that_looks_like_help_is_a_value(tmp_path):
    script = BIN / "jaxlm-generate"
    if not script.exists():
        pytest.skip(f"{script} is not installed (make install)")
    args = [str(script), "--workdir", str(tmp_path / "none"), "--prompt", "-h"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "is not a jaxlm run directory" in out.stderr, out.stderr


# The modules each program must not have loaded when it refuses a bad command line: the config
# layer and the run-directory check come first, in a fraction of a second (JAX takes seconds).
NOT_LOADED = """
import atexit, runpy, sys
atexit.register(lambda: print(sorted(m for m in ("jax", "flax", "optax") if m in sys.modules)))
runpy.run_module("jaxlm.cli.{name}", run_name="__main__")
"""


@pytest.mark.parametrize(
    "name,args,error",
    [
        (
            "train",
            ["--config", "experiments/pylm_tiny.py", "--workdir", "RUN", "--config.train.stepz=3"],
            "train.stepz",
        ),
        ("bench", ["--config", "experiments/pylm_tiny.py", "--config.model.mlp=x"], "'model.mlp'"),
        ("generate", ["--workdir", "RUN", "--prompt", "a"], "is not a jaxlm run directory"),
        ("generate", ["--workdir", "RUN", "--prompt", "a", "--top_p=0"], "top_p must be in"),
        ("eval", ["--workdir", "RUN"], "is not a jaxlm run directory"),
        ("eval", ["--workdir", "RUN", "--max_decode_examples=-1"], "--max_decode_examples must"),
    ],
)
def test_a_bad_command_line_is_refused_before_jax_loads(tmp_path, name, args, error):
    code = NOT_LOADED.format(name=name)
    args = [str(tmp_path / "run") if a == "RUN" else a for a in args]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert out.returncode == 2 and error in out.stderr, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
