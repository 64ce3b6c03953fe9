"""What a valid config is: allowed values, which objective trains which family, and the
checks `validate` runs on every config jaxlm loads (each failure a one-line ConfigError that
names the key and the fix). `jaxlm.config` re-exports the public names.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxlm.data.sources import parse_sources
from jaxlm.data.types import DataError
from jaxlm.decode_settings import BeamSettings
from jaxlm.models.spec import (
    BLOCK_NORMS,
    CLASSIFIER_ACTIVATIONS,
    FAMILIES,
    MLP_GATED,
    POOLINGS,
    POSITIONS,
    QUANT_KINDS,
    REMATS,
)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key and the fix."""


CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.mlp": tuple(MLP_GATED),
    "model.family": FAMILIES,
    "model.positions": POSITIONS,
    "model.pooling": POOLINGS,
    "model.block_norm": BLOCK_NORMS,
    "model.classifier_activation": CLASSIFIER_ACTIVATIONS,
    "model.attention_impl": ("xla", "cudnn"),
    "model.dtype": ("bfloat16", "float32"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": REMATS,
    "model.quant": QUANT_KINDS,
    "data.decode_errors": ("strict", "replace"),
    "data.normalize": ("none", "NFC", "NFKC"),
    "data.tokenizer_type": ("bpe", "unigram", "char"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "task.objective": ("lm", "mlm", "span_corruption", "seq2seq", "classify"),
}

# The model families each objective trains (the first is the one to suggest).
OBJECTIVE_FAMILY = {
    "lm": ("decoder",),
    "mlm": ("encoder",),
    "span_corruption": ("encoder_decoder",),
    "seq2seq": ("encoder_decoder", "decoder"),  # on a decoder: a prefix LM (input, EOS, target)
    "classify": ("encoder", "decoder"),
}
# What each objective's batches are made of (data/specs.py LAYOUTS; data.source=synthetic
# overrides it): the one place that decides it.
OBJECTIVE_LAYOUT = {
    "lm": "documents",
    "mlm": "documents",
    "span_corruption": "spans",
    "seq2seq": "examples",
    "classify": "examples",
}
# Objectives that read labelled examples (data.input_key/target_key/label_key), not documents.
EXAMPLE_OBJECTIVES = tuple(k for k, v in OBJECTIVE_LAYOUT.items() if v == "examples")


def validate(config: ml_collections.ConfigDict) -> None:
    """Check values that every later stage relies on; raise ConfigError naming the key."""
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"config key {key!r} is {value!r}; choose one of {list(choices)}")
    positive = [
        "model.d_model",
        "model.num_layers",
        "model.num_heads",
        "model.d_ff",
        "model.max_len",
        "data.batch_size",
        "data.seq_len",
        "data.tokenizer_vocab_size",
        "data.tokenizer_sample_chars",
        "train.steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "optim.grad_accum_steps",
    ]
    for key in positive:
        if _get(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be > 0, got {_get(config, key)}")
    for key in ("model.dropout", "optim.weight_decay", "optim.min_lr_ratio"):
        if not 0.0 <= _get(config, key) <= 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1], got {_get(config, key)}")
    if config.optim.lr <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {config.optim.lr}")
    m = config.model
    if m.head_dim == 0 and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
            "change one or set model.head_dim"
        )
    if m.attention_scale < 0:
        raise ConfigError(
            f"config key 'model.attention_scale' must be >= 0, got {m.attention_scale}"
        )
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={kv}"
        )
    longest, what = row_len(config), f"data.seq_len={config.data.seq_len}"
    if longest > config.data.seq_len:
        what += f" + data.target_len={config.data.target_len}"
    if m.positions == "learned" and longest > m.max_len:
        raise ConfigError(f"{what} exceeds model.max_len={m.max_len}; raise model.max_len")
    for key in (
        "model.num_decoder_layers",
        "model.num_classes",
        "model.type_vocab_size",
        "train.hang_timeout",
    ):
        if _get(config, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {_get(config, key)}")
    _validate_data(config.data)
    _validate_task(config)  # after the data source parses
    if config.data.batch_size % config.optim.grad_accum_steps:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} is not divisible by "
            f"optim.grad_accum_steps={config.optim.grad_accum_steps}"
        )


def is_prefix_lm(config: ml_collections.ConfigDict) -> bool:
    """seq2seq on a decoder: input, EOS and target in one causal row."""
    return config.task.objective == "seq2seq" and config.model.family == "decoder"


def row_len(config: ml_collections.ConfigDict) -> int:
    """Tokens in one row of a batch: data.seq_len, and for a prefix LM the input and target in
    one row, data.seq_len + data.target_len."""
    d = config.data
    return d.seq_len + d.target_len if is_prefix_lm(config) else d.seq_len


