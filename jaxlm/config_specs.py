"""ConfigDict -> typed inputs: the frozen dataclasses the model and the data layer take, and
the few run facts other modules need (checkpoint directory, transforms, platform copy).

Together with jaxlm/config.py (re-exported there) the only reader of a ConfigDict: the model
never sees one (`model_config` -> TransformerConfig) and neither does the data layer
(`data_spec` -> DataSpec).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import ml_collections

from jaxlm import storage
from jaxlm.config_checks import EXAMPLE_OBJECTIVES, OBJECTIVE_LAYOUT, ConfigError
from jaxlm.data import specs
from jaxlm.data.sources import parse_sources
from jaxlm.models.spec import TransformerConfig


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
    """The one place a ConfigDict becomes the model's frozen dataclass.

    Every TransformerConfig field is the model.* key of the same name (qat: train.qat); three
    resolve 0 defaults.
    """
    m = config.model
    fields = {f.name: m[f.name] for f in dataclasses.fields(TransformerConfig) if f.name != "qat"}
    fields.update(
        qat=config.train.qat,  # a training option, but one the forward pass must know
        vocab_size=m.vocab_size or vocab_size,
        num_kv_heads=m.num_kv_heads or m.num_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads,
    )
    try:
        return TransformerConfig(**fields)
    except ValueError as e:  # its own checks (relative buckets, heads) name the model.* key
        raise ConfigError(str(e)) from None


def transform_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """model.transforms ("a, b") -> ("a", "b")."""
    return tuple(n.strip() for n in config.model.transforms.split(",") if n.strip())


def checkpoint_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> str:
    """train.checkpoint_dir, or WORKDIR/checkpoints when it is empty."""
    return config.train.checkpoint_dir or str(Path(workdir) / "checkpoints")


def synthetic_vocab_size(config: ml_collections.ConfigDict) -> int:
    """The vocabulary of synthetic data: model.vocab_size, else data.tokenizer_vocab_size."""
    return config.model.vocab_size or config.data.tokenizer_vocab_size


def data_spec(config: ml_collections.ConfigDict) -> specs.DataSpec:
    """The one place a ConfigDict becomes the data layer's frozen DataSpec.

    The layout comes from OBJECTIVE_LAYOUT (synthetic data: its own); the tokenizer of a
    train.init_from run is resolved to its path here, so the data layer never reads runs.
    """
    d, k = config.data, config.task
    sources = tuple(parse_sources(d.source))
    layout = "synthetic" if sources[0].kind == "synthetic" else OBJECTIVE_LAYOUT[k.objective]
    init_from = ""
    if config.train.init_from and not d.tokenizer:
        init_from = storage.join(parse_init_from(config.train.init_from)[0], "tokenizer.model")
    fields = None
    if k.objective in EXAMPLE_OBJECTIVES:
        fields = specs.ExampleFields(k.objective, d.input_key, d.target_key, d.label_key)
    return specs.DataSpec(
        sources=sources,
        layout=layout,
        objective=k.objective,
        read=specs.ReadOptions(
            d.text_key,
            d.tfds_data_dir,
            d.train_split,
            d.eval_split,
            d.eval_fraction,
            d.decode_errors,
        ),
        clean=specs.CleanConfig(
            d.normalize,
            d.strip_control,
            d.strip_whitespace,
            d.min_doc_chars,
            d.max_doc_chars,
            d.dedup,
        ),
        tokenizer=specs.TokenizerSpec(
            path=d.tokenizer,
            init_from=init_from,
            vocab_size=d.tokenizer_vocab_size,
            model_type=d.tokenizer_type,
            byte_fallback=d.tokenizer_byte_fallback,
            mask=d.tokenizer_mask,
            sentinels=d.tokenizer_sentinels,
            sample_chars=d.tokenizer_sample_chars,
        ),
        batch_size=d.batch_size,
        seq_len=d.seq_len,
        target_len=d.target_len,
        pack=d.pack,
        seed=config.train.seed,
        fields=fields,
        spans=specs.SpanSpec(k.noise_density, k.mean_span_length),
        num_classes=config.model.num_classes,
        vocab_size=synthetic_vocab_size(config),
        cache_root=d.cache_dir,
        prepend_cls=d.prepend_cls,
    )


_STEP = re.compile(r"^(?P<workdir>.*):(?P<step>[^:/]*)$")


def parse_init_from(text: str) -> tuple[str, int | None]:
    """'WORKDIR[:STEP]' -> (workdir, step or None for the latest); gs:// paths keep their ':'."""
    text = text.strip()
    workdir, step = text, None
    m = _STEP.match(text)
    # Only a ':' followed by no '/' can start a step: 'gs://bucket/run' has none.
    if m:
        if not m["step"].isdigit():
            raise ConfigError(
                f"train.init_from={text!r}: STEP after ':' must be a checkpoint step number "
                "(WORKDIR:300), or leave it out for the latest"
            )
        workdir, step = m["workdir"], int(m["step"])
    if not workdir:
        raise ConfigError(
            f"train.init_from={text!r} names no run directory; write WORKDIR or WORKDIR:STEP"
        )
    return workdir, step
