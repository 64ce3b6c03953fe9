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
