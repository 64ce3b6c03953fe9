"""The base configuration: every key jaxlm reads, each with a one-line comment.

Experiments (experiments/*.py) start from `base_config()` and change what they need. Command-line
overrides (`--config.train.steps=100`) go through `apply_overrides`, which rejects unknown keys and
values of the wrong type with a one-line `ConfigError`. The model never sees a ConfigDict:
`model_config` converts `config.model` into the frozen `TransformerConfig` in one place.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import ml_collections

# Re-exported: jaxlm.config is the one place callers import config names from.
from jaxlm import storage
from jaxlm.config_checks import (  # noqa: F401
    CHOICES,
    EXAMPLE_OBJECTIVES,
    MLM_NEEDS_MASK,
    OBJECTIVE_FAMILY,
    OBJECTIVE_LAYOUT,
    SPANS_NEED_SENTINELS,
    ConfigError,
    check_eval_args,
    is_prefix_lm,
    row_len,
    validate,
)
from jaxlm.config_specs import (  # noqa: F401
    checkpoint_dir,
    data_spec,
    model_config,
    parse_init_from,
    synthetic_vocab_size,
    transform_names,
)

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated).
DEFAULT_RULES = (
    ("batch", ("dcn", "data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def base_config() -> ml_collections.ConfigDict:
    """Every key, with its default. Defaults describe a small LLaMA-style model."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.family = "decoder"  # decoder (GPT/LLaMA), encoder (BERT) or encoder_decoder (T5)
    m.vocab_size = 0  # 0: take the tokenizer's vocabulary size
    m.d_model = 256  # residual stream width
    m.num_layers = 4  # Transformer blocks
    m.num_heads = 4  # query heads
    m.num_kv_heads = 0  # key/value heads for grouped-query attention; 0: same as num_heads
    m.head_dim = 0  # per-head width; 0: d_model // num_heads
    m.d_ff = 1024  # hidden width of the MLP
    m.max_len = 1024  # longest sequence; sizes the learned position table
    m.norm = "rmsnorm"  # rmsnorm (LLaMA) or layernorm (GPT-2)
    m.norm_eps = 1e-6  # epsilon inside the norms
    m.mlp = "swiglu"  # swiglu (LLaMA), geglu (T5 v1.1), gelu (GPT-2, tanh), gelu_exact (BERT), relu
    m.positions = "rope"  # rope (LLaMA), learned (GPT-2/BERT) or relative (T5 bucketed bias)
    m.rope_theta = 10000.0  # RoPE base frequency
    m.use_bias = False  # biases in linear layers and LayerNorm (GPT-2 uses them)
    m.tie_embeddings = True  # share the input embedding with the output projection
    m.dropout = 0.0  # dropout on attention and MLP outputs and on embeddings
    m.init_std = 0.02  # normal init std; residual output projections are scaled by 1/sqrt(2L)
    m.attention_impl = "xla"  # jax.nn.dot_product_attention implementation: xla or cudnn
    m.attention_scale = 0.0  # attention score scale; 0: 1/sqrt(head_dim); T5: 1.0 (unscaled)
    m.scale_tied_output = False  # decoder output * d_model**-0.5 before the vocab projection (T5)
    m.dtype = "bfloat16"  # compute dtype of activations and matmuls (CPU runs use float32)
    m.param_dtype = "float32"  # storage dtype of parameters (and so of optimizer state)
    m.remat = "none"  # activation checkpointing per block: none, full, or dots (save matmuls)
    m.num_decoder_layers = 0  # encoder_decoder: decoder blocks; 0: num_layers
    m.share_embeddings = True  # encoder_decoder: one token table for encoder and decoder
    m.relative_buckets = 32  # positions=relative: buckets per stack
    m.relative_max_distance = 128  # positions=relative: offsets past this share a bucket
    m.num_classes = 0  # > 0 adds a classification head (not trained by lm or mlm)
    m.pooling = "auto"  # classification pooling: first, mean, last; auto: first (encoder), last
    m.block_norm = "pre"  # pre: x + f(norm(x)), final norm; post (BERT): norm(x + f(x)), none
    m.embed_norm = False  # a norm after the token + position (+ type) embeddings (BERT)
    m.type_vocab_size = 0  # encoder: > 0 adds token-type embeddings, type 0 by default (BERT: 2)
    m.mlm_transform = False  # encoder: dense + MLP activation + norm before the vocab (BERT)
    m.classifier_activation = "tanh"  # after the head's first dense: tanh (BERT), relu (DistilBERT)
    # Parameter transforms applied when this run's checkpoint is loaded for use (eval, generate,
    # init_from; not resume): comma-separated names of jaxlm/transforms.py or package.module:fn.
    m.transforms = ""
    # Written by `jaxlm-compress quantize`, not set by hand: block matmul kernels stored as
    # integers plus scales (none, int8, int4), and the input rows that share one scale (0: all).
    m.quant = "none"
    m.quant_group_size = 0

    c.task = k = ml_collections.ConfigDict()
    k.objective = "lm"  # lm: next token (model.family=decoder); mlm: masked tokens (encoder)
    k.mask_rate = 0.15  # mlm: share of real tokens chosen for prediction (BERT: 0.15)
    k.mask_frac = 0.8  # mlm: share of chosen tokens replaced by <mask> (BERT: 0.8)
    k.random_frac = 0.1  # mlm: share replaced by a random token (BERT: 0.1); the rest stay
    k.noise_density = 0.15  # span_corruption: share of tokens dropped into spans (T5: 0.15)
    k.mean_span_length = 3.0  # span_corruption: mean noise span length in tokens (T5: 3)
    k.class_weights = ()  # classify: per-class loss weights (empty: all 1)
    k.class_names = ()  # classify: a name per class in label order (HF id2label); empty: none
    # Token losses project hidden states to the vocabulary this many positions at a time,
    # recomputing each block in the backward pass, so [B, T, V] logits never exist whole; 0: all.
    k.logits_chunk = 0

    c.data = d = ml_collections.ConfigDict()
    # Comma-separated mixture of KIND[:ARG][@WEIGHT]: python_stdlib, synthetic, tfds:NAME,
    # text:GLOB, jsonl:GLOB, file:PATH, prepared:DIR (see jaxlm/data/sources.py).
    d.source = "python_stdlib"  # what to train on; synthetic needs no TensorFlow or text
    d.text_key = "text"  # TFDS feature / JSONL field holding the document text
    d.tfds_data_dir = ""  # where TFDS datasets are prepared (local or gs://); empty: TFDS default
    d.train_split = "train"  # TFDS split (slicing allowed, train[:90%]); {split} in file globs
    d.eval_split = "validation"  # held-out TFDS split (lm1b: test); {split} in file globs
    d.eval_fraction = 0.05  # file sources without {split}: share of documents held out
    d.decode_errors = "strict"  # bytes that are not UTF-8: strict (stop) or replace (U+FFFD)
    d.normalize = "NFC"  # Unicode normalization before tokenization: none, NFC or NFKC
    d.strip_control = True  # drop control characters but tab and newline; \r\n and \r -> \n
    d.strip_whitespace = True  # drop trailing spaces and blank lines beyond two in a row
    d.min_doc_chars = 1  # drop documents shorter than this after cleaning
    d.max_doc_chars = 0  # drop documents longer than this after cleaning; 0: no limit
    d.dedup = True  # drop exact duplicate documents (within a source and split)
    d.pack = True  # pack documents into rows with segment ids; False: a document per row, padded
    d.batch_size = 32  # global batch in sequences, over all devices and hosts
    d.seq_len = 256  # tokens per sequence (seq2seq and classify: per input, longer truncated)
    d.target_len = 64  # seq2seq and span_corruption: decoder tokens per example, EOS included
    d.input_key = ""  # seq2seq/classify: feature or JSONL field with the input text
    d.target_key = ""  # seq2seq: feature or JSONL field with the target text
    d.label_key = "label"  # classify: feature or JSONL field with the integer class label
    d.prepend_cls = False  # classify: rows are CLS, text, EOS ([CLS] ... [SEP]: BERT's inputs)
    d.tokenizer = ""  # SentencePiece .model (local or gs://); empty: train one on a sample
    d.tokenizer_vocab_size = 4096  # vocabulary size when training a tokenizer
    d.tokenizer_type = "bpe"  # SentencePiece model type when training: bpe, unigram or char
    d.tokenizer_byte_fallback = True  # unseen characters become UTF-8 byte pieces, not unk
    d.tokenizer_mask = False  # add a <mask> control piece when training a tokenizer
    d.tokenizer_sentinels = 0  # add this many <extra_id_N> control pieces (span corruption)
    d.tokenizer_sample_chars = 20_000_000  # characters of cleaned text to train a tokenizer on
    d.cache_dir = ""  # tokenizers and pre-tokenized caches; empty: ~/.cache/jaxlm
    d.prefetch = 2  # batches placed on device ahead of the step that uses them

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3  # peak learning rate
    o.warmup_steps = 100  # linear warmup from 0 to lr
    o.schedule = "cosine"  # decay after warmup: cosine, linear or constant
    o.min_lr_ratio = 0.1  # final learning rate as a fraction of lr
    o.b1 = 0.9  # AdamW beta1
    o.b2 = 0.95  # AdamW beta2
    o.eps = 1e-8  # AdamW epsilon
    o.weight_decay = 0.1  # decoupled weight decay
    o.decay_norms = False  # apply weight decay to norm scales and biases
    o.decay_biases = False  # apply weight decay to linear biases
    o.decay_embeddings = False  # apply weight decay to token and position embeddings
    o.clip_norm = 1.0  # global-norm gradient clipping; 0 disables
    o.grad_accum_steps = 1  # microbatches per step (the global batch is split into these)

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000  # optimizer steps in the whole run
    t.seed = 0  # seeds parameters, dropout and data order
    t.log_every = 50  # steps between console/metrics.jsonl/TensorBoard records
    t.eval_every = 500  # steps between evaluations on the validation split; 0: only at the end
    t.eval_steps = 20  # validation batches per evaluation; 0: the whole split
    t.eval_decode = 0  # seq2seq: greedy-decode this many validation examples per eval for BLEU
    # Multi-process runs: seconds an eval or decode batch may wait on the other processes (a
    # step they do not run) before the run stops, saying where each process is; 0: no limit.
    t.hang_timeout = 1800.0
    t.checkpoint_every = 500  # steps between checkpoints (one is always written at the end)
    t.keep_checkpoints = 3  # checkpoints kept on disk
    t.checkpoint_dir = ""  # where checkpoints go (local or gs://); empty: WORKDIR/checkpoints
    t.stop_at = 0  # stop with a checkpoint at this step, as if preempted; 0: run to train.steps
    t.peak_tflops = 0.0  # device peak for MFU; 0: look it up from the device kind
    t.init_from = ""  # WORKDIR[:STEP] of a trained run: start from its matching parameters
    t.freeze = ""  # comma-separated regexes of parameter paths (blocks/0/attn/...) kept fixed
    # Sparsity masks (safetensors of 0/1 by parameter path; jaxlm-compress prune writes
    # RUN/masks.safetensors): masked weights start at zero and their updates are dropped.
    t.masks = ""
    t.distill = dl = ml_collections.ConfigDict()
    dl.teacher = ""  # WORKDIR[:STEP] of a trained run (same tokenizer) to distill from; "": off
    dl.temperature = 2.0  # softmax temperature of both models in the KL term (scaled by T^2)
    dl.alpha = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * own objective
    t.qat = False  # quantization-aware training: int8 weights and inputs of block matmuls
    # LoRA (jaxlm/compress/lora.py): rank > 0 trains low-rank adapters on the kernels matching
    # lora_targets (comma-separated regexes) of the frozen train.init_from run, scaled alpha/rank.
    t.lora_rank = 0
    t.lora_alpha = 16.0
    t.lora_targets = "attn/query,attn/value"

    c.mesh = mh = ml_collections.ConfigDict()
    mh.dcn_data = 1  # data-parallel axis across slices (multislice over DCN): number of slices
    mh.data = -1  # data-parallel axis size within a slice; -1 fills the remaining devices
    mh.fsdp = 1  # fully sharded data-parallel axis size (params sharded over it)
    mh.tensor = 1  # tensor-parallel axis size (heads, mlp and vocab sharded over it)
    mh.rules = DEFAULT_RULES  # logical axis name -> mesh axis; see jaxlm/sharding.py
    return c


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """An experiment file's get_config(), or a run's saved config.json; overridden, validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config experiments/NAME.py")
    if path.suffix == ".json":
        config = base_config()
        _merge_saved(config, json.loads(path.read_text()), str(path))
    else:
        config = _run_experiment(path)
    apply_overrides(config, overrides)
    validate(config)
    return config


def _run_experiment(path: Path) -> Any:
    """get_config() of an experiment file; its mistakes as one line naming the file and line."""
    spec = importlib.util.spec_from_file_location(f"jaxlm_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} has no get_config(); an experiment file must define one")
        return module.get_config()
    except SyntaxError as e:
        raise ConfigError(
            f"{path}:{e.lineno}: syntax error ({e.msg}): fix the experiment file"
        ) from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any mistake in the user's Python file
        line = _line_in(e, path)
        raise ConfigError(
            f"{path}{line}: {type(e).__name__}: {e} (raised while running the experiment "
            "file): fix the experiment file"
        ) from None


def _line_in(e: BaseException, path: Path) -> str:
    """':N' for the deepest traceback frame inside `path`, or ''."""
    tb, line = e.__traceback__, ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def load_run_config(workdir: str | Path, overrides=()) -> Any:
    """The config a run in `workdir` was trained with (its config.json), plus overrides."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: {workdir} is not a jaxlm run directory; pass the --workdir "
            "that jaxlm-train wrote"
        )
    return load_config(path, overrides)


