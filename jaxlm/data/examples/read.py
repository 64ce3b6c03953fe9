"""Labelled examples as read: (input text, target text or label) from a tfds:NAME or
jsonl:GLOB source (the readers sources.KINDS names), by the feature/field names in
data.input_key, data.target_key and data.label_key, and the cleaning they get (cache.py
tokenizes and stores them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from jaxlm.data import readers
from jaxlm.data.clean import Cleaner
from jaxlm.data.specs import CleanConfig, ExampleFields, ReadOptions
from jaxlm.data.types import DataError

_TFDS_BATCH = 1024  # TFDS examples are read in batches of this many (per-element is slow)


def tfds_records(
    name: str, split: str, opts: ReadOptions, fields: ExampleFields, num_classes: int
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


def jsonl_records(
    pattern: str, split: str, opts: ReadOptions, fields: ExampleFields, num_classes: int = 0
) -> Iterator[tuple[str, str | int]]:
    del num_classes  # labels are checked when the cache is loaded
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
