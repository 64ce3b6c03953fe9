"""Metrics shared by the training loop and the eval program.

Language-model metrics are accumulated as sums (negative log-likelihood in nats, real target
tokens, UTF-8 bytes of those tokens) and finished once:
loss = sum NLL / tokens, perplexity = exp(loss), bits per byte = sum NLL / ln 2 / bytes.
Bits per byte does not depend on the tokenizer, so runs with different vocabularies compare.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def token_nll(logits_BTV, targets_BT):
    """Per-token negative log-likelihood in fp32 (logits may be bf16)."""
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return logz - target_logit


def hidden(model, batch, *, packed: bool, dropout_key=None):
    """Final hidden states [B, T, D] of a decoder for an LM batch; unpacked rows skip the
    segment mask (cuDNN then runs pure causal)."""
    if not packed:
        return model.hidden(batch["inputs"], dropout_key=dropout_key)
    return model.hidden(
        batch["inputs"],
        positions_BT=batch["positions"],
        segment_ids_BT=batch["segment_ids"],
        dropout_key=dropout_key,
    )


def forward(model, batch, *, packed: bool, dropout_key=None):
    """Logits [B, T, V] for an LM batch."""
    return model.logits(hidden(model, batch, packed=packed, dropout_key=dropout_key))


def nll_sums(logits_BTV, targets_BT, mask_BT) -> dict[str, jax.Array]:
    """Summed NLL and counted tokens over mask_BT (0/1)."""
    mask_BT = mask_BT.astype(jnp.float32)
    return {
        "nll": jnp.sum(token_nll(logits_BTV, targets_BT) * mask_BT),
        "tokens": jnp.sum(mask_BT),
    }


def lm_sums(
    model, batch, *, packed: bool = True, dropout_key=None, logits_chunk: int = 0
) -> dict[str, jax.Array]:
    """Sums of NLL, counted tokens and their bytes for one batch (no dropout without a key)."""
    h_BTD = hidden(model, batch, packed=packed, dropout_key=dropout_key)
    sums = projected_sums(
        nll_sums, model.logits, h_BTD, batch["targets"], batch["loss_mask"], logits_chunk
    )
    sums["bytes"] = jnp.sum(batch["target_bytes"]).astype(jnp.float32)
    return sums


def projected_sums(sums_fn, project, h_BTD, targets_BT, mask_BT, chunk: int = 0) -> dict:
    """sums_fn(project(h_BTD), targets_BT, mask_BT), `chunk` positions at a time if chunk > 0.

    Whole, the [B, T, V] logits (and their fp32 log-softmax) live through the backward pass:
    at GPT-2 scale, batch 16 x 1024 x 50304 is 3.3 GB in fp32. Chunked, a scan projects
    [B, chunk, D] blocks under jax.checkpoint, so only one block of logits exists at a time
    and the backward pass recomputes it (one more vocabulary matmul per block). The sums add
    over positions, so both ways agree up to float summation order (with bf16 parameters the
    weight gradient also adds up in bf16 over the blocks). T need not divide: the blocks are
    evened out (T=1024, chunk=1000: two of 512) and the last is padded with masked positions.
    """
    t = h_BTD.shape[1]
    if chunk <= 0 or chunk >= t:
        return sums_fn(project(h_BTD), targets_BT, mask_BT)
    n = -(-t // chunk)
    chunk = -(-t // n)
    pad = n * chunk - t

    def blocks(x):  # [B, T, ...] -> [n, B, chunk, ...]: the batch axis keeps its sharding
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

    # prevent_cse=False: inside a scan, XLA cannot merge the recomputation away anyway.
    block_sums = jax.checkpoint(lambda h, y, m: sums_fn(project(h), y, m), prevent_cse=False)

    def step(total, xs):
        return jax.tree.map(jnp.add, total, block_sums(*xs)), None

    xs = (blocks(h_BTD), blocks(targets_BT), blocks(mask_BT))
    shapes = jax.eval_shape(block_sums, *(x[0] for x in xs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(step, zeros, xs)[0]


def finish_lm(sums: dict) -> dict[str, float]:
    """loss, perplexity and bits per byte from accumulated sums."""
    nll, tokens, nbytes = float(sums["nll"]), float(sums["tokens"]), float(sums["bytes"])
    if tokens == 0:
        raise ValueError("no real tokens were evaluated; check the data split and eval_steps")
    loss = nll / tokens
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
    if nbytes > 0:
        out["bits_per_byte"] = nll / math.log(2) / nbytes
        out["bytes"] = nbytes
    return out


def add_sums(a: dict | None, b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in a}


# Dense bf16 peak FLOP/s per chip, for MFU; matched by substring of jax's device_kind.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6": 918.0,
}


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    if override > 0:
        return override
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return tflops
    return None


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT's estimate: 6N + 12 L d T (N without position table).

    6N counts the forward and backward matmuls over all weights; 12 L d T the attention score
    and value matmuls (d = heads x head_dim, full T x T: causality is not discounted, so the
    bidirectional encoder has the same count). Encoder-decoder models count only the encoder's
    attention for now (a lower bound).
    """
    n = cfg.num_params(embeddings=False)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
