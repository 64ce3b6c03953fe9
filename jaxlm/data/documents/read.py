"""The documents of each text source kind, one reader per kind (sources.KINDS names them).

A reader takes (the kind's argument, split, read options) and yields the split's documents
("train" or "validation") in a fixed order. File globs may contain `{split}`, replaced by
data.train_split / data.eval_split; without it, a document goes to validation when a hash of
its text falls in data.eval_fraction, so exact duplicates always share a split.
"""

from __future__ import annotations

from collections.abc import Iterator

from jaxlm import storage
from jaxlm.data.builtin import corpus
from jaxlm.data.readers import (
    decode,
    empty_file,
    in_split,
    json_objects,
    match_files,
    text_field,
    tfds_builder,
    tfds_split,
)
from jaxlm.data.specs import ReadOptions
from jaxlm.data.types import DataError


def stdlib_documents(arg: str, split: str, opts: ReadOptions) -> Iterator[str]:
    """The embedded corpus: this interpreter's standard library, split by file path."""
    del arg, opts  # the split is fixed by corpus.py
    return (text for _, text in corpus.iter_split(split))


def text_documents(pattern: str, split: str, opts: ReadOptions) -> Iterator[str]:
    files, by_name = match_files("text", pattern, split, opts)
    for path in files:
        data = storage.read_bytes(path)
        if not data:
            raise empty_file(path, pattern)
        text = decode(data, path, opts.decode_errors)
        if by_name or in_split(text, split, opts.eval_fraction):
            yield text


def jsonl_documents(pattern: str, split: str, opts: ReadOptions) -> Iterator[str]:
    files, by_name = match_files("jsonl", pattern, split, opts)
    for obj, where in json_objects(files, pattern, opts):
        text = text_field(obj, opts.text_key, "text_key", where, opts)
        if by_name or in_split(text, split, opts.eval_fraction):
            yield text


def file_documents(path: str, split: str, opts: ReadOptions) -> Iterator[str]:
    """One document: the file's last data.eval_fraction validates, the rest trains."""
    if not storage.exists(path):
        raise DataError(f"file:{path} does not exist; check the path in data.source")
    data = storage.read_bytes(path)
    if not data:
        raise DataError(f"file:{path} is empty; point data.source at a file with text in it")
    text = decode(data, path, opts.decode_errors)
    # Cut at a line end so no line is split between train and validation.
    at = int(len(text) * (1.0 - opts.eval_fraction))
    newline = text.find("\n", at)
    cut = len(text) if newline < 0 else newline + 1
    return iter([text[:cut] if split == "train" else text[cut:]])


def tfds_documents(name: str, split: str, opts: ReadOptions) -> Iterator[str]:
    import tensorflow as tf  # Lazy: only TFDS sources need TensorFlow.

    split = opts.split_name(split)
    builder = tfds_builder(name, opts)
    features = builder.info.features
    if opts.text_key not in features:
        raise DataError(
            f"TFDS dataset {name} has no feature {opts.text_key!r} (it has "
            f"{sorted(features.keys())}); set data.text_key"
        )
    ds = tfds_split(builder, name, split, train=split == opts.train_split)
    texts = ds.map(lambda ex: ex[opts.text_key], num_parallel_calls=tf.data.AUTOTUNE)
    where = f"TFDS {name} split {split}"
    for data in texts.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        yield decode(data, where, opts.decode_errors)
