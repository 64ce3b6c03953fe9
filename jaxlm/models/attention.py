"""Multi-head attention with grouped-query heads, RoPE or T5 relative bias, and masks.

Shape legend: B batch, T query length, S key length, D d_model, N query heads, K key/value heads,
H head dim, R relative-position buckets. The kernel is `jax.nn.dot_product_attention`, so
`attention_impl="cudnn"` gives cuDNN flash attention on NVIDIA GPUs and `"xla"` runs everywhere.
Self-attention and cross-attention share this module (cross-attention passes `kv_BSD`), so
encoder, decoder and encoder-decoder models all build on it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.models.layers import (
    DenseGeneral,
    dense_options,
    dtype_of,
    make_param,
    residual_std,
    rope,
)

# Decoding caches hold keys and values as [B, K, S, H]: the grouped-attention einsums contract
# over H and S per (batch, kv head), so this layout is read in place; [B, S, K, H] made XLA copy
# the whole cache into it on every decode step (most of a batch-32 step).
CACHE_AXES = ("batch", "kv_heads", "length", "kv")


def to_cache_layout(x_BSKH, dtype=None):
    """Keys or values [B, S, K, H] from the projections -> the cache layout [B, K, S, H]."""
    x_BKSH = jnp.swapaxes(x_BSKH, 1, 2)
    return sharding.constrain(x_BKSH if dtype is None else x_BKSH.astype(dtype), CACHE_AXES)


def segment_mask(q_segment_BT, kv_segment_BS):
    """[B, 1, T, S] True where query and key share a segment and the key is not padding (0)."""
    same = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    return (same & (kv_segment_BS[:, None, :] != 0))[:, None, :, :]


def cross_mask(q_segment_BT, kv_segment_BS):
    """Cross-attention mask: [B, 1, T, S] by segment, [B, 1, 1, S] padding only, or None."""
    if kv_segment_BS is None:
        return None
    if q_segment_BT is None:
        return (kv_segment_BS != 0)[:, None, None, :]
    return segment_mask(q_segment_BT, kv_segment_BS)


def relative_bucket(relative_BTS, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of each key-minus-query offset: exact near zero, log-spaced out to max_distance.

    Bidirectional buckets give each direction half the buckets; causal ones fold every future
    offset into bucket 0 (those keys are masked anyway).
    """
    back_BTS = -relative_BTS  # how far the key lies before the query
    bucket_BTS = jnp.zeros_like(back_BTS)
    if bidirectional:
        num_buckets //= 2
        bucket_BTS = jnp.where(back_BTS < 0, num_buckets, 0)
        back_BTS = jnp.abs(back_BTS)
    else:
        back_BTS = jnp.maximum(back_BTS, 0)
    exact = num_buckets // 2
    # Offsets past `exact` share buckets logarithmically; clamp before log so 0 never reaches it.
    far = jnp.log(jnp.maximum(back_BTS, exact).astype(jnp.float32) / exact)
    far = exact + (far / math.log(max_distance / exact) * (num_buckets - exact)).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return bucket_BTS + jnp.where(back_BTS < exact, back_BTS, far)


