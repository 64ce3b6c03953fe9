"""The model config, Transformer blocks, the shared stack, and the decoder-only language model.

Shape legend: B batch, T length, S memory (encoder) length, D d_model, N heads, V vocabulary,
C classes. A `Block` is pre-norm (x + attn(norm(x)), [x + cross_attn(norm(x), memory)],
x + mlp(norm(x))) or, with block_norm="post" (BERT), post-norm (norm(x + attn(x)), ...). A
`Stack` is what every family shares: position embedding or bias, an optional embedding norm,
blocks and the final norm (pre-norm only); `causal` picks decoder or encoder attention and
`cross` adds cross-attention.
`TransformerLM` is a causal stack with a token embedding and an LM head; the encoder-only and
encoder-decoder families (encoder.py, encoder_decoder.py) reuse the same stack. The model never
reads a ConfigDict: it takes the frozen `TransformerConfig` that jaxlm.config.model_config builds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.models import layers
from jaxlm.models.attention import Attention, RelativePositionBias, cross_mask, segment_mask
from jaxlm.models.heads import (
    ClassificationHead,
    make_lm_head,
    output_scale,
    pool,
    split_key,
    vocab_logits,
)
from jaxlm.models.layers import MLP, Embed, dropout, dtype_of, make_norm, make_param
from jaxlm.models.spec import TransformerConfig

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, cross: bool = False, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype)
        make = lambda: make_norm(
            cfg.norm, cfg.d_model, param_dtype=cfg.param_dtype, rngs=rngs, **norm
        )
        self.rate, self.cross, self.post = cfg.dropout, cross, cfg.block_norm == "post"
        self.attn_norm = make()
        self.attn = Attention(cfg, rngs=rngs)
        if cross:
            self.cross_norm = make()
            self.cross_attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = make()
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(
        self,
        x_BTD,
        positions_BT,
        mask_B1TS,
        dropout_key,
        *,
        causal: bool,
        bias_BNTS=None,
        memory=None,
    ):
        """`memory` is (memory_BSD, cross mask [B, 1, T or 1, S] or None) for cross-attention."""
        n = 3 if self.cross else 2  # attention, MLP, cross-attention
        keys = [None] * n if dropout_key is None else list(jax.random.split(dropout_key, n))
        h_BTD = self.attn(
            self._norm_in(self.attn_norm, x_BTD),
            positions_BT=positions_BT,
            mask_B1TS=mask_B1TS,
            causal=causal,
            bias_BNTS=bias_BNTS,
        )
        x_BTD = self._add(self.attn_norm, x_BTD, h_BTD, keys[0])
        if self.cross:
            memory_BSD, memory_mask = memory
            h_BTD = self.cross_attn(
                self._norm_in(self.cross_norm, x_BTD),
                mask_B1TS=memory_mask,
                causal=False,
                kv_BSD=memory_BSD,
            )
            x_BTD = self._add(self.cross_norm, x_BTD, h_BTD, keys[2])
        return self._mlp(x_BTD, keys[1])

    def decode(self, x_BTD, cache: dict, index_B, *, bias_BNTS=None, memory=None):
        """The causal block over new tokens with a KV cache (no dropout): (x, cache).

        `memory` is (precomputed cross K/V of this block, encoder mask [B, 1, S]).
        """
        x_in = self._norm_in(self.attn_norm, x_BTD)
        h_BTD, cache = self.attn.decode(x_in, cache, index_B, bias_BNTS)
        x_BTD = self._add(self.attn_norm, x_BTD, h_BTD, None)
        if self.cross:
            kv, mask_B1S = memory
            x_in = self._norm_in(self.cross_norm, x_BTD)
            h_BTD = self.cross_attn.attend_cached(x_in, kv, mask_B1S)
            x_BTD = self._add(self.cross_norm, x_BTD, h_BTD, None)
        return self._mlp(x_BTD, None), cache

    def _mlp(self, x_BTD, key):
        h_BTD = self.mlp(self._norm_in(self.mlp_norm, x_BTD))
        x_BTD = self._add(self.mlp_norm, x_BTD, h_BTD, key)
        return sharding.constrain(x_BTD, ("batch", "length", None))

    def _norm_in(self, norm, x_BTD):
        """A sublayer's input: normed for pre-norm blocks, as is for post-norm ones."""
        return x_BTD if self.post else norm(x_BTD)

    def _add(self, norm, x_BTD, h_BTD, key):
        """The residual add of a sublayer's output, normed after it in post-norm blocks."""
        x_BTD = x_BTD + dropout(h_BTD, self.rate, key)
        return norm(x_BTD) if self.post else x_BTD


