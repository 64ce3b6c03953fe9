"""Output heads shared by the model families: vocabulary logits, pooling, classification.

Shape legend: B batch, T length, D d_model, V vocabulary, C classes.

Classification rows are unpacked: one example per row, segment id 1 (or any non-zero id) on its
tokens and 0 on padding; without segment ids every position is a real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.models.layers import (
    MLP_ACTIVATIONS,
    DenseGeneral,
    Embed,
    dropout,
    dtype_of,
    make_norm,
    make_param,
)

# The function of each name in spec.CLASSIFIER_ACTIVATIONS.
CLASSIFIER_ACTIVATION_FNS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def make_lm_head(cfg, rngs: nnx.Rngs) -> nnx.Param:
    """An untied output projection [D, V] (with tied embeddings the model reuses `Embed`)."""
    shape = (cfg.d_model, cfg.vocab_size)
    return make_param(rngs, shape, ("embed", "vocab"), cfg.init_std, dtype_of(cfg.param_dtype))


def vocab_logits(h_BTD, embed: Embed, lm_head: nnx.Param | None, bias_V=None, *, scale=None):
    """Logits [B, T, V] through the tied embedding (lm_head None) or an untied [D, V] head.

    `scale` multiplies the hidden states first (T5 v1.0: d_model**-0.5, see `output_scale`).
    """
    if scale is not None:
        h_BTD = h_BTD * scale
    if lm_head is None:
        logits_BTV = embed.attend(h_BTD)
    else:
        logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, lm_head[...].astype(h_BTD.dtype))
    if bias_V is not None:
        logits_BTV = logits_BTV + bias_V[...].astype(logits_BTV.dtype)
    return sharding.constrain(logits_BTV, ("batch", "length", "vocab"))


def output_scale(cfg) -> float | None:
    """model.scale_tied_output's factor d_model**-0.5 (T5 v1.0 ties a tall embedding), or None."""
    return cfg.d_model**-0.5 if cfg.scale_tied_output else None


def pool(h_BTD, segment_ids_BT, how: str):
    """One vector [B, D] per row: the first token, the mean or the last real token."""
    if how == "first":
        return h_BTD[:, 0]
    b, t = h_BTD.shape[:2]
    real_BT = jnp.ones((b, t), bool) if segment_ids_BT is None else segment_ids_BT != 0
    if how == "mean":
        w_BT1 = real_BT[..., None].astype(jnp.float32)
        total_BD = jnp.sum(h_BTD.astype(jnp.float32) * w_BT1, axis=1)
        return (total_BD / jnp.maximum(jnp.sum(w_BT1, axis=1), 1.0)).astype(h_BTD.dtype)
    if how == "last":
        # Last True per row, counting from the end, so right padding of any length is skipped.
        last_B = t - 1 - jnp.argmax(real_BT[:, ::-1], axis=1)
        return jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
    raise ValueError(f"pooling {how!r}: use one of first, mean, last")


class ClassificationHead(nnx.Module):
    """Pooled [B, D] -> dense + tanh (BERT's pooler) or ReLU (DistilBERT) -> dropout -> [B, C]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, c = cfg.d_model, cfg.num_classes
        common = dict(use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.rate, self.activation = cfg.dropout, cfg.classifier_activation
        # The class axis is small and rarely divides a mesh axis, so it stays replicated.
        self.pooler = DenseGeneral((d,), (d,), ("embed", None), std=cfg.init_std, **common)
        self.out = DenseGeneral((d,), (c,), ("embed", None), std=cfg.init_std, **common)

    def __call__(self, pooled_BD, dropout_key: jax.Array | None = None):
        h_BD = CLASSIFIER_ACTIVATION_FNS[self.activation](self.pooler(pooled_BD))
        return self.out(dropout(h_BD, self.rate, dropout_key))


class MLMTransform(nnx.Module):
    """BERT's MLM transform before the vocabulary projection: dense D -> D, activation, norm.

    The activation is the MLP's (BERT: gelu_exact); for gated kinds, their gate activation.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, common = cfg.d_model, dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.act = MLP_ACTIVATIONS[cfg.mlp]
        self.dense = DenseGeneral(
            (d,), (d,), ("embed", None), std=cfg.init_std, use_bias=cfg.use_bias, **common
        )
        self.norm = make_norm(cfg.norm, d, eps=cfg.norm_eps, use_bias=cfg.use_bias, **common)

    def __call__(self, h_BTD):
        return self.norm(self.act(self.dense(h_BTD)))


def split_key(dropout_key: jax.Array | None) -> tuple:
    """(body key, head key), both None in evaluation."""
    return (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