class RelativePositionBias(nnx.Module):
    """A learned bias per (bucket, head), added to attention logits; one table per stack (T5)."""

    def __init__(self, cfg, *, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.dtype = dtype_of(cfg.dtype)
        self.table = make_param(
            rngs,
            (cfg.relative_buckets, cfg.num_heads),
            (None, "heads"),
            cfg.init_std,
            dtype_of(cfg.param_dtype),
        )

    def __call__(self, q_positions_BT, k_positions_BS):
        """Bias [B, N, T, S] for queries and keys at these positions."""
        relative_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
        bucket_BTS = relative_bucket(
            relative_BTS,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias_BTSN = jnp.take(self.table[...], bucket_BTS, axis=0)
        return jnp.transpose(bias_BTSN, (0, 3, 1, 2)).astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dense_options(cfg)
        std = cfg.init_std
        self.query = DenseGeneral(
            (d,), (n, h), ("embed", "heads", "kv"), std=std, rngs=rngs, **common
        )
        self.key = DenseGeneral(
            (d,), (k, h), ("embed", "kv_heads", "kv"), std=std, rngs=rngs, **common
        )
        self.value = DenseGeneral(
            (d,), (k, h), ("embed", "kv_heads", "kv"), std=std, rngs=rngs, **common
        )
        self.out = DenseGeneral(
            (n, h), (d,), ("heads", "kv", "embed"), std=residual_std(cfg), rngs=rngs, **common
        )

    def __call__(
        self,
        x_BTD,
        *,
        positions_BT=None,
        mask_B1TS=None,
        causal: bool,
        kv_BSD=None,
        kv_positions_BS=None,
        bias_BNTS=None,
    ):
        """Self-attention when kv_BSD is None, else cross-attention onto kv_BSD (no RoPE)."""
        cross = kv_BSD is not None
        src_BSD = kv_BSD if cross else x_BTD
        q_BTNH = self.query(x_BTD)
        k_BSKH = self.key(src_BSD)
        v_BSKH = self.value(src_BSD)
        if self.cfg.positions == "rope" and not cross:
            q_BTNH = rope(q_BTNH, positions_BT, self.cfg.rope_theta)
            k_BSKH = rope(
                k_BSKH,
                positions_BT if kv_positions_BS is None else kv_positions_BS,
                self.cfg.rope_theta,
            )
        return self._attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, causal, bias_BNTS)

    def project_kv(self, src_BSD) -> dict:
        """Cross-attention keys and values of an encoder output, computed once for decoding.

        Stored in the cache layout [B, K, S, H] (see `to_cache_layout`).
        """
        return {
            "k_BKSH": to_cache_layout(self.key(src_BSD)),
            "v_BKSH": to_cache_layout(self.value(src_BSD)),
        }

    @property
    def scale(self) -> float | None:
        """The score scale: model.attention_scale, or None for 1/sqrt(head_dim) (0 in config)."""
        return self.cfg.attention_scale or None

    def attend_cached(self, x_BTD, kv: dict, mask_BTS):
        """Cross-attention of T new tokens onto precomputed `project_kv` keys and values."""
        q_BTNH = self.query(x_BTD)
        o_BTNH = grouped_attention(q_BTNH, kv["k_BKSH"], kv["v_BKSH"], mask_BTS, scale=self.scale)
        return self.out(o_BTNH)

    def decode(self, x_BTD, cache: dict, index_B, bias_BNTS=None):
        """Causal self-attention of T new tokens against a KV cache; returns (out, cache).

        Row b's new tokens sit at positions index_B[b] + [0, T): their keys and values are
        written there, and each attends to every cached key at or before its own position.
        Keys past that (stale or padding) are masked, so rows may have different lengths.
        The cache is [B, K, S, H] (`CACHE_AXES`), the layout the attention einsums read.
        """
        t, s = x_BTD.shape[1], cache["k_BKSH"].shape[2]
        positions_BT = index_B[:, None] + jnp.arange(t, dtype=jnp.int32)
        q_BTNH = self.query(x_BTD)
        k_BTKH = self.key(x_BTD)
        v_BTKH = self.value(x_BTD)
        if self.cfg.positions == "rope":
            q_BTNH = rope(q_BTNH, positions_BT, self.cfg.rope_theta)
            k_BTKH = rope(k_BTKH, positions_BT, self.cfg.rope_theta)
        # Per row, the T new [K, T, H] slices go in along S (axis 1 of a row's [K, S, H]).
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=1))
        k_BKSH = write(cache["k_BKSH"], to_cache_layout(k_BTKH, cache["k_BKSH"].dtype), index_B)
        v_BKSH = write(cache["v_BKSH"], to_cache_layout(v_BTKH, cache["v_BKSH"].dtype), index_B)
        k_BKSH = sharding.constrain(k_BKSH, CACHE_AXES)
        v_BKSH = sharding.constrain(v_BKSH, CACHE_AXES)
        mask_BTS = jnp.arange(s)[None, None, :] <= positions_BT[:, :, None]
        o_BTNH = grouped_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, bias_BNTS, scale=self.scale)
        out_BTD = self.out(o_BTNH)
        return out_BTD, {"k_BKSH": k_BKSH, "v_BKSH": v_BKSH}

    def _attend(self, q_BTNH, k_BSKH, v_BSKH, mask_B1TS, causal: bool, bias_BNTS):
        q_BTNH = sharding.constrain(q_BTNH, ("batch", "length", "heads", "kv"))
        k_BSKH = sharding.constrain(k_BSKH, ("batch", "length", "kv_heads", "kv"))
        v_BSKH = sharding.constrain(v_BSKH, ("batch", "length", "kv_heads", "kv"))
        if self.cfg.attention_impl == "xla" and bias_BNTS is None:
            o_BTNH = softmax_attention(
                q_BTNH, k_BSKH, v_BSKH, mask_B1TS, causal=causal, scale=self.scale
            )
            return self.out(o_BTNH)
        o_BTNH = jax.nn.dot_product_attention(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            bias=bias_BNTS,
            mask=mask_B1TS,
            is_causal=causal,
            scale=self.scale,
            implementation=self.cfg.attention_impl,
        )
        return self.out(o_BTNH)


