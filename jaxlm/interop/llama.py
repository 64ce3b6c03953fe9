"""LLaMA (transformers' LlamaForCausalLM) <-> jaxlm's default decoder: RMSNorm, SwiGLU, RoPE,
grouped-query attention, no biases, tied or untied output projection.

HF's q_proj/k_proj rows are already in the rotate-half order jaxlm's `rope` uses (transformers'
own conversion permutes Meta's interleaved layout), so only transposes and head reshapes are
needed: torch Linear [out, in] -> jaxlm kernel [in, heads, head_dim].
"""

from __future__ import annotations

from jaxlm.interop.hf_files import ConversionError, take_lm_head
from jaxlm.models.spec import TransformerConfig

ARCHITECTURES = {"LlamaForCausalLM": "lm"}
_MUST = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1}
_BUFFERS = ("self_attn.rotary_emb.inv_freq",)  # saved by old transformers versions


def _rope_theta(hf: dict) -> float:
    """rope_theta from transformers 4's keys or 5's rope_parameters; scaled RoPE is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = params.get("rope_type", "default")
    if scaling or kind != "default":
        key = "rope_scaling" if scaling else "rope_parameters.rope_type"
        raise ConversionError(
            f"config.json {key}={scaling or kind!r}: jaxlm's RoPE is unscaled; convert a "
            "model with rope_type 'default' (no rope_scaling)"
        )
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError("config.json partial_rotary_factor: jaxlm rotates whole heads")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, architecture: str) -> dict:
    """model.* keys of a LlamaConfig."""
    for key, want in _MUST.items():
        if key in hf and hf[key] != want:
            raise ConversionError(
                f"config.json {key}={hf[key]!r}: jaxlm's LLaMA blocks need {key}={want!r}; "
                "convert a model without it"
            )
    n = hf["num_attention_heads"]
    return {
        "family": "decoder",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": n,
        "num_kv_heads": hf.get("num_key_value_heads") or n,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // n,
        "d_ff": hf["intermediate_size"],
        "max_len": hf.get("max_position_embeddings", 2048),
        "norm": "rmsnorm",
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu",
        "positions": "rope",
        "rope_theta": _rope_theta(hf),
        "use_bias": False,
        "tie_embeddings": hf.get("tie_word_embeddings", False),
        "dropout": hf.get("attention_dropout", 0.0),
        "init_std": hf.get("initializer_range", 0.02),  # for heads a fine-tuning run adds
    }


def config_to_hf(cfg: TransformerConfig, architecture: str, special_ids: dict) -> dict:
    """A LlamaConfig dict for `cfg` (ConversionError when LLaMA cannot represent it)."""
    wanted = {
        "family": "decoder",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "positions": "rope",
        "use_bias": False,
        "num_classes": 0,
    }
    for key, want in wanted.items():
        if getattr(cfg, key) != want:
            raise ConversionError(
                f"model.{key}={getattr(cfg, key)!r}: LLaMA needs model.{key}={want!r}"
            )
    theta = cfg.rope_theta
    return {
        "model_type": "llama",
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        # Both spellings: transformers 5 reads rope_parameters, 4 reads rope_theta.
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos_token_id"),
        "eos_token_id": special_ids.get("eos_token_id"),
        "pad_token_id": special_ids.get("pad_token_id"),
    }


def params_from_hf(tensors: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """jaxlm's parameter tree, popping each HF tensor it uses from `tensors`."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    take = tensors.pop
    blocks = {}
    for i in range(cfg.num_layers):
        b = f"model.layers.{i}."
        for buf in _BUFFERS:
            tensors.pop(b + buf, None)
        a = b + "self_attn."
        blocks[i] = {
            "attn_norm": {"scale": take(b + "input_layernorm.weight")},
            "attn": {
                "query": {"kernel": take(a + "q_proj.weight").T.reshape(d, n, h)},
                "key": {"kernel": take(a + "k_proj.weight").T.reshape(d, k, h)},
                "value": {"kernel": take(a + "v_proj.weight").T.reshape(d, k, h)},
                "out": {"kernel": take(a + "o_proj.weight").T.reshape(n, h, d)},
            },
            "mlp_norm": {"scale": take(b + "post_attention_layernorm.weight")},
            "mlp": {
                name: {"kernel": take(f"{b}mlp.{name}_proj.weight").T}
                for name in ("gate", "up", "down")
            },
        }
    params = {
        "embed": {"embedding": take("model.embed_tokens.weight")},
        "blocks": blocks,
        "final_norm": {"scale": take("model.norm.weight")},
    }
    head = take_lm_head(
        tensors, cfg.tie_embeddings, params["embed"]["embedding"], "model.embed_tokens.weight"
    )
    if head is not None:
        params["lm_head"] = head
    return params


def params_to_hf(params: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """HF tensor names -> arrays (a tied lm_head is not written, as transformers saves it)."""
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    out = {
        "model.embed_tokens.weight": params["embed"]["embedding"],
        "model.norm.weight": params["final_norm"]["scale"],
    }
    for i in range(cfg.num_layers):
        blk, b = params["blocks"][i], f"model.layers.{i}."
        a = blk["attn"]
        out[b + "input_layernorm.weight"] = blk["attn_norm"]["scale"]
        out[b + "post_attention_layernorm.weight"] = blk["mlp_norm"]["scale"]
        for ours, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
            kernel = a[ours]["kernel"]
            out[f"{b}self_attn.{hf_name}_proj.weight"] = kernel.reshape(d, -1).T
        out[b + "self_attn.o_proj.weight"] = a["out"]["kernel"].reshape(n * h, d).T
        for name in ("gate", "up", "down"):
            out[f"{b}mlp.{name}_proj.weight"] = blk["mlp"][name]["kernel"].T
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"].T
    return out
