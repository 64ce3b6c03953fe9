"""BERT and DistilBERT (transformers' BertForMaskedLM, BertForSequenceClassification,
DistilBertForMaskedLM, DistilBertForSequenceClassification) <-> jaxlm's encoder with post-norm
blocks, an embedding LayerNorm, learned positions and biases everywhere.

Both families differ from each other only in names and in four options: BERT has token-type
embeddings (model.type_vocab_size), a tanh pooler before its classifier and a configurable
LayerNorm epsilon; DistilBERT has none of those types, a ReLU pre_classifier and epsilon 1e-12.
The MLM heads (BERT's cls.predictions.transform, DistilBERT's vocab_transform +
vocab_layer_norm) are model.mlm_transform, their output bias EncoderLM.mlm_bias; the projection
is tied to the word embeddings unless tie_word_embeddings=false. torch Linear weights [out, in]
become jaxlm kernels [in, out] (attention: [D, heads, head_dim] and back), nothing else changes,
so jaxlm -> HF -> jaxlm is bit-identical. One table (`_layout`) drives both directions.

A classifier has no MLM head in HF: its jaxlm mlm_bias (unused by `classify`) imports as zeros
and is not exported. Tensors HF itself ignores when loading these classes are dropped: buffers
(position_ids) and, for BertForMaskedLM, the pooler and next-sentence head that pretraining
checkpoints such as bert-base-uncased hold. Legacy LayerNorm names (gamma, beta) are read.
"""

from __future__ import annotations

import math

import numpy as np

from jaxlm.interop.hf_files import ConversionError
from jaxlm.models.spec import TransformerConfig

ARCHITECTURES = {
    "BertForMaskedLM": "mlm",
    "BertForSequenceClassification": "classify",
    "DistilBertForMaskedLM": "mlm",
    "DistilBertForSequenceClassification": "classify",
}
# HF hidden_act / activation -> model.mlp, and back. HF's "gelu" is the exact (erf) form.
_ACTS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
_ACTS_BACK = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}
_DISTIL_EPS = 1e-12  # DistilBERT's LayerNorms do not read the config
# Options jaxlm's encoder does not compute, with the value it needs.
_MUST = {
    "bert": dict(position_embedding_type="absolute", is_decoder=False, add_cross_attention=False),
    "distilbert": dict(sinusoidal_pos_embds=False),
}

# HF names of each family: embeddings, one layer's sublayers, heads.
_NAMES = {
    "bert": {
        "base": "bert.",
        "embed": "embeddings.word_embeddings.weight",
        "pos": "embeddings.position_embeddings.weight",
        "type": "embeddings.token_type_embeddings.weight",
        "embed_norm": "embeddings.LayerNorm",
        "layer": "encoder.layer.{}.",
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "up": "intermediate.dense",
        "down": "output.dense",
        "mlp_norm": "output.LayerNorm",
        "mlm_dense": "cls.predictions.transform.dense",
        "mlm_norm": "cls.predictions.transform.LayerNorm",
        "mlm_bias": "cls.predictions.bias",
        "decoder": "cls.predictions.decoder",
        "pooler": "bert.pooler.dense",
        "classifier": "classifier",
    },
    "distilbert": {
        "base": "distilbert.",
        "embed": "embeddings.word_embeddings.weight",
        "pos": "embeddings.position_embeddings.weight",
        "embed_norm": "embeddings.LayerNorm",
        "layer": "transformer.layer.{}.",
        "query": "attention.q_lin",
        "key": "attention.k_lin",
        "value": "attention.v_lin",
        "out": "attention.out_lin",
        "attn_norm": "sa_layer_norm",
        "up": "ffn.lin1",
        "down": "ffn.lin2",
        "mlp_norm": "output_layer_norm",
        "mlm_dense": "vocab_transform",
        "mlm_norm": "vocab_layer_norm",
        "mlm_bias": "vocab_projector.bias",
        "decoder": "vocab_projector",
        "pooler": "pre_classifier",
        "classifier": "classifier",
    },
}


def _family(architecture: str) -> str:
    return "distilbert" if architecture.startswith("DistilBert") else "bert"