def _allowed_1TS(mask_B1TS, causal: bool, t: int, s: int):
    """The combined boolean mask (None: every key allowed), broadcastable to [B, 1, T, S]."""
    allowed = mask_B1TS
    if causal:
        tril_11TS = jnp.tril(jnp.ones((t, s), bool))[None, None]
        allowed = tril_11TS if allowed is None else allowed & tril_11TS
    return allowed


def _masked_logits(q_BTKGH, k_BSKH, allowed, scale: float):
    """fp32 scores [B, K, G, T, S], masked keys set to jax's large negative (softmax -> 0)."""
    logits_BKGTS = jnp.einsum(
        "btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    )
    logits_BKGTS = logits_BKGTS * jnp.float32(scale)
    if allowed is not None:
        # Same constant as jax.nn.dot_product_attention: a row with no allowed key is uniform.
        big_neg = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
        logits_BKGTS = jnp.where(allowed[:, :, None], logits_BKGTS, big_neg)
    return logits_BKGTS


def _grouped(q_BTNH, k_BSKH):
    b, t, n, h = q_BTNH.shape
    return q_BTNH.reshape(b, t, k_BSKH.shape[2], n // k_BSKH.shape[2], h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q_BTNH, k_BSKH, v_BSKH, allowed, scale):
    return _softmax_attention_fwd(q_BTNH, k_BSKH, v_BSKH, allowed, scale)[0]


def _softmax_attention_fwd(q_BTNH, k_BSKH, v_BSKH, allowed, scale):
    q_BTKGH = _grouped(q_BTNH, k_BSKH)
    logits_BKGTS = _masked_logits(q_BTKGH, k_BSKH, allowed, scale)
    max_BKGT1 = jax.lax.stop_gradient(logits_BKGTS.max(axis=-1, keepdims=True))
    unnorm_BKGTS = jnp.exp(logits_BKGTS - max_BKGT1)
    sum_BKGT1 = unnorm_BKGTS.sum(axis=-1, keepdims=True)
    probs_BKGTS = (unnorm_BKGTS / sum_BKGT1).astype(v_BSKH.dtype)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    o_BTNH = o_BTKGH.reshape(q_BTNH.shape)
    # logsumexp kept as (max, log sum): max + log(sum) would round away log(sum) in a row with
    # no allowed key (max is the large negative), whose probabilities are 1/S, not 1.
    return o_BTNH, (q_BTNH, k_BSKH, v_BSKH, allowed, o_BTNH, max_BKGT1, jnp.log(sum_BKGT1))


def _softmax_attention_bwd(scale, res, do_BTNH):
    q_BTNH, k_BSKH, v_BSKH, allowed, o_BTNH, max_BKGT1, logsum_BKGT1 = res
    q_BTKGH = _grouped(q_BTNH, k_BSKH)
    do_BTKGH = _grouped(do_BTNH, k_BSKH)
    # Probabilities recomputed from the saved logsumexp instead of stored [B, N, T, S] tensors.
    logits_BKGTS = _masked_logits(q_BTKGH, k_BSKH, allowed, scale)
    probs_BKGTS = jnp.exp(logits_BKGTS - max_BKGT1 - logsum_BKGT1)
    dv_BSKH = jnp.einsum("bkgts,btkgh->bskh", probs_BKGTS.astype(v_BSKH.dtype), do_BTKGH)
    dprobs_BKGTS = jnp.einsum(
        "btkgh,bskh->bkgts", do_BTKGH, v_BSKH, preferred_element_type=jnp.float32
    )
    # Softmax backward: dS = P * (dP - rowsum(dP * P)), and rowsum(dP * P) = rowsum(dO * O).
    rowsum_BTKG = jnp.sum(
        do_BTNH.astype(jnp.float32) * o_BTNH.astype(jnp.float32), axis=-1
    ).reshape(q_BTKGH.shape[:-1])
    rowsum_BKGT1 = jnp.transpose(rowsum_BTKG, (0, 2, 3, 1))[..., None]
    dlogits_BKGTS = probs_BKGTS * (dprobs_BKGTS - rowsum_BKGT1)
    if allowed is not None:  # masked logits are constants: no gradient (rows with no key)
        dlogits_BKGTS = jnp.where(allowed[:, :, None], dlogits_BKGTS, 0.0)
    dlogits_BKGTS = (dlogits_BKGTS * jnp.float32(scale)).astype(q_BTNH.dtype)
    dq_BTKGH = jnp.einsum("bkgts,bskh->btkgh", dlogits_BKGTS, k_BSKH)
    dk_BSKH = jnp.einsum("bkgts,btkgh->bskh", dlogits_BKGTS, q_BTKGH)
    return (
        dq_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype),
        dk_BSKH.astype(k_BSKH.dtype),
        dv_BSKH.astype(v_BSKH.dtype),
        None,
    )


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def softmax_attention(
    q_BTNH, k_BSKH, v_BSKH, mask_B1TS=None, *, causal: bool = False, scale: float | None = None
):
    """Softmax attention (GQA: K divides N) with a flash-style backward pass.

    Same values as `jax.nn.dot_product_attention(..., implementation="xla")` without bias; the
    backward recomputes probabilities from the saved logsumexp and uses
    dS = P * (dP - rowsum(dO * O)), which skips the [B, N, T, S] softmax residuals and the
    transposes XLA's autodiff of softmax makes. `mask_B1TS` broadcasts to [B, 1, T, S];
    `scale` None is 1/sqrt(H).
    """
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    allowed = _allowed_1TS(mask_B1TS, causal, t, s)
    if allowed is not None:
        allowed = jnp.broadcast_to(allowed, (allowed.shape[0], 1, t, s))
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1]) if scale is None else float(scale)
    return _softmax_attention(q_BTNH, k_BSKH, v_BSKH, allowed, scale)


