"""Encoder-only (BERT-style) model: bidirectional blocks, a masked-LM head and a pooled output.

Shape legend: B batch, T length, D d_model, V vocabulary, C classes. Attention sees the whole
row in both directions; segment ids (0 = padding) keep padding and packed segments out of it.
The MLM head is the tied token embedding (or an untied [D, V] head) plus a per-token bias, after
BERT's dense + activation + norm transform when `mlm_transform` is set. With `type_vocab_size`
token-type embeddings (BERT's sentence A/B) are added to the token embeddings; rows given no
type ids use type 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxlm.models.heads import (
    ClassificationHead,
    MLMTransform,
    make_lm_head,
    pool,
    split_key,
    vocab_logits,
)
from jaxlm.models.layers import Embed, dtype_of, make_param
from jaxlm.models.spec import TransformerConfig
from jaxlm.models.transformer import TokenLM


class EncoderLM(TokenLM):
    """tokens [B, T] -> masked-LM logits [B, T, V]; `classify` -> [B, C]."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        pdt = dtype_of(cfg.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs, **common)
        if cfg.type_vocab_size:
            # Few rows, rarely divisible by a mesh axis: replicated along them.
            shape = (cfg.type_vocab_size, cfg.d_model)
            self.type_embed = make_param(rngs, shape, (None, "embed"), cfg.init_std, pdt)
        super().__init__(cfg, cfg.num_layers, causal=False, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = make_lm_head(cfg, rngs)
        if cfg.mlm_transform:
            self.mlm_transform = MLMTransform(cfg, rngs=rngs)
        self.mlm_bias = make_param(rngs, (cfg.vocab_size,), ("vocab",), 0.0, pdt)
        if cfg.num_classes:
            self.classifier = ClassificationHead(cfg, rngs=rngs)

    def __call__(self, tokens_BT, *, token_types_BT=None, **kwargs):
        """Logits [B, T, V]; kwargs as `hidden` (positions, segment ids, dropout key)."""
        return self.logits(self.hidden(tokens_BT, token_types_BT=token_types_BT, **kwargs))

    def hidden(
        self,
        tokens_BT,
        *,
        token_types_BT=None,
        positions_BT=None,
        segment_ids_BT=None,
        dropout_key=None,
    ):
        """Final hidden states [B, T, D] of tokens (and their token types, default 0)."""
        x_BTD = self.embed(tokens_BT)
        if self.cfg.type_vocab_size:
            types_BT = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
            x_BTD = x_BTD + jnp.take(self.type_embed[...], types_BT, axis=0).astype(x_BTD.dtype)
        return self.run(
            x_BTD, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, dropout_key=dropout_key
        )

    def logits(self, h_BTD):
        if self.cfg.mlm_transform:
            h_BTD = self.mlm_transform(h_BTD)
        lm_head = None if self.cfg.tie_embeddings else self.lm_head
        return vocab_logits(h_BTD, self.embed, lm_head, self.mlm_bias)

    def pooled(self, h_BTD, segment_ids_BT=None):
        """One vector [B, D] per unpacked row: first token or mean of real tokens (config)."""
        return pool(h_BTD, segment_ids_BT, self.cfg.pooling_used)

    def classify(self, tokens_BT, *, token_types_BT=None, segment_ids_BT=None, dropout_key=None):
        """Class logits [B, C] from the pooled encoder output."""
        body_key, head_key = split_key(dropout_key)
        h_BTD = self.hidden(
            tokens_BT,
            token_types_BT=token_types_BT,
            segment_ids_BT=segment_ids_BT,
            dropout_key=body_key,
        )
        return self.classifier(self.pooled(h_BTD, segment_ids_BT), head_key)