def _is_mlm(architecture: str) -> bool:
    return ARCHITECTURES[architecture] == "mlm"


def _num_labels(hf: dict) -> int:
    """transformers' num_labels: the size of id2label when config.json has one."""
    return len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)


def config_from_hf(hf: dict, architecture: str) -> dict:
    """model.* keys of a BertConfig or DistilBertConfig."""
    fam = _family(architecture)
    for key, want in _MUST[fam].items():
        if key in hf and hf[key] != want:
            raise ConversionError(
                f"config.json {key}={hf[key]!r}: jaxlm's {fam} encoder needs {key}={want!r}; "
                "convert a model without it"
            )
    act_key = "activation" if fam == "distilbert" else "hidden_act"
    act = hf.get(act_key, "gelu")
    if act not in _ACTS:
        raise ConversionError(f"config.json {act_key}={act!r}: jaxlm converts {', '.join(_ACTS)}")
    num_classes = 0
    if not _is_mlm(architecture):
        num_classes = _num_labels(hf)
        if hf.get("problem_type") not in (None, "single_label_classification") or num_classes < 2:
            raise ConversionError(
                f"config.json problem_type={hf.get('problem_type')!r} with num_labels="
                f"{num_classes}: jaxlm classifies single labels (softmax over >= 2 classes)"
            )
    if fam == "distilbert":
        d, n, eps = hf["dim"], hf["n_heads"], _DISTIL_EPS
        shape = dict(
            num_layers=hf["n_layers"], d_ff=hf["hidden_dim"], dropout=hf.get("dropout", 0.1)
        )
        types = 0
    else:
        d, n, eps = hf["hidden_size"], hf["num_attention_heads"], hf.get("layer_norm_eps", 1e-12)
        shape = dict(
            num_layers=hf["num_hidden_layers"],
            d_ff=hf["intermediate_size"],
            dropout=hf.get("hidden_dropout_prob", 0.1),
        )
        types = hf.get("type_vocab_size", 2)
    return {
        **shape,
        "family": "encoder",
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "num_heads": n,
        "num_kv_heads": n,
        "head_dim": d // n,
        "max_len": hf.get("max_position_embeddings", 512),
        "norm": "layernorm",
        "norm_eps": eps,
        "mlp": _ACTS[act],
        "positions": "learned",
        "use_bias": True,
        # A classifier has no output projection to tie or not.
        "tie_embeddings": hf.get("tie_word_embeddings", True) or num_classes > 0,
        "block_norm": "post",
        "embed_norm": True,
        "type_vocab_size": types,
        "mlm_transform": _is_mlm(architecture),
        "num_classes": num_classes,
        "pooling": "first",
        "classifier_activation": "relu" if fam == "distilbert" else "tanh",
        **_data_keys(architecture),
        # BERT's inputs are [CLS] text [SEP]: classify rows and LanguageModel's are built so.
        "data.prepend_cls": True,
        # transformers' id2label, for LanguageModel.class_names (LABEL_0... when unnamed).
        "task.class_names": tuple(hf["id2label"][str(i)] for i in range(num_classes))
        if hf.get("id2label") and num_classes
        else (),
    }


def _data_keys(architecture: str) -> dict:
    """What the run config needs to validate: the run keeps the model's own tokenizer (with its
    [MASK]), but a config training from scratch would need one; classifiers read examples."""
    if _is_mlm(architecture):
        return {"data.tokenizer_mask": True}
    return {"data.input_key": "text", "data.label_key": "label"}