def _merge_saved(config: ml_collections.ConfigDict, saved: dict, where: str, prefix="") -> None:
    """Set keys from a saved JSON config; keys it lacks keep their defaults (older runs)."""
    for key, value in saved.items():
        name = prefix + key
        if key not in config:
            raise ConfigError(f"{where} has unknown config key {name!r}; it is not a jaxlm config")
        if isinstance(config[key], ml_collections.ConfigDict):
            _merge_saved(config[key], value, where, name + ".")
        elif isinstance(config[key], tuple):
            config[key] = _tuples(value)
        else:
            config[key] = value


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """Apply `key=value` strings (a leading `--config.` is allowed) to a config, in place."""
    for item in overrides:
        item = item.removeprefix("--").removeprefix("config.")
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} has no '='; write --config.{key}=VALUE")
        parent, leaf = _lookup_parent(config, key)
        current = parent[leaf]
        parent[leaf] = _parse_value(key, raw, current)


def _lookup_parent(config: ml_collections.ConfigDict, key: str):
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the top level"
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config key {key!r}: {where} has no {part!r}; valid keys: {valid}"
            )
        if i < len(parts) - 1:
            node = node[part]
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; set one of its keys instead")
    return node, parts[-1]


def _parse_value(key: str, raw: str, current: Any) -> Any:
    kind = type(current)
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):
            return raw
        value = ast.literal_eval(raw)
        if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
            return kind(value)
        raise ValueError
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"config key {key!r} expects {kind.__name__}, got {raw!r}; "
            f"write --config.{key}=<{kind.__name__}>"
        ) from None


