"""jaxlm-bench runs on CPU with a tiny override, so the program cannot rot between GPU sessions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import evaluate
from jaxlm.benchmark import benchmark, decode_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_reports_consistent_figures():
    c = tiny_config()
    c.train.peak_tflops = 1.0
    r = benchmark(c, steps=4, warmup=1, chunks=2)
    tokens = c.data.batch_size * c.data.seq_len
    # median_step_ms is rounded to 1 us: compare relatively.
    np.testing.assert_allclose(r["tokens_per_sec"], tokens / (r["median_step_ms"] / 1e3), rtol=1e-3)
    flops = evaluate.flops_per_token(config_lib.model_config(c, 64), c.data.seq_len)
    expected_tflops = r["tokens_per_sec"] * flops / 1e12 / 8
    np.testing.assert_allclose(r["model_tflops_per_device"], expected_tflops, rtol=1e-3, atol=0.01)
    assert abs(r["mfu"] - r["model_tflops_per_device"]) < 1e-3  # peak 1 TFLOP/s
    assert r["num_devices"] == 8 and r["loss_last"] < r["loss_first"]


def test_bench_cli_prints_one_json_line():
    cmd = [
        sys.executable, "-m", "jaxlm.cli.bench", "--config", "experiments/gpt2_124m.py",
        "--steps", "2", "--warmup", "1",
        "--config.model.vocab_size=128", "--config.model.d_model=32", "--config.model.num_heads=2",
        "--config.model.num_layers=1", "--config.model.d_ff=64", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.model.attention_impl=xla",
        "--config.model.dtype=float32",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["seq_len"] == 32 and record["tokens_per_sec"] > 0
    assert {"median_step_ms", "mfu", "peak_memory_gib", "device", "jax", "flax"} <= set(record)


def test_decode_benchmark_reports_tokens_per_second():
    c = tiny_config()
    r = decode_benchmark(c, batch_size=2, prompt_len=4, new_tokens=8, repeats=2)
    assert r["mode"] == "decode" and r["batch_size"] == 2 and r["new_tokens"] == 8
    np.testing.assert_allclose(r["tokens_per_sec"], 2 * 8 / r["median_generate_s"], rtol=1e-2)
    with pytest.raises(ValueError, match="exceeds the 16 tokens the model was trained on"):
        decode_benchmark(tiny_config(), batch_size=1, prompt_len=10, new_tokens=10)