def _check_representable(cfg: TransformerConfig, architecture: str) -> None:
    fam, mlm = _family(architecture), _is_mlm(architecture)
    wanted = {
        "family": "encoder",
        "norm": "layernorm",
        "positions": "learned",
        "use_bias": True,
        "num_kv_heads": cfg.num_heads,
        "head_dim": cfg.d_model // cfg.num_heads,
        "block_norm": "post",
        "embed_norm": True,
        "mlm_transform": mlm,
        "pooling_used": "first",
    }
    if fam == "distilbert":
        wanted.update(type_vocab_size=0, norm_eps=_DISTIL_EPS)
    if mlm:
        wanted["num_classes"] = 0
    else:
        wanted["classifier_activation"] = "relu" if fam == "distilbert" else "tanh"
    for key, want in wanted.items():
        if getattr(cfg, key) != want:
            raise ConversionError(
                f"model.{key.removesuffix('_used')}={getattr(cfg, key)!r}: {architecture} needs "
                f"{want!r}"
            )
    if fam == "bert" and cfg.type_vocab_size < 1:
        raise ConversionError(f"model.type_vocab_size=0: {architecture} needs token types (2)")
    if not mlm and cfg.num_classes < 2:
        raise ConversionError(f"model.num_classes={cfg.num_classes}: {architecture} needs >= 2")
    if cfg.mlp not in _ACTS_BACK:
        raise ConversionError(f"model.mlp={cfg.mlp!r}: {architecture} has {', '.join(_ACTS_BACK)}")


