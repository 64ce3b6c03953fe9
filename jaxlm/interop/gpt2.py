"""GPT-2 (transformers' GPT2LMHeadModel) <-> jaxlm's decoder with GPT-2 blocks.

HF layout: Conv1D weights are [in, out] (already jaxlm's order), c_attn fuses q, k and v along
its output axis, positions are a learned table, LayerNorms and dense layers have biases, the
MLP is tanh GELU (gelu_new) and lm_head is tied to wte (not saved).
"""

from __future__ import annotations

import numpy as np

from jaxlm.interop.hf_files import ConversionError, take_lm_head
from jaxlm.models.spec import TransformerConfig

ARCHITECTURES = {"GPT2LMHeadModel": "lm"}
# HF activation_function -> model.mlp, and back.
_ACTS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}
_ACTS_BACK = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
# Options jaxlm's blocks do not compute, with the value they must have.
_MUST = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "scale_attn_weights": True,
    "add_cross_attention": False,
}
# Causal-mask buffers older checkpoints saved beside the weights: not parameters.
_BUFFERS = ("attn.bias", "attn.masked_bias")


def config_from_hf(hf: dict, architecture: str) -> dict:
    """model.* keys of a GPT2Config."""
    for key, want in _MUST.items():
        if key in hf and hf[key] != want:
            raise ConversionError(
                f"config.json {key}={hf[key]!r}: jaxlm's GPT-2 blocks compute only "
                f"{key}={want!r}; convert a model without it"
            )
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTS:
        raise ConversionError(
            f"config.json activation_function={act!r}: jaxlm converts {', '.join(_ACTS)}"
        )
    d = hf["n_embd"]
    return {
        "family": "decoder",
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "num_layers": hf["n_layer"],
        "num_heads": hf["n_head"],
        "num_kv_heads": hf["n_head"],
        "head_dim": d // hf["n_head"],
        "d_ff": hf.get("n_inner") or 4 * d,
        "max_len": hf["n_positions"],
        "norm": "layernorm",
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "mlp": _ACTS[act],
        "positions": "learned",
        "use_bias": True,
        "tie_embeddings": hf.get("tie_word_embeddings", True),
        "dropout": hf.get("resid_pdrop", 0.1),  # what fine-tuning in transformers applies
        "init_std": hf.get("initializer_range", 0.02),  # for heads a fine-tuning run adds
    }


def _check_representable(cfg: TransformerConfig) -> None:
    wanted = {
        "family": "decoder",
        "norm": "layernorm",
        "positions": "learned",
        "use_bias": True,
        "num_kv_heads": cfg.num_heads,
        "head_dim": cfg.d_model // cfg.num_heads,
        "num_classes": 0,
    }
    for key, want in wanted.items():
        if getattr(cfg, key) != want:
            raise ConversionError(
                f"model.{key}={getattr(cfg, key)!r}: GPT-2 needs model.{key}={want!r}"
            )
    if cfg.mlp not in _ACTS_BACK:
        raise ConversionError(f"model.mlp={cfg.mlp!r}: GPT-2 has one of {', '.join(_ACTS_BACK)}")


def config_to_hf(cfg: TransformerConfig, architecture: str, special_ids: dict) -> dict:
    """A GPT2Config dict for `cfg` (ConversionError when GPT-2 cannot represent it)."""
    _check_representable(cfg)
    return {
        "model_type": "gpt2",
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": _ACTS_BACK[cfg.mlp],
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos_token_id"),
        "eos_token_id": special_ids.get("eos_token_id"),
        "pad_token_id": special_ids.get("pad_token_id"),
    }


def _prefix(tensors: dict) -> str:
    """Checkpoints saved from GPT2Model (the Hub's gpt2) lack the 'transformer.' prefix."""
    return "transformer." if "transformer.wte.weight" in tensors else ""


def params_from_hf(tensors: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """jaxlm's parameter tree, popping each HF tensor it uses from `tensors`."""
    p = _prefix(tensors)
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    take = tensors.pop
    blocks = {}
    for i in range(cfg.num_layers):
        b = f"{p}h.{i}."
        for buf in _BUFFERS:
            tensors.pop(b + buf, None)
        qkv_w = take(b + "attn.c_attn.weight").reshape(d, 3, n, h)
        qkv_b = take(b + "attn.c_attn.bias").reshape(3, n, h)
        attn = {
            name: {"kernel": qkv_w[:, j], "bias": qkv_b[j]}
            for j, name in enumerate(("query", "key", "value"))
        }
        attn["out"] = {
            "kernel": take(b + "attn.c_proj.weight").reshape(n, h, d),
            "bias": take(b + "attn.c_proj.bias"),
        }
        blocks[i] = {
            "attn_norm": _norm(take, b + "ln_1"),
            "attn": attn,
            "mlp_norm": _norm(take, b + "ln_2"),
            "mlp": {
                "up": {"kernel": take(b + "mlp.c_fc.weight"), "bias": take(b + "mlp.c_fc.bias")},
                "down": {
                    "kernel": take(b + "mlp.c_proj.weight"),
                    "bias": take(b + "mlp.c_proj.bias"),
                },
            },
        }
    params = {
        "embed": {"embedding": take(p + "wte.weight")},
        "pos_embed": take(p + "wpe.weight"),
        "blocks": blocks,
        "final_norm": _norm(take, p + "ln_f"),
    }
    head = take_lm_head(
        tensors, cfg.tie_embeddings, params["embed"]["embedding"], "transformer.wte.weight"
    )
    if head is not None:
        params["lm_head"] = head
    return params


def _norm(take, name: str) -> dict:
    return {"scale": take(name + ".weight"), "bias": take(name + ".bias")}


def params_to_hf(params: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """HF tensor names -> arrays (the tied lm_head is not written, as transformers saves it)."""
    _check_representable(cfg)
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
    out = {
        "transformer.wte.weight": params["embed"]["embedding"],
        "transformer.wpe.weight": params["pos_embed"],
        "transformer.ln_f.weight": params["final_norm"]["scale"],
        "transformer.ln_f.bias": params["final_norm"]["bias"],
    }
    for i in range(cfg.num_layers):
        blk, b = params["blocks"][i], f"transformer.h.{i}."
        a = blk["attn"]
        names = ("query", "key", "value")
        out[b + "attn.c_attn.weight"] = np.stack([a[k]["kernel"] for k in names], 1).reshape(
            d, 3 * n * h
        )
        out[b + "attn.c_attn.bias"] = np.stack([a[k]["bias"] for k in names]).reshape(-1)
        out[b + "attn.c_proj.weight"] = a["out"]["kernel"].reshape(n * h, d)
        out[b + "attn.c_proj.bias"] = a["out"]["bias"]
        for hf_name, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            out[b + hf_name + ".weight"] = blk[ours]["scale"]
            out[b + hf_name + ".bias"] = blk[ours]["bias"]
        for hf_name, ours in (("c_fc", "up"), ("c_proj", "down")):
            out[b + f"mlp.{hf_name}.weight"] = blk["mlp"][ours]["kernel"]
            out[b + f"mlp.{hf_name}.bias"] = blk["mlp"][ours]["bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head"].T
    return out
