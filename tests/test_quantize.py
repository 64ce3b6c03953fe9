"""Weight quantization (jaxlm/compress/quantize.py, jaxlm/models/quant.py) and QAT (train.qat)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.checkpoint import Checkpointer
from jaxlm.compress import quantize
from jaxlm.config import ConfigError
from jaxlm.finetune import flat_params
from jaxlm.inference import LanguageModel, evaluate_run
from jaxlm.models import quant

MATMULS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/gate", "mlp/down")
ROOT = Path(__file__).parents[1]


def saved_params(workdir: Path) -> dict:
    ckpt = Checkpointer(Path(workdir) / "checkpoints")
    try:
        step = ckpt.latest_step()
        return flat_params(jax.tree.map(np.asarray, ckpt.manager.restore(step)["params"]))
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def int8_run(stdlib_lm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    quantize.quantize_run(stdlib_lm_run, out, bits=8)
    return out


def test_numerics_round_trip():
    w = jax.random.normal(jax.random.key(0), (64, 4, 8))
    for kind, group, qmax in (("int8", 0, 127), ("int4", 16, 7)):
        q, scale = jax.jit(quant.quantize_kernel, static_argnums=(1, 2, 3))(w, 1, kind, group)
        back = jax.jit(quant.dequantize_kernel, static_argnums=(2, 3, 4))(
            q, scale, (64,), (4, 8), kind
        )
        assert scale.shape == ((1 if group == 0 else 4), 4, 8)
        # Each value within half a step of its group's scale.
        step = jnp.repeat(scale, 64 // scale.shape[0], axis=0)
        assert float(jnp.max(jnp.abs(back - w) / step)) <= 0.5 + 1e-5
        assert float(jnp.max(jnp.abs(w / step))) <= qmax + 1e-4
    values = jnp.arange(-8, 8, dtype=jnp.int8).reshape(16, 1)
    packed = quant.pack_int4(values)
    assert packed.dtype == jnp.uint8 and packed.shape == (8, 1)
    np.testing.assert_array_equal(quant.unpack_int4(packed), values)


def test_int8_run_stores_integers_and_is_small(stdlib_lm_run, int8_run):
    fp, q = saved_params(stdlib_lm_run), saved_params(int8_run)
    kernels = [n for n in q if n.endswith("/kernel") and n.startswith("blocks/")]
    assert len(kernels) == 2 * len(MATMULS)
    for name in kernels:
        assert q[name].dtype == np.int8 and q[name].shape == fp[name].shape, name
        assert q[name.replace("kernel", "scale")].dtype == np.float32
    block = lambda tree: sum(x.nbytes for n, x in tree.items() if n.startswith("blocks/"))
    assert block(q) <= 0.30 * block(fp), (block(q), block(fp))
    assert q["embed/embedding"].dtype == np.float32  # embeddings stay float
    config = config_lib.load_run_config(int8_run)
    assert (config.model.quant, config.model.quant_group_size) == ("int8", 0)


def test_int8_run_evaluates_and_generates_close_to_float(stdlib_lm_run, int8_run):
    fp, q = LanguageModel.load(stdlib_lm_run), LanguageModel.load(int8_run)
    assert q.state.model_cfg.quant == "int8"
    tokens = jnp.asarray([[5, 9, 11, 3, 7, 2, 8, 4]])
    a, b = fp.state.merge(fp.params)(tokens), q.state.merge(q.params)(tokens)
    assert 0 < float(jnp.max(jnp.abs(a - b))) < 0.02 * float(jnp.max(jnp.abs(a)))
    ours, theirs = evaluate_run(int8_run, max_batches=2), evaluate_run(stdlib_lm_run, max_batches=2)
    assert abs(ours["bits_per_byte"] - theirs["bits_per_byte"]) < 0.01
    assert q.generate(["def "], max_new_tokens=4, temperature=0.0)
    # The same quantization as a load-time transform of the float run.
    c = config_lib.load_run_config(stdlib_lm_run, ["model.transforms=jaxlm.compress.quantize:int8"])
    s = train.setup(c, stdlib_lm_run, optimizer=False)
    params, ms = s.model.transformed(fp.params, ("jaxlm.compress.quantize:int8",))
    assert ms.model_cfg.quant == "int8"
    for name, leaf in flat_params(params).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_params(q.params)[name]))


def test_int4_through_the_cli(stdlib_lm_run, int8_run, tmp_path):
    cli = [sys.executable, "-m", "jaxlm.cli.compress", "quantize", "--workdir"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([*cli, *a], capture_output=True, text=True, env=env)
    out = run(
        str(stdlib_lm_run), "--out", str(tmp_path / "int4"), "--bits", "4", "--group_size", "8"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    fp, q = saved_params(stdlib_lm_run), saved_params(tmp_path / "int4")
    name = "blocks/0/mlp/down/kernel"  # [64, 32]: 32 x 32 bytes packed, 8 groups of 8 rows
    assert q[name].dtype == np.uint8 and q[name].shape == (32, 32)
    assert q[name].nbytes * 8 == fp[name].nbytes  # half a byte per fp32 weight
    assert q["blocks/0/mlp/down/scale"].shape == (8, 32)
    assert q["blocks/0/attn/out/kernel"].shape == (16, 32)  # [4, 8, 32]: 32 inputs
    assert np.isfinite(evaluate_run(tmp_path / "int4", max_batches=1)["bits_per_byte"])
    # Bad input: one line naming the key, nothing written.
    bad = run(
        str(stdlib_lm_run), "--out", str(tmp_path / "bad"), "--bits", "4", "--group_size", "6"
    )
    assert bad.returncode == 2 and "model.quant_group_size=6 does not divide" in bad.stderr
    again = run(str(int8_run), "--out", str(tmp_path / "again"))
    assert again.returncode == 2 and "model.quant=int8" in again.stderr, again.stderr
    assert again.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]


def test_a_quantized_run_does_not_train(int8_run, tmp_path):
    c = config_lib.load_run_config(int8_run)
    with pytest.raises(ConfigError, match="model.quant=int8: a quantized run is for jaxlm-eval"):
        train.train(c, tmp_path / "run")
    c.model.quant, c.train.init_from = "none", str(int8_run)
    with pytest.raises(ConfigError, match=r"is quantized \(model.quant=int8\); start from"):
        train.train(c, tmp_path / "ft")


def test_qat_trains_finite_and_resumes_exactly(tmp_path, one_device):
    c = tiny_config()
    c.train.qat, c.train.steps, c.train.checkpoint_every = True, 4, 2
    straight = train.train(c, tmp_path / "a", one_device)
    assert np.isfinite(straight["eval/loss"])
    s = train.setup(c, tmp_path / "a", one_device)
    batch = jax.tree.map(jnp.asarray, s.data.train_batch(0))
    loss = lambda p: s.objective.loss_sums(s.model.merge(p), batch, None)["nll"]
    with s.model.rules_context():
        grads = jax.jit(jax.grad(loss))(train.create_state(s)["params"])
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0  # straight-through: every kernel learns
    c.train.stop_at = 2
    train.train(c, tmp_path / "b", one_device)
    c.train.stop_at = 0
    train.train(c, tmp_path / "b", one_device)
    for x, y in zip(
        jax.tree.leaves(saved_params(tmp_path / "a")),
        jax.tree.leaves(saved_params(tmp_path / "b")),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
