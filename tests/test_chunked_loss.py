"""task.logits_chunk: the token losses project hidden states to logits a block at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import losses_after, tiny_config
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import evaluate, objectives, train
from jaxlm.benchmark import memory_report
from jaxlm.config import ConfigError


@pytest.mark.parametrize("chunk", [4, 6, 15])  # T=16: 4 x 4; 3 x 6, the last padded; 2 x 8
def test_chunked_sums_and_gradients_equal_whole(chunk):
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (3, 16, 8))
    w = jax.random.normal(k[1], (8, 50))
    targets = jax.random.randint(k[2], (3, 16), 0, 50)
    mask = (jax.random.uniform(k[3], (3, 16)) > 0.3).astype(jnp.float32)

    def loss(w, h, chunk):
        sums = evaluate.projected_sums(
            objectives.token_sums, lambda x: x @ w, h, targets, mask, chunk
        )
        return sums["nll"] / sums["tokens"], sums

    (whole, want), grads_want = jax.value_and_grad(loss, (0, 1), has_aux=True)(w, h, 0)
    (got_loss, got), grads_got = jax.value_and_grad(loss, (0, 1), has_aux=True)(w, h, chunk)
    np.testing.assert_allclose(got_loss, whole, rtol=1e-6)
    for key in ("nll", "tokens", "correct"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
    assert float(want["tokens"]) == float(mask.sum()) and float(want["correct"]) > 0
    for g_got, g_want in zip(grads_got, grads_want, strict=True):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "objective,family",
    [("lm", "decoder"), ("mlm", "encoder"), ("seq2seq", "encoder_decoder"), ("seq2seq", "decoder")],
)
def test_chunked_training_equals_whole_sharded(objective, family, tmp_path):
    """Three steps with 3-position blocks (the last one padded) on a 2x2x2 mesh equal whole
    logits on one device."""
    c = tiny_config(objective=objective)
    c.model.family = family
    want = losses_after(c, jax.devices()[:1], tmp_path / "whole")
    c.task.logits_chunk = 3
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    np.testing.assert_allclose(losses_after(c, None, tmp_path / "chunked"), want, rtol=1e-5)


def test_eval_sums_equal_whole(tmp_path):
    c = tiny_config()
    s = train.setup(c, tmp_path / "a", jax.devices()[:1])
    model = nnx.merge(s.graphdef, train.create_state(s)["params"])
    batch = jax.tree.map(jnp.asarray, s.data.train_batch(0))
    whole = evaluate.lm_sums(model, batch)
    chunked = evaluate.lm_sums(model, batch, logits_chunk=4)
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-6)


def test_chunking_shrinks_the_compiled_step():
    """The compiled train step's temporaries drop when [B, T, V] logits never exist whole."""
    c = tiny_config()
    c.model.vocab_size, c.data.seq_len, c.model.max_len = 4096, 64, 64
    c.mesh.data = 1
    whole = memory_report(c, jax.devices()[:1])["temp_bytes"]
    c.task.logits_chunk = 8
    chunked = memory_report(c, jax.devices()[:1])["temp_bytes"]
    logits_bytes = c.data.batch_size * 64 * 4096 * 4  # one fp32 copy: 8 MiB
    assert whole - chunked > logits_bytes, (whole, chunked)


def test_bad_chunks_are_config_errors():
    c = tiny_config()
    c.task.logits_chunk = -1
    with pytest.raises(ConfigError, match="task.logits_chunk must be >= 0"):
        config_lib.validate(c)
    c = tiny_config(objective="classify")
    c.task.logits_chunk = 8
    with pytest.raises(ConfigError, match="classify has class logits only"):
        config_lib.validate(c)