class Stack(nnx.Module):
    """Positions, blocks and final norm over token embeddings: the body of every family.

    The owner keeps the token embedding and the heads, so the encoder and decoder of an
    encoder-decoder model can share one table.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        num_layers: int,
        *,
        causal: bool,
        cross: bool = False,
        rngs: nnx.Rngs,
    ):
        self.cfg, self.causal = cfg, causal
        if cfg.positions == "learned":
            self.pos_embed = make_param(
                rngs,
                (cfg.max_len, cfg.d_model),
                (None, "embed"),
                cfg.init_std / 2,
                dtype_of(cfg.param_dtype),
            )
        if cfg.positions == "relative":
            self.relative_bias = RelativePositionBias(cfg, bidirectional=not causal, rngs=rngs)
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype)
        make = lambda: make_norm(
            cfg.norm, cfg.d_model, param_dtype=cfg.param_dtype, rngs=rngs, **norm
        )
        if cfg.embed_norm:
            self.embed_norm = make()
        self.blocks = nnx.List([Block(cfg, cross=cross, rngs=rngs) for _ in range(num_layers)])
        # Post-norm blocks already end in a norm (BERT has no final one).
        self.final_norm = make() if cfg.block_norm == "pre" else None

    def run(self, x_BTD, *, positions_BT=None, segment_ids_BT=None, dropout_key=None, memory=None):
        """Final-norm hidden states [B, T, D] of token embeddings `x_BTD`.

        `memory` is (memory_BSD, memory_segment_ids_BS or None): the encoder output to
        cross-attend to; its padding (segment 0) is masked, and with segment ids on both sides
        each packed target segment sees only its own source segment.
        """
        b, t = x_BTD.shape[:2]
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_B1TS = None
        if segment_ids_BT is not None:
            mask_B1TS = segment_mask(segment_ids_BT, segment_ids_BT)
        bias_BNTS = None
        if self.cfg.positions == "relative":
            bias_BNTS = self.relative_bias(positions_BT, positions_BT)
        if memory is not None:
            memory = (memory[0], cross_mask(segment_ids_BT, memory[1]))
        keys = [None] * (len(self.blocks) + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, len(self.blocks) + 1))
        x_BTD = self._add_positions(x_BTD, positions_BT, keys[-1])
        causal = self.causal

        def run_block(block, x, pos, mask, bias, mem, key):
            return block(x, pos, mask, key, causal=causal, bias_BNTS=bias, memory=mem)

        if self.cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.cfg.remat])
        # On CPU, XLA fuses the residual stream's gradient into every consumer, so each block's
        # backward recomputes the chain of all blocks above it (quadratic in depth; with GPT-2
        # blocks, half of a 4-block step). A barrier per block makes it materialize once.
        cpu = jax.default_backend() == "cpu"
        for block, key in zip(self.blocks, keys[:-1], strict=False):
            x_BTD = layers.fusion_barrier(x_BTD) if cpu else x_BTD
            x_BTD = run_block(block, x_BTD, positions_BT, mask_B1TS, bias_BNTS, memory, key)
        return self._final(x_BTD)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        """An empty KV cache per block for `batch` rows of up to `length` tokens."""
        cfg = self.cfg
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)  # attention.CACHE_AXES
        zeros = lambda: jnp.zeros(shape, dtype_of(cfg.dtype))
        return [{"k_BKSH": zeros(), "v_BKSH": zeros()} for _ in self.blocks]

    def run_cached(self, x_BTD, cache: list[dict], index_B, *, memory=None):
        """`run` for embeddings of tokens at positions index_B[b] + [0, T), with a KV cache.

        `memory` is (per-block cross K/V, encoder mask [B, S]). Returns (hidden, cache).
        """
        b, t = x_BTD.shape[:2]
        positions_BT = index_B[:, None] + jnp.arange(t, dtype=jnp.int32)
        x_BTD = self._add_positions(x_BTD, positions_BT, None)
        bias_BNTS = None
        if self.cfg.positions == "relative":
            s = cache[0]["k_BKSH"].shape[2]
            keys_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            bias_BNTS = self.relative_bias(positions_BT, keys_BS)
        new_cache = []
        for i, (block, layer_cache) in enumerate(zip(self.blocks, cache, strict=True)):
            mem = None if memory is None else (memory[0][i], memory[1][:, None, :])
            x_BTD, layer_cache = block.decode(
                x_BTD, layer_cache, index_B, bias_BNTS=bias_BNTS, memory=mem
            )
            new_cache.append(layer_cache)
        return self._final(x_BTD), new_cache

    def _final(self, x_BTD):
        return x_BTD if self.final_norm is None else self.final_norm(x_BTD)

    def _add_positions(self, x_BTD, positions_BT, dropout_key):
        if self.cfg.positions == "learned":
            x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(x_BTD.dtype)
        if self.cfg.embed_norm:
            x_BTD = self.embed_norm(x_BTD)
        x_BTD = dropout(x_BTD, self.cfg.dropout, dropout_key)
        return sharding.constrain(x_BTD, ("batch", "length", None))


class TokenLM(Stack):
    """One stack over token embeddings; subclasses set `embed` and define `logits`."""

    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, dropout_key=None):
        return self.logits(
            self.hidden(
                tokens_BT,
                positions_BT=positions_BT,
                segment_ids_BT=segment_ids_BT,
                dropout_key=dropout_key,
            )
        )

    def hidden(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None, dropout_key=None):
        """Final-norm hidden states [B, T, D]; `logits` projects them (loss code may chunk it)."""
        return self.run(
            self.embed(tokens_BT),
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            dropout_key=dropout_key,
        )


class TransformerLM(TokenLM):
    """Decoder-only language model: tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        # Creation order fixes the initial values: embedding, positions, blocks, norm, head.
        self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs, **common)
        super().__init__(cfg, cfg.num_layers, causal=True, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = make_lm_head(cfg, rngs)
        if cfg.num_classes:
            self.classifier = ClassificationHead(cfg, rngs=rngs)

    def decode(self, tokens_BT, cache: list[dict], index_B):
        """Logits [B, T, V] for tokens at positions index_B[b] + [0, T), and the updated cache.

        Prefill is `decode(prompts, empty_cache, zeros)`; each sampling step then feeds one
        token per row at that row's length. Equals the full forward pass on the same prefix.
        """
        h_BTD, cache = self.run_cached(self.embed(tokens_BT), cache, index_B)
        return self.logits(h_BTD), cache

    def logits(self, h_BTD):
        lm_head = None if self.cfg.tie_embeddings else self.lm_head
        return vocab_logits(h_BTD, self.embed, lm_head, scale=output_scale(self.cfg))

    def classify(self, tokens_BT, *, segment_ids_BT=None, dropout_key=None):
        """Class logits [B, C] from the hidden state at each row's last real token."""
        body_key, head_key = split_key(dropout_key)
        h_BTD = self.hidden(tokens_BT, segment_ids_BT=segment_ids_BT, dropout_key=body_key)
        pooled_BD = pool(h_BTD, segment_ids_BT, self.cfg.pooling_used)
        return self.classifier(pooled_BD, head_key)
