"""T5 (transformers' T5ForConditionalGeneration) <-> jaxlm's encoder_decoder family.

v1.0 (t5-small..): ReLU MLP, output tied to the shared embedding and scaled by d_model**-0.5.
v1.1 / Flan: gated GELU (tanh) MLP, untied lm_head, no output scale. Both: RMSNorm without bias
(eps 1e-6), no linear biases, unscaled attention (model.attention_scale=1.0), bucketed relative
position bias computed by each stack's first block and shared by all (jaxlm: one table per
stack), cross-attention without position bias, decoder started from the pad id 0.

Layouts: torch Linear [out, in] -> jaxlm kernels [in, heads, head_dim]; d_kv (head_dim) may
differ from d_model / num_heads. A jaxlm model with scaled attention (attention_scale 0 or not
1) exports with the scale folded into its query kernels (rounded once in float32: exact when
the factor is a power of two, e.g. head_dim 16 or 64), so it imports back as attention_scale=1.0.
transformers 5 saves `scale_decoder_outputs` beside `tie_word_embeddings`; configs written by
transformers 4 only have the latter (True: tied and scaled).
"""

from __future__ import annotations

import numpy as np

from jaxlm.interop.hf_files import ConversionError
from jaxlm.models.spec import TransformerConfig

ARCHITECTURES = {"T5ForConditionalGeneration": "seq2seq"}
# jaxlm.tasks.DECODER_START_ID (a sibling layer interop cannot import; the tests check they
# agree): the seq2seq task, seq2seq_eval and generate start the decoder there, as T5 (its pad).
DECODER_START_ID = 0
# (is_gated_act, dense_act_fn) -> model.mlp; HF's "gelu" is the erf form, "gelu_new" the tanh one.
_MLPS = {
    (False, "relu"): "relu",
    (False, "gelu_new"): "gelu",
    (False, "gelu"): "gelu_exact",
    (True, "gelu_new"): "geglu",
    (True, "silu"): "swiglu",
}
_FEED_FORWARD = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu"}
_FEED_FORWARD.update(geglu="gated-gelu", swiglu="gated-silu")
# Tensors transformers itself ignores or ties to `shared.weight` (older checkpoints carry them).
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _mlp_kind(hf: dict) -> str:
    """model.mlp from feed_forward_proj, checked against dense_act_fn / is_gated_act if saved."""
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated, act = parts[0] == "gated" and len(parts) == 2, parts[-1]
    act = "gelu_new" if proj == "gated-gelu" else act
    for key, derived in (("is_gated_act", gated), ("dense_act_fn", act)):
        if key in hf and hf[key] != derived:
            raise ConversionError(
                f"config.json {key}={hf[key]!r} disagrees with feed_forward_proj={proj!r} "
                f"(which means {derived!r}); fix one of them"
            )
    if (gated, act) not in _MLPS or len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ConversionError(
            f"config.json feed_forward_proj={proj!r}: jaxlm's T5 MLPs are relu, gelu_new, gelu, "
            "gated-gelu and gated-silu; convert a model with one of them"
        )
    return _MLPS[gated, act]


def config_from_hf(hf: dict, architecture: str) -> dict:
    """model.* keys of a T5Config (task.objective is ARCHITECTURES[architecture])."""
    start = hf.get("decoder_start_token_id")
    if start not in (None, DECODER_START_ID):
        raise ConversionError(
            f"config.json decoder_start_token_id={start}: jaxlm's seq2seq decoding starts from "
            f"id {DECODER_START_ID} (T5's pad); convert a model that starts there"
        )
    tie = hf.get("tie_word_embeddings", True)
    return {
        "family": "encoder_decoder",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["d_model"],
        "num_layers": hf["num_layers"],
        "num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
        "num_heads": hf["num_heads"],
        "num_kv_heads": hf["num_heads"],
        "head_dim": hf["d_kv"],
        "d_ff": hf["d_ff"],
        "max_len": hf.get("n_positions", 512),  # no position table: only sizes data checks
        "norm": "rmsnorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-6),
        "mlp": _mlp_kind(hf),
        "positions": "relative",
        "relative_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf.get("relative_attention_max_distance", 128),
        "use_bias": False,
        "tie_embeddings": tie,
        "share_embeddings": True,
        "scale_tied_output": hf.get("scale_decoder_outputs", tie),
        "attention_scale": 1.0,
        "dropout": hf.get("dropout_rate", 0.0),
    }


def config_to_hf(cfg: TransformerConfig, architecture: str, special_ids: dict) -> dict:
    """A T5Config dict for `cfg` (ConversionError for what T5 cannot represent)."""
    wanted = dict(
        family="encoder_decoder",
        norm="rmsnorm",
        positions="relative",
        use_bias=False,
        share_embeddings=True,
        num_kv_heads=cfg.num_heads,
        num_classes=0,
    )
    for key, want in wanted.items():
        if getattr(cfg, key) != want:
            raise ConversionError(
                f"model.{key}={getattr(cfg, key)!r}: T5 needs model.{key}={want!r}"
            )
    return {
        "model_type": "t5",
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": _FEED_FORWARD[cfg.mlp],
        "dropout_rate": cfg.dropout,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_tied_output,
        "decoder_start_token_id": DECODER_START_ID,
        "pad_token_id": _or(special_ids.get("pad_token_id"), DECODER_START_ID),
        "eos_token_id": special_ids.get("eos_token_id"),
    }


def _or(value, default):
    return default if value is None else value