def grouped_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, bias_BNTS=None, *, scale=None):
    """Softmax attention with query heads grouped onto their K/V head (G = N / K per group).

    Used for decoding: the cache is read once per step, never repeated per query head, which
    is what bounds a memory-bound decode step. Keys and values come in the cache layout
    [B, K, S, H], so both einsums contract without copying the cache into another layout.
    Scores and softmax in fp32. `mask_BTS` may broadcast ([B, 1, S] for cross-attention
    padding). `scale` None is 1/sqrt(H).
    """
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    scores_BKGTS = jnp.einsum("btkgh,bksh->bkgts", q_BTKGH, k_BKSH).astype(jnp.float32)
    scores_BKGTS = scores_BKGTS / jnp.sqrt(h) if scale is None else scores_BKGTS * scale
    if bias_BNTS is not None:
        scores_BKGTS = scores_BKGTS + bias_BNTS.reshape(-1, k, n // k, *bias_BNTS.shape[2:])
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -1e30)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
    o_BTKGH = jnp.einsum("bkgts,bksh->btkgh", probs_BKGTS, v_BKSH)
    return o_BTKGH.reshape(b, t, n, h)


def attention_reference(
    q_BTNH, k_BSKH, v_BSKH, mask_B1TS=None, causal: bool = False, scale: float | None = None
):
    """Plain softmax attention in fp32, for tests: the definition the kernels must match."""
    n, k = q_BTNH.shape[2], k_BSKH.shape[2]
    k_BSNH = jnp.repeat(k_BSKH, n // k, axis=2)
    v_BSNH = jnp.repeat(v_BSKH, n // k, axis=2)
    scores_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH)
    if scale is None:
        scores_BNTS = scores_BNTS / jnp.sqrt(q_BTNH.shape[-1])
    else:
        scores_BNTS = scores_BNTS * scale
    t, s = scores_BNTS.shape[-2:]
    allowed = jnp.ones((1, 1, t, s), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))[None, None]
    if mask_B1TS is not None:
        allowed = allowed & mask_B1TS
    scores_BNTS = jnp.where(allowed, scores_BNTS, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores_BNTS, axis=-1), v_BSNH)
