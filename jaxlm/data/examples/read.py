"""Labelled examples as read: (input text, target text or label) from one tfds:NAME or
jsonl:GLOB source, by the feature/field names in data.input_key, data.target_key and
data.label_key, and the cleaning they get (example_cache.py tokenizes and stores them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from jaxlm.data import readers
from jaxlm.data.clean import CleanConfig, Cleaner
from jaxlm.data.readers import DataError, ReadOptions, SourceSpec

KINDS = ("tfds", "jsonl")
_TFDS_BATCH = 1024  # TFDS examples are read in batches of this many (per-element is slow)


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which feature/field holds what: the input text and the target text or the label."""

    objective: str  # seq2seq or classify
    input: str
    other: str  # target_key (seq2seq) or label_key (classify)

    @classmethod
    def from_config(cls, config) -> Fields:
        d, objective = config.data, config.task.objective
        if objective not in ("seq2seq", "classify"):
            raise ValueError(f"task.objective={objective} does not read labelled examples")
        other = d.target_key if objective == "seq2seq" else d.label_key
        return cls(objective, d.input_key, other)

    @property
    def seq2seq(self) -> bool:
        return self.objective == "seq2seq"

    @property
    def other_config_key(self) -> str:
        return "target_key" if self.seq2seq else "label_key"

    def config_key(self, name: str) -> str:
        return "input_key" if name == self.input else self.other_config_key


def one_source(config, specs: list[SourceSpec]) -> SourceSpec:
    objective = config.task.objective
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise DataError(
            f"task.objective={objective} reads one source of examples, not a mixture of "
            f"{len(specs)} ({names}); set data.source to a single tfds:NAME or jsonl:GLOB"
        )
    spec = specs[0]
    if spec.kind not in KINDS:
        raise DataError(
            f"task.objective={objective} reads labelled examples from tfds:NAME or jsonl:GLOB, "
            f"not {spec.name}; point data.source at one of those"
        )
    return spec


def records(
    spec: SourceSpec, split: str, opts: ReadOptions, fields: Fields, num_classes: int = 0
) -> Iterator[tuple[str, str | int]]:
    """(raw input text, raw target text or int label) of the split's examples, in order."""
    if spec.kind == "tfds":
        return _tfds_records(spec.arg, split, opts, fields, num_classes)
    return _jsonl_records(spec.arg, split, opts, fields)


def _tfds_records(
    name: str, split: str, opts: ReadOptions, fields: Fields, num_classes: int
) -> Iterator[tuple[str, str | int]]:
    import tensorflow as tf  # Lazy: only TFDS sources need TensorFlow.

    builder = readers.tfds_builder(name, opts)
    features = builder.info.features
    for key in (fields.input, fields.other):
        if key not in features:
            raise DataError(
                f"TFDS dataset {name} has no feature {key!r} (it has "
                f"{sorted(features.keys())}); set data.{fields.config_key(key)}"
            )
    label = features[fields.other] if not fields.seq2seq else None
    classes = getattr(label, "num_classes", None)
    if classes and num_classes and classes > num_classes:  # found before tokenizing anything
        raise DataError(
            f"TFDS {name} feature {fields.other!r} has {classes} classes but "
            f"model.num_classes={num_classes}; set --config.model.num_classes={classes}"
        )
    split_name = opts.split_name(split)
    ds = readers.tfds_split(builder, name, split_name, train=split == "train")
    keys = (fields.input, fields.other)
    ds = ds.map(lambda ex: tuple(ex[k] for k in keys), num_parallel_calls=tf.data.AUTOTUNE)
    where = f"TFDS {name} split {split_name}"
    for inputs, others in ds.batch(_TFDS_BATCH).prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        if inputs.dtype.kind not in "OS" or (fields.seq2seq and others.dtype.kind not in "OS"):
            bad = fields.input if inputs.dtype.kind not in "OS" else fields.other
            raise DataError(
                f"{where}: feature {bad!r} is not text; set data.{fields.config_key(bad)} to a "
                "text feature"
            )
        if not fields.seq2seq and others.dtype.kind not in "iu":
            raise DataError(
                f"{where}: feature {fields.other!r} is not an integer class label; set "
                "data.label_key to one"
            )
        texts = [readers.decode(x, where, opts.decode_errors) for x in inputs]
        if fields.seq2seq:
            targets = [readers.decode(x, where, opts.decode_errors) for x in others]
            yield from zip(texts, targets, strict=True)
        else:
            yield from zip(texts, others.tolist(), strict=True)


def _jsonl_records(
    pattern: str, split: str, opts: ReadOptions, fields: Fields
) -> Iterator[tuple[str, str | int]]:
    files, by_name = readers.match_files("jsonl", pattern, split, opts)
    for obj, where in readers.json_objects(files, pattern, opts):
        text = readers.text_field(obj, fields.input, "input_key", where, opts)
        if fields.seq2seq:
            other = readers.text_field(obj, fields.other, "target_key", where, opts)
        else:
            other = _label_field(obj, fields.other, where)
        if by_name or readers.in_split(text, split, opts.eval_fraction):
            yield text, other


def _label_field(obj: dict, key: str, where: str) -> int:
    label = readers.field(obj, key, "label_key", where)
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(
            f"{where}: field {key!r} is {label!r}, not an integer class id; write labels as "
            "0 .. model.num_classes - 1"
        )
    return label


def text_cleaner(clean_cfg: CleanConfig) -> Callable[[str], str]:
    """The configured text cleaning without the document filters (empty stays empty)."""
    cleaner = Cleaner(dataclasses.replace(clean_cfg, min_chars=0, max_chars=0, dedup=False))
    return lambda text: cleaner(text) or ""


def clean_identity(clean_cfg: CleanConfig) -> dict:
    """The cleaning settings that change example texts (the document filters do not apply)."""
    return {
        "normalize": clean_cfg.normalize,
        "strip_control": clean_cfg.strip_control,
        "strip_whitespace": clean_cfg.strip_whitespace,
    }


def read_identity(spec: SourceSpec, opts: ReadOptions) -> dict:
    out = opts.identity(spec)
    out.pop("text_key", None)  # examples are read by data.input_key and friends
    return out


def example_texts(config, specs: list[SourceSpec]) -> Iterator[str]:
    """Cleaned input and target texts of the train split, example by example (non-empty only):
    what a tokenizer for the task is trained on when data.tokenizer is empty."""
    spec, fields = one_source(config, specs), Fields.from_config(config)
    clean = text_cleaner(CleanConfig.from_config(config.data))
    for text, other in records(spec, "train", ReadOptions.from_config(config.data), fields):
        for t in (text, other) if fields.seq2seq else (text,):
            if t := clean(t):
                yield t