def config_to_hf(cfg: TransformerConfig, architecture: str, special_ids: dict) -> dict:
    """A BertConfig / DistilBertConfig dict for `cfg` (ConversionError when it cannot be one)."""
    _check_representable(cfg, architecture)
    common = {
        "architectures": [architecture],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_len,
        "initializer_range": cfg.init_std,
        "pad_token_id": special_ids.get("pad_token_id"),
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if not _is_mlm(architecture):
        common["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
        common["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_classes)}
    act = _ACTS_BACK[cfg.mlp]
    if _family(architecture) == "distilbert":
        return {
            **common,
            "model_type": "distilbert",
            "dim": cfg.d_model,
            "n_layers": cfg.num_layers,
            "n_heads": cfg.num_heads,
            "hidden_dim": cfg.d_ff,
            "activation": act,
            "dropout": cfg.dropout,
            "attention_dropout": cfg.dropout,
            "seq_classif_dropout": cfg.dropout,
            "sinusoidal_pos_embds": False,
        }
    return {
        **common,
        "model_type": "bert",
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": act,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "is_decoder": False,
        "add_cross_attention": False,
    }


def _layout(cfg: TransformerConfig, architecture: str, base: str) -> list[tuple[tuple, tuple]]:
    """(jaxlm path, (kind, HF name, ...)) of every converted parameter.

    kinds: "same" (one tensor as is), "t" (transposed), "norm" (LayerNorm weight/bias ->
    scale/bias), "dense" (torch Linear weight/bias -> kernel of in_shape + out_shape, bias).
    """
    names = _NAMES[_family(architecture)]
    d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim
    out = [
        (("embed", "embedding"), ("same", base + names["embed"])),
        (("pos_embed",), ("same", base + names["pos"])),
        (("embed_norm",), ("norm", base + names["embed_norm"])),
    ]
    if cfg.type_vocab_size:
        out.append((("type_embed",), ("same", base + names["type"])))
    shapes = {
        "query": ((d,), (n, h)),
        "key": ((d,), (n, h)),
        "value": ((d,), (n, h)),
        "out": ((n, h), (d,)),
        "up": ((d,), (cfg.d_ff,)),
        "down": ((cfg.d_ff,), (d,)),
    }
    for i in range(cfg.num_layers):
        layer = base + names["layer"].format(i)
        for part, (ins, outs) in shapes.items():
            sub = "attn" if part in ("query", "key", "value", "out") else "mlp"
            out.append((("blocks", i, sub, part), ("dense", layer + names[part], ins, outs)))
        for part in ("attn_norm", "mlp_norm"):
            out.append((("blocks", i, part), ("norm", layer + names[part])))
    if _is_mlm(architecture):
        out += [
            (("mlm_transform", "dense"), ("dense", names["mlm_dense"], (d,), (d,))),
            (("mlm_transform", "norm"), ("norm", names["mlm_norm"])),
            (("mlm_bias",), ("same", names["mlm_bias"])),
        ]
        if not cfg.tie_embeddings:
            out.append((("lm_head",), ("t", names["decoder"] + ".weight")))
    else:
        c = cfg.num_classes
        out += [
            (("classifier", "pooler"), ("dense", names["pooler"], (d,), (d,))),
            (("classifier", "out"), ("dense", names["classifier"], (d,), (c,))),
        ]
    return out


def _pop(tensors: dict, name: str, legacy: str | None = None) -> np.ndarray:
    if name not in tensors and legacy in tensors:
        return tensors.pop(legacy)
    return tensors.pop(name)  # a KeyError names the missing tensor


def _from_hf(tensors: dict, spec: tuple):
    kind, name = spec[0], spec[1]
    if kind == "same":
        return tensors.pop(name)
    if kind == "t":
        return tensors.pop(name).T
    if kind == "norm":
        return {
            "scale": _pop(tensors, name + ".weight", name + ".gamma"),
            "bias": _pop(tensors, name + ".bias", name + ".beta"),
        }
    ins, outs = spec[2], spec[3]
    return {
        "kernel": tensors.pop(name + ".weight").T.reshape(*ins, *outs),
        "bias": tensors.pop(name + ".bias").reshape(outs),
    }


def _to_hf(value, spec: tuple) -> dict[str, np.ndarray]:
    kind, name = spec[0], spec[1]
    if kind == "same":
        return {name: value}
    if kind == "t":
        return {name: value.T}
    if kind == "norm":
        return {name + ".weight": value["scale"], name + ".bias": value["bias"]}
    n_in, n_out = math.prod(spec[2]), math.prod(spec[3])
    return {
        name + ".weight": value["kernel"].reshape(n_in, n_out).T,
        name + ".bias": value["bias"].reshape(n_out),
    }


def _base(tensors: dict, architecture: str) -> str:
    """'bert.' / 'distilbert.', or '' for weights saved from the bare BertModel."""
    base = _NAMES[_family(architecture)]["base"]
    return base if any(k.startswith(base) for k in tensors) else ""


def _drop_ignored(tensors: dict, architecture: str, base: str) -> None:
    """Remove what transformers itself skips when loading this class (see the docstring)."""
    ignored = [base + "embeddings.position_ids", base + "embeddings.token_type_ids"]
    if architecture == "BertForMaskedLM":
        ignored += [
            f"{p}.{s}"
            for p in ("bert.pooler.dense", "cls.seq_relationship")
            for s in ("weight", "bias")
        ]
    for name in ignored:
        tensors.pop(name, None)


def params_from_hf(tensors: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """jaxlm's parameter tree, popping each HF tensor it uses from `tensors`."""
    base = _base(tensors, architecture)
    _drop_ignored(tensors, architecture, base)
    params: dict = {}
    for path, spec in _layout(cfg, architecture, base):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _from_hf(tensors, spec)
    if _is_mlm(architecture):
        _check_tied(tensors, params, architecture, cfg.tie_embeddings)
    else:
        params["mlm_bias"] = np.zeros((cfg.vocab_size,), np.float32)  # unused by classify
    return params


def _check_tied(tensors: dict, params: dict, architecture: str, tied: bool) -> None:
    """Pop the copies of tied tensors older checkpoints saved; refuse copies that differ."""
    decoder = _NAMES[_family(architecture)]["decoder"]
    copies = [(decoder + ".bias", params["mlm_bias"], "the output bias")]
    if tied:
        copies.append((decoder + ".weight", params["embed"]["embedding"], "the word embeddings"))
    for name, ours, what in copies:
        saved = tensors.pop(name, None)
        if saved is not None and not np.array_equal(saved, ours):
            raise ConversionError(
                f"{name} differs from {what} it is tied to; set tie_word_embeddings=false in "
                "config.json to keep both"
            )


def params_to_hf(params: dict, cfg: TransformerConfig, architecture: str) -> dict:
    """HF tensor names -> arrays (a tied projection is not written, as transformers saves it)."""
    _check_representable(cfg, architecture)
    out: dict[str, np.ndarray] = {}
    for path, spec in _layout(cfg, architecture, _NAMES[_family(architecture)]["base"]):
        value = params
        for key in path:
            value = value[key]
        out.update(_to_hf(value, spec))
    return out
