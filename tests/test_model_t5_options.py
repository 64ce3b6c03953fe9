"""T5's model options: unscaled attention (model.attention_scale) and the scaled tied output
(model.scale_tied_output), in every attention path and through the config."""

import math
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_families import build, tokens

from jaxlm import config as config_lib
from jaxlm.models.attention import attention_reference, grouped_attention, to_cache_layout
from jaxlm.models.families import build_model


def _qkv(seed: int = 3):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32)
    return q, k, v


def test_attention_scale_in_the_kernel_and_the_decoding_path():
    """scale=1.0 gives softmax(q.k) in the training kernel and in grouped (decoding) attention."""

    @jax.jit  # one compile: op-by-op dispatch is what costs on a shared CPU
    def all_paths(q, k, v):
        causal_TS = jnp.tril(jnp.ones((8, 8), bool))
        return (
            attention_reference(q, k, v, causal=True, scale=1.0),
            jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=1.0),
            grouped_attention(
                q, to_cache_layout(k), to_cache_layout(v), causal_TS[None], scale=1.0
            ),
            attention_reference(q, k, v, causal=True),
        )

    q, k, v = _qkv()
    ref, kernel, grouped, default = map(np.asarray, all_paths(q, k, v))
    np.testing.assert_allclose(kernel, ref, atol=1e-5)
    np.testing.assert_allclose(grouped, ref, atol=1e-5)
    # The reference itself: head 0 of query 1 by hand, with an unscaled dot product.
    s = np.asarray(q[0, 1, 0]) @ np.asarray(k[0, :2, 0]).T
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(ref[0, 1, 0], p @ np.asarray(v[0, :2, 0]), atol=1e-5)
    assert np.max(np.abs(default - ref)) > 1e-2


def test_attention_scale_reaches_every_attention():
    """Encoder, decoder and cross-attention: 0 and an explicit 1/sqrt(head_dim) agree; 1.0 not.

    (Cached decoding with attention_scale=1.0 is tests/test_seq2seq_decode.py's.)
    """
    model, cfg = build("encoder_decoder")
    _, params = nnx.split(model, nnx.Param)
    # The same parameters under each scale (graphdefs only: no second init).
    graphdefs = [
        nnx.split(
            nnx.eval_shape(
                lambda s=s: build_model(replace(cfg, attention_scale=s), rngs=nnx.Rngs(0))
            ),
            nnx.Param,
        )[0]
        for s in (0.0, 1 / math.sqrt(cfg.head_dim), 1.0)
    ]

    @jax.jit
    def logits(params, x):
        return [nnx.merge(g, params)(x, x) for g in graphdefs]

    base, explicit, unscaled = map(np.asarray, logits(params, jnp.asarray(tokens(0, (2, 8)))))
    np.testing.assert_allclose(explicit, base, atol=1e-6)
    assert np.max(np.abs(unscaled - base)) > 1e-4


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("tie", [True, False])
def test_scale_tied_output_multiplies_hidden_states_by_rsqrt_d_model(family, tie):
    plain, cfg = build(family, tie_embeddings=tie)
    scaled, _ = build(family, tie_embeddings=tie, scale_tied_output=True)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, cfg.d_model)), jnp.float32)
    np.testing.assert_allclose(scaled.logits(h), plain.logits(h * cfg.d_model**-0.5), rtol=1e-6)
    assert float(jnp.max(jnp.abs(scaled.logits(h) - plain.logits(h)))) > 1e-3


def test_config_keys_reach_the_model_and_are_checked():
    c = tiny_config()
    c.model.family = "encoder_decoder"
    config_lib.apply_overrides(c, ["model.attention_scale=1", "model.scale_tied_output=true"])
    cfg = config_lib.model_config(c, 64)
    assert (cfg.attention_scale, cfg.scale_tied_output) == (1.0, True)
    config_lib.apply_overrides(c, ["model.attention_scale=-1"])
    with pytest.raises(config_lib.ConfigError, match="'model.attention_scale' must be >= 0"):
        config_lib.validate(c)
    c = tiny_config()
    c.model.family, c.model.scale_tied_output = "encoder", True
    with pytest.raises(config_lib.ConfigError, match="leave it False for family=encoder"):
        config_lib.model_config(c, 64)