def _validate_task(config: ml_collections.ConfigDict) -> None:
    k, family = config.task, config.model.family
    fits = OBJECTIVE_FAMILY[k.objective]
    if family not in fits:
        others = [obj for obj, fams in OBJECTIVE_FAMILY.items() if family in fams]
        raise ConfigError(
            f"task.objective={k.objective} trains model.family={' or '.join(fits)}, not "
            f"{family}; set --config.model.family={fits[0]} or --config.task.objective="
            f"{others[0]}"
        )
    if k.objective == "mlm" and not config.data.tokenizer_mask and _trains_tokenizer(config):
        raise ConfigError(MLM_NEEDS_MASK)
    if k.objective == "span_corruption":
        if not config.data.tokenizer_sentinels and _trains_tokenizer(config):
            raise ConfigError(SPANS_NEED_SENTINELS)
        if not 0.0 < k.noise_density < 1.0 or k.mean_span_length < 1.0:
            raise ConfigError(
                f"task.noise_density={k.noise_density} must be in (0, 1) and "
                f"task.mean_span_length={k.mean_span_length} at least 1 (T5: 0.15 and 3)"
            )
    if k.objective == "classify":
        if config.model.num_classes < 2:
            raise ConfigError(
                "task.objective=classify needs model.num_classes >= 2; set "
                "--config.model.num_classes=<number of labels>"
            )
        if k.class_weights and len(k.class_weights) != config.model.num_classes:
            raise ConfigError(
                f"task.class_weights has {len(k.class_weights)} weights for "
                f"model.num_classes={config.model.num_classes}; give one per class or ()"
            )
        if any(w < 0 for w in k.class_weights):
            raise ConfigError(f"task.class_weights must be >= 0, got {k.class_weights}")
        if k.class_names and len(k.class_names) != config.model.num_classes:
            raise ConfigError(
                f"task.class_names has {len(k.class_names)} names for "
                f"model.num_classes={config.model.num_classes}; give one per class or ()"
            )
    if k.objective in EXAMPLE_OBJECTIVES and not config.data.source.startswith("synthetic"):
        wanted = ["input_key"] + (["target_key"] if k.objective == "seq2seq" else ["label_key"])
        for key in wanted:
            if not config.data[key]:
                raise ConfigError(
                    f"task.objective={k.objective} reads examples: set --config.data.{key} to "
                    "the feature (TFDS) or field (JSONL) that holds it"
                )
    if k.logits_chunk < 0:
        raise ConfigError(f"task.logits_chunk must be >= 0 (0: no chunking), got {k.logits_chunk}")
    if k.logits_chunk and k.objective == "classify":
        raise ConfigError(
            f"task.logits_chunk={k.logits_chunk} chunks token losses; task.objective=classify "
            "has class logits only: set --config.task.logits_chunk=0"
        )
    if config.train.eval_decode < 0:
        raise ConfigError(f"train.eval_decode must be >= 0, got {config.train.eval_decode}")
    if config.train.eval_decode and k.objective != "seq2seq":
        raise ConfigError(
            f"train.eval_decode={config.train.eval_decode} decodes seq2seq outputs for BLEU; "
            f"task.objective={k.objective} has none: set --config.train.eval_decode=0"
        )
    if config.data.target_len < 2:
        raise ConfigError(
            f"config key 'data.target_len' must be >= 2, got {config.data.target_len}"
        )
    for key in ("task.mask_rate", "task.mask_frac", "task.random_frac"):
        if not 0.0 <= _get(config, key) <= 1.0:
            raise ConfigError(f"config key {key!r} must be in [0, 1], got {_get(config, key)}")
    if k.mask_frac + k.random_frac > 1.0:
        raise ConfigError(
            f"task.mask_frac={k.mask_frac} + task.random_frac={k.random_frac} exceeds 1; "
            "lower one (BERT: 0.8 and 0.1)"
        )


SPANS_NEED_SENTINELS = (
    "task.objective=span_corruption needs <extra_id_N> sentinel pieces in the tokenizer; set "
    "--config.data.tokenizer_sentinels=100 (T5) or point data.tokenizer at one that has them"
)
MLM_NEEDS_MASK = (
    "task.objective=mlm needs a <mask> piece in the tokenizer; set --config.data.tokenizer_mask="
    "True (a tokenizer with it is trained once) or point data.tokenizer at one that has it"
)


def _trains_tokenizer(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains its own tokenizer (no data.tokenizer, no prepared cache, no
    train.init_from run whose tokenizer it takes)."""
    d = config.data
    kinds = {spec.kind for spec in parse_sources(d.source)}
    given = d.tokenizer or config.train.init_from
    return not given and not kinds & {"synthetic", "prepared"}


def _validate_data(d: ml_collections.ConfigDict) -> None:
    try:
        parse_sources(d.source)
    except DataError as e:
        raise ConfigError(f"config key 'data.source': {e}") from None
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(
            f"config key 'data.eval_fraction' must be in (0, 1), got {d.eval_fraction}"
        )
    for key in ("min_doc_chars", "max_doc_chars", "tokenizer_sentinels"):
        if d[key] < 0:
            raise ConfigError(f"config key 'data.{key}' must be >= 0, got {d[key]}")
    if 0 < d.max_doc_chars < d.min_doc_chars:
        raise ConfigError(
            f"data.max_doc_chars={d.max_doc_chars} is below data.min_doc_chars="
            f"{d.min_doc_chars}; raise it or set 0 for no limit"
        )


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_eval_args(
    *, max_batches: int | None, max_decode_examples: int, beam_size: int, length_penalty: float
) -> None:
    """jaxlm-eval's (and `inference.evaluate_run`'s) arguments: one-line errors naming the flag,
    raised before the run's checkpoint is read (and, in jaxlm-eval, before JAX loads)."""
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"--max_batches must be >= 0 (0 is all), got {max_batches}")
    if max_decode_examples < 0:
        raise ValueError(
            f"--max_decode_examples must be >= 0 (0: what the eval batches hold), got "
            f"{max_decode_examples}"
        )
    BeamSettings(beam_size=beam_size, length_penalty=length_penalty).check()