def _attention(take, prefix: str, cfg: TransformerConfig) -> dict:
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    return {
        "query": {"kernel": take(prefix + "q.weight").T.reshape(d, n, h)},
        "key": {"kernel": take(prefix + "k.weight").T.reshape(d, n, h)},
        "value": {"kernel": take(prefix + "v.weight").T.reshape(d, n, h)},
        "out": {"kernel": take(prefix + "o.weight").T.reshape(n, h, d)},
    }


def _mlp(take, prefix: str, cfg: TransformerConfig) -> dict:
    if cfg.mlp in ("geglu", "swiglu"):  # HF: act(wi_0 x) * wi_1 x; jaxlm: act(gate x) * up x
        names = {"gate": "wi_0", "up": "wi_1", "down": "wo"}
    else:
        names = {"up": "wi", "down": "wo"}
    return {ours: {"kernel": take(f"{prefix}{hf}.weight").T} for ours, hf in names.items()}


def _stack(take, name: str, cfg: TransformerConfig, num_layers: int) -> dict:
    """One stack's parameters; the decoder's blocks have cross-attention as layer 1."""
    decoder = name == "decoder"
    blocks = {}
    for i in range(num_layers):
        b = f"{name}.block.{i}.layer."
        ff = f"{b}{2 if decoder else 1}."
        blk = {
            "attn_norm": {"scale": take(b + "0.layer_norm.weight")},
            "attn": _attention(take, b + "0.SelfAttention.", cfg),
            "mlp_norm": {"scale": take(ff + "layer_norm.weight")},
            "mlp": _mlp(take, ff + "DenseReluDense.", cfg),
        }
        if decoder:
            blk["cross_norm"] = {"scale": take(b + "1.layer_norm.weight")}
            blk["cross_attn"] = _attention(take, b + "1.EncDecAttention.", cfg)
        blocks[i] = blk
    bias = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    return {
        "relative_bias": {"table": take(bias)},
        "blocks": blocks,
        "final_norm": {"scale": take(f"{name}.final_layer_norm.weight")},
    }


def params_from_hf(tensors: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """jaxlm's parameter tree, popping each HF tensor it uses from `tensors`."""
    shared = tensors.pop("shared.weight")
    for name in _IGNORED:
        tensors.pop(name, None)
    copies = [n for n in _COPIES if n in tensors]
    if not cfg.tie_embeddings:
        head = tensors.pop("lm_head.weight")
    elif "lm_head.weight" in tensors:
        copies.append("lm_head.weight")
    for name in copies:
        if not np.array_equal(tensors.pop(name), shared):
            fix = (
                "set tie_word_embeddings=false in config.json: it is a separate head"
                if name == "lm_head.weight"
                else "T5 shares one table (transformers loads shared.weight); re-save the model"
            )
            raise ConversionError(f"{name} differs from shared.weight, which it is tied to; {fix}")
    params = {
        "embed": {"embedding": shared},
        "encoder": _stack(tensors.pop, "encoder", cfg, cfg.num_layers),
        "decoder": _stack(tensors.pop, "decoder", cfg, cfg.decoder_layers),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = head.T
    return params


def _query_scale(cfg: TransformerConfig) -> float:
    """The attention scale T5 lacks (it attends unscaled), to fold into the query kernels."""
    return cfg.attention_scale or cfg.head_dim**-0.5


def _attention_to_hf(out: dict, a: dict, prefix: str, cfg: TransformerConfig) -> None:
    inner, scale = cfg.num_heads * cfg.head_dim, _query_scale(cfg)
    for ours, hf in (("query", "q"), ("key", "k"), ("value", "v")):
        kernel = a[ours]["kernel"].reshape(cfg.d_model, inner)
        if ours == "query" and scale != 1.0:
            kernel = kernel * np.asarray(scale, kernel.dtype)
        out[f"{prefix}{hf}.weight"] = kernel.T
    out[prefix + "o.weight"] = a["out"]["kernel"].reshape(inner, cfg.d_model).T


def _stack_to_hf(out: dict, p: dict, name: str, cfg: TransformerConfig) -> None:
    decoder = name == "decoder"
    for i, blk in p["blocks"].items():
        b = f"{name}.block.{i}.layer."
        ff = f"{b}{2 if decoder else 1}."
        out[b + "0.layer_norm.weight"] = blk["attn_norm"]["scale"]
        _attention_to_hf(out, blk["attn"], b + "0.SelfAttention.", cfg)
        if decoder:
            out[b + "1.layer_norm.weight"] = blk["cross_norm"]["scale"]
            _attention_to_hf(out, blk["cross_attn"], b + "1.EncDecAttention.", cfg)
        out[ff + "layer_norm.weight"] = blk["mlp_norm"]["scale"]
        names = {"gate": "wi_0", "up": "wi_1", "down": "wo"} if "gate" in blk["mlp"] else None
        for ours, hf in (names or {"up": "wi", "down": "wo"}).items():
            out[f"{ff}DenseReluDense.{hf}.weight"] = blk["mlp"][ours]["kernel"].T
    bias = f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    out[bias] = p["relative_bias"]["table"]
    out[f"{name}.final_layer_norm.weight"] = p["final_norm"]["scale"]


def params_to_hf(params: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """HF tensor names -> arrays; tied copies (embed_tokens, a tied lm_head) are not written."""
    out = {"shared.weight": params["embed"]["embedding"]}
    _stack_to_hf(out, params["encoder"], "encoder", cfg)
    _stack_to_hf(out, params["decoder"], "decoder", cfg)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"].T
    return out
