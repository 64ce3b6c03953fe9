"""Encoder-decoder (T5 / translation-style) model.

Shape legend: B batch, S source (encoder) length, T target (decoder) length, D d_model,
V vocabulary. The encoder is a bidirectional `Stack`; the decoder is a causal `Stack` whose
blocks also cross-attend to the encoder output. Encoder padding (segment 0) is never attended;
with segment ids on both sides, packed pairs stay separate (target segment i sees source
segment i only). Positions come from the config: RoPE and learned tables per stack, or T5
relative buckets (bidirectional in the encoder, causal in the decoder); cross-attention has no
position signal, as in T5. The decoder embedding is also the tied output projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.models.heads import make_lm_head, output_scale, vocab_logits
from jaxlm.models.layers import Embed
from jaxlm.models.spec import TransformerConfig
from jaxlm.models.transformer import Stack


class EncoderDecoder(nnx.Module):
    """(source tokens [B, S], decoder inputs [B, T]) -> logits [B, T, V], teacher forced."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        common = dict(std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.embed = Embed(cfg.vocab_size, cfg.d_model, **common)
        if not cfg.share_embeddings:
            self.encoder_embed = Embed(cfg.vocab_size, cfg.d_model, **common)
        self.encoder = Stack(cfg, cfg.num_layers, causal=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = make_lm_head(cfg, rngs)

    def __call__(
        self,
        encoder_tokens_BS,
        decoder_tokens_BT,
        *,
        encoder_positions_BS=None,
        encoder_segment_ids_BS=None,
        decoder_positions_BT=None,
        decoder_segment_ids_BT=None,
        dropout_key=None,
    ):
        return self.logits(
            self.hidden(
                encoder_tokens_BS,
                decoder_tokens_BT,
                encoder_positions_BS=encoder_positions_BS,
                encoder_segment_ids_BS=encoder_segment_ids_BS,
                decoder_positions_BT=decoder_positions_BT,
                decoder_segment_ids_BT=decoder_segment_ids_BT,
                dropout_key=dropout_key,
            )
        )

    def encode(self, tokens_BS, *, positions_BS=None, segment_ids_BS=None, dropout_key=None):
        """The encoder output [B, S, D] (final-normed), the memory the decoder attends to."""
        embed = self.embed if self.cfg.share_embeddings else self.encoder_embed
        return self.encoder.run(
            embed(tokens_BS),
            positions_BT=positions_BS,
            segment_ids_BT=segment_ids_BS,
            dropout_key=dropout_key,
        )

    def hidden(
        self,
        encoder_tokens_BS,
        decoder_tokens_BT,
        *,
        encoder_positions_BS=None,
        encoder_segment_ids_BS=None,
        decoder_positions_BT=None,
        decoder_segment_ids_BT=None,
        dropout_key=None,
    ):
        """Decoder final-norm hidden states [B, T, D]; `logits` projects them."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        memory_BSD = self.encode(
            encoder_tokens_BS,
            positions_BS=encoder_positions_BS,
            segment_ids_BS=encoder_segment_ids_BS,
            dropout_key=keys[0],
        )
        return self.decoder.run(
            self.embed(decoder_tokens_BT),
            positions_BT=decoder_positions_BT,
            segment_ids_BT=decoder_segment_ids_BT,
            dropout_key=keys[1],
            memory=(memory_BSD, encoder_segment_ids_BS),
        )

    def logits(self, h_BTD):
        lm_head = None if self.cfg.tie_embeddings else self.lm_head
        return vocab_logits(h_BTD, self.embed, lm_head, scale=output_scale(self.cfg))

    def init_cache(self, memory_BSD, memory_segment_ids_BS, length: int) -> dict:
        """A decoding cache for rows of up to `length` target tokens over an encoded source.

        Self-attention K/V start empty; cross-attention K/V of every block are computed once
        here. Only "self" changes while decoding (beam search reorders only that part).
        """
        b, s = memory_BSD.shape[:2]
        if memory_segment_ids_BS is None:
            memory_segment_ids_BS = jnp.ones((b, s), jnp.int32)
        return {
            "self": self.decoder.init_cache(b, length),
            "cross": [blk.cross_attn.project_kv(memory_BSD) for blk in self.decoder.blocks],
            "memory_mask_BS": memory_segment_ids_BS != 0,
        }

    def decode(self, tokens_BT, cache: dict, index_B):
        """Logits [B, T, V] for decoder tokens at positions index_B[b] + [0, T), and the cache.

        Equals the teacher-forced forward pass on the same source and target prefix.
        """
        h_BTD, self_cache = self.decoder.run_cached(
            self.embed(tokens_BT),
            cache["self"],
            index_B,
            memory=(cache["cross"], cache["memory_mask_BS"]),
        )
        return self.logits(h_BTD), {**cache, "self": self_cache}