def _tuples(value):
    """JSON lists back to the tuples they were saved from, at every depth."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """A copy of a run's config for evaluation or generation on `platform`: cuDNN attention (a
    GPU-only kernel, not part of the checkpoint) becomes XLA's, which computes the same."""
    config = copy.deepcopy(config)
    if config.model.attention_impl == "cudnn" and platform != "gpu":
        config.model.attention_impl = "xla"
    return config


def gpt2_style(model: ml_collections.ConfigDict) -> None:
    """Switch a model config to GPT-2 blocks: learned positions, LayerNorm with bias, GELU."""
    model.norm = "layernorm"
    model.norm_eps = 1e-5
    model.mlp = "gelu"
    model.positions = "learned"
    model.use_bias = True


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Write config.json; an earlier, different one is kept as config.N.json, never lost."""
    path = workdir / "config.json"
    text = to_json(config)
    if path.exists():
        old = path.read_text()
        if old == text:
            return
        n, kept = 1, False
        while (workdir / f"config.{n}.json").exists():
            kept = kept or (workdir / f"config.{n}.json").read_text() == old  # an earlier try
            n += 1
        # Copied, not renamed, and the new one written aside and renamed over it: a full disk
        # or a kill at any moment leaves a whole config.json beside the checkpoints.
        if not kept:
            storage.write_bytes(workdir / f"config.{n}.json", old.encode())
    storage.write_bytes(path, text.encode())
