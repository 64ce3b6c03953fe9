"""CPU speed: the side-by-side benchmark against PyTorch runs at a tiny size (so it cannot rot),
and the model's CPU fusion barrier changes no value.

No timing is asserted (the program reports speed; a timed test would only measure the load).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from conftest import xla_flags

from jaxlm.models.layers import fusion_barrier

ROOT = Path(__file__).resolve().parents[1]


def test_compare_torch_tiny_same_losses_and_greedy_tokens():
    # One CPU device in the subprocess, as a user runs it (the tests' 8 fake devices would
    # split a batch of 2 rows).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "benchmarks/compare_torch.py", "--sizes", "tiny", "--rounds", "1",
        "--steps", "2", "--decode_batches", "2", "--prompt_len", "4", "--new_tokens", "8",
        "--bandwidth_mb", "8",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    r = json.loads(lines[0])
    assert r["size"] == "tiny" and r["batch"] == [2, 16]
    assert r["shape"] == {"layers": 2, "d_model": 32, "heads": 2, "d_ff": 64, "vocab": 65}
    # The same weights and batch: the same first loss (fp32, to rounding).
    assert abs(r["loss_first"]["jaxlm"] - r["loss_first"]["torch"]) < 1e-4, r["loss_first"]
    for key in ("jaxlm_step_ms", "torch_step_ms", "train_speedup"):
        assert r[key] > 0, key
    lo, hi = r["train_speedup_range"]
    assert lo <= hi
    assert [d["batch"] for d in r["decode"]] == [2]
    for d in r["decode"]:
        assert d["greedy_identical"] is True and d["matching_tokens"] == 1.0, d
        assert d["jaxlm_tokens_per_sec"] > 0 and d["torch_tokens_per_sec"] > 0
        ratio = d["jaxlm_tokens_per_sec"] / d["torch_tokens_per_sec"]
        assert abs(d["decode_speedup"] - ratio) < 0.01 * ratio + 0.001
        # The memory-bound ceiling: batch x bandwidth / fp32 weight bytes, over torch's rate.
        want = d["batch"] * r["memory_gb_per_s"] * 1e9 / r["decode_weight_bytes"]
        assert abs(d["memory_bound_tokens_per_sec"] - want) < 0.01 * want + 0.1, (d, want)
        ceiling_ratio = d["memory_bound_tokens_per_sec"] / d["torch_tokens_per_sec"]
        assert abs(d["memory_bound_speedup"] - ceiling_ratio) < 0.01 * ceiling_ratio + 0.001
    assert r["memory_gb_per_s"] > 0
    # Every weight but the position table (16 positions x d_model 32), 4 bytes each.
    assert r["decode_weight_bytes"] == 4 * (r["params"] - 16 * 32)
    # The train step's matrix products: every weight's forward, input-gradient and
    # weight-gradient product, 3 x 2 x tokens x the weights of the model's products (2 layers
    # of 4 d^2 + 2 d d_ff, the tied head).
    g = r["gemms"]
    matmul_params = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 65 * 32
    assert g["gemm_flops"] == 6 * 32 * matmul_params, g
    assert g["jaxlm_gemm_ms"] > 0 and g["torch_gemm_ms"] > 0 and g["xla_gpt2_layout_gemm_ms"] > 0
    ratio = g["torch_gemm_ms"] / g["jaxlm_gemm_ms"]
    assert abs(g["gemm_speedup"] - ratio) < 0.01 * ratio, g
    for lib in ("jaxlm", "torch"):
        assert abs(g[f"{lib}_gemm_ms"] + g[f"{lib}_rest_ms"] - r[f"{lib}_step_ms"]) < 0.01
    assert r["threads"]["torch"] == r["threads"]["xla_cores"]
    assert set(r["versions"]) == {"jax", "torch", "transformers"}


def test_fusion_barrier_is_the_identity_and_keeps_gradients():
    x = jnp.linspace(-2.0, 3.0, 24).reshape(2, 3, 4)
    f = lambda x: jnp.sum(jnp.tanh(x) ** 2 * jnp.arange(4.0))
    np.testing.assert_array_equal(fusion_barrier(x), x)
    np.testing.assert_array_equal(
        jax.jit(jax.grad(lambda x: f(fusion_barrier(x))))(x), jax.jit(jax.grad(f))(x)
    )
    # A NaN gradient takes the other branch and stays NaN (the run's NaN check still sees it).
    g = jax.grad(lambda x: jnp.sum(fusion_barrier(x) * jnp.float32(np.nan)))(x)
    assert np.isnan(np.asarray(g)).all()
