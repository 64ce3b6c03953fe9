"""The example cache: labelled examples read, cleaned and tokenized once (see examples.py).

`build_cache(config, tok)` reads one `tfds:NAME` or `jsonl:GLOB` source whose examples hold
data.input_key and data.target_key (seq2seq) or data.label_key (classify) and writes their ids.

Cleaning applies the configured normalization and control/whitespace stripping to every text
but never drops a validation example (a benchmark's example count must not change): the
document filters data.min_doc_chars, data.max_doc_chars and data.dedup do not apply. A
training example whose input (or seq2seq target) is empty after cleaning is dropped and
counted in the manifest. Examples of JSONL files without `{split}` in the glob go to
validation when a hash of their raw input falls in data.eval_fraction, so equal inputs always
share a split.

The cache, `cache.root(config)/examples/<slug>-<hash>/`, is keyed by the source, the read
options, the keys, the cleaning settings and the tokenizer (not by seq_len or target_len:
truncation happens at batch time), and holds per split

    {split}.inputs.tokens.npy    uint16 (vocabularies up to 65536) or int32: all input ids
    {split}.inputs.offsets.npy   int64 [n + 1]: example i is tokens[offsets[i]:offsets[i + 1]]
    {split}.targets.*.npy        the same for seq2seq targets
    {split}.labels.npy           int64 [n]: classification labels (as read: checked at load)
    validation.texts.jsonl       the cleaned validation texts {"input", "target"} (for BLEU)
    manifest.json                written last: a directory without one is rebuilt

Ids are stored without EOS (`Ragged.rows` adds it when a batch is built).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import numpy as np

from jaxlm import monitor
from jaxlm.data import cache, prepare, readers, storage
from jaxlm.data.clean import CleanConfig, Cleaner
from jaxlm.data.readers import DataError, ReadOptions, SourceSpec

FORMAT = 1
MANIFEST = "manifest.json"
TEXTS = "validation.texts.jsonl"
SPLITS = readers.SPLITS  # ("train", "validation")
KINDS = ("tfds", "jsonl")
_CHUNK_CHARS = 2_000_000  # examples are tokenized in chunks of about this many characters
_TFDS_BATCH = 1024  # TFDS examples are read in batches of this many (per-element is slow)
_LOG_EVERY_S = 30.0  # seconds between progress lines while a cache is built


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


# --- reading --------------------------------------------------------------------------------


def _one_source(config, specs: list[SourceSpec]) -> SourceSpec:
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


def _records(
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


def _text_cleaner(clean_cfg: CleanConfig) -> Callable[[str], str]:
    """The configured text cleaning without the document filters (empty stays empty)."""
    cleaner = Cleaner(dataclasses.replace(clean_cfg, min_chars=0, max_chars=0, dedup=False))
    return lambda text: cleaner(text) or ""


def _clean_identity(clean_cfg: CleanConfig) -> dict:
    """The cleaning settings that change example texts (the document filters do not apply)."""
    return {
        "normalize": clean_cfg.normalize,
        "strip_control": clean_cfg.strip_control,
        "strip_whitespace": clean_cfg.strip_whitespace,
    }


def _read_identity(spec: SourceSpec, opts: ReadOptions) -> dict:
    out = opts.identity(spec)
    out.pop("text_key", None)  # examples are read by data.input_key and friends
    return out


def example_texts(config, specs: list[SourceSpec]) -> Iterator[str]:
    """Cleaned input and target texts of the train split, example by example (non-empty only):
    what a tokenizer for the task is trained on when data.tokenizer is empty."""
    spec, fields = _one_source(config, specs), Fields.from_config(config)
    clean = _text_cleaner(CleanConfig.from_config(config.data))
    for text, other in _records(spec, "train", ReadOptions.from_config(config.data), fields):
        for t in (text, other) if fields.seq2seq else (text,):
            if t := clean(t):
                yield t


# --- the cache ------------------------------------------------------------------------------


def cache_key(spec: SourceSpec, opts: ReadOptions, fields: Fields, clean_cfg, tok) -> str:
    """Names an example cache by everything that decides its contents."""
    what = {
        "format": FORMAT,
        "source": spec.name,
        "read": _read_identity(spec, opts),
        "fields": dataclasses.asdict(fields),
        "clean": _clean_identity(clean_cfg),
        "tokenizer": tok.sha256,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.slug}-{digest}"


def read_manifest(directory: Path) -> dict | None:
    """The cache's manifest, or None when it has none (never built, or interrupted)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return None  # a torn write: rebuild
    return manifest if manifest.get("format") == FORMAT else None


def _chunks(
    records: Iterable[tuple[str, str | int]],
    clean: Callable[[str], str],
    seq2seq: bool,
    dropped: list[int] | None = None,
) -> Iterator[tuple[list[str], list]]:
    """Cleaned (inputs, targets or labels) in chunks of about _CHUNK_CHARS characters. With
    `dropped` (a one-item counter), examples with an empty input or target are left out."""
    inputs, others, size = [], [], 0
    for text, other in records:
        text = clean(text)
        if seq2seq:
            other = clean(other)
        if dropped is not None and not (text and (other or not seq2seq)):
            dropped[0] += 1
            continue
        inputs.append(text)
        others.append(other)
        size += len(text) + (len(other) if seq2seq else 0)
        if size >= _CHUNK_CHARS:
            yield inputs, others
            inputs, others, size = [], [], 0
    if inputs:
        yield inputs, others


def _encoded(chunks: Iterable[tuple[list[str], list]], tok, seq2seq: bool) -> Iterator[tuple]:
    """(inputs, others, input ids, target ids or None) per chunk, encoded in a worker thread
    while the next chunk is read and cleaned (prepare.overlapped)."""

    def encode(chunk: tuple[list[str], list]) -> tuple:
        inputs, others = chunk
        return tok.encode_batch(inputs), tok.encode_batch(others) if seq2seq else None

    for chunk, ids in prepare.overlapped(chunks, encode):
        yield *chunk, *ids


class _RaggedWriter:
    """Collects token lists of examples into one id array plus offsets."""

    def __init__(self, dtype) -> None:
        self.dtype, self.parts, self.lengths = dtype, [], []

    def add(self, ids: list[list[int]]) -> int:
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        total = int(lengths.sum())
        self.parts.append(np.fromiter(itertools.chain.from_iterable(ids), self.dtype, total))
        self.lengths.append(lengths)
        return total

    def save(self, directory: Path, prefix: str) -> dict:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(directory / f"{prefix}.tokens.npy", tokens)
        np.save(directory / f"{prefix}.offsets.npy", offsets)
        return {"tokens": int(tokens.shape[0]), "max_len": int(lengths.max(initial=0))}


def _build_split(
    spec, split, directory: Path, tok, opts, fields: Fields, clean_cfg, num_classes, log
) -> dict:
    """Read, clean and tokenize one split into the directory; its manifest entry."""
    dtype = cache.token_dtype(tok.vocab_size)
    inputs_out, targets_out = _RaggedWriter(dtype), _RaggedWriter(dtype)
    labels, texts, dropped, kept = [], [], [0], 0
    records = _records(spec, split, opts, fields, num_classes)
    # Training drops examples that are empty after cleaning: they teach nothing. Validation
    # keeps every example, so scores stay comparable with other work on the same split.
    chunks = _chunks(
        records, _text_cleaner(clean_cfg), fields.seq2seq, dropped if split == "train" else None
    )
    start = last_log = time.monotonic()
    for inputs, others, input_ids, target_ids in _encoded(chunks, tok, fields.seq2seq):
        inputs_out.add(input_ids)
        if fields.seq2seq:
            targets_out.add(target_ids)
        else:
            labels.extend(others)
        if split == "validation":
            texts.extend(
                {"input": t, "target": o} if fields.seq2seq else {"input": t}
                for t, o in zip(inputs, others, strict=True)
            )
        kept += len(inputs)
        if (now := time.monotonic()) - last_log >= _LOG_EVERY_S:
            log(f"  {spec.name} {split}: {kept:,} examples ({kept / (now - start):,.0f}/s)")
            last_log = now
    if kept == 0:
        key = "train_split" if split == "train" else "eval_split"
        raise DataError(
            f"{spec.name} has no {split} examples ({dropped[0]} empty after cleaning); check "
            f"data.source and data.{key}" + ("" if spec.kind == "tfds" else "/eval_fraction")
        )
    info: dict = {"examples": kept, "dropped_empty": dropped[0]}
    info["inputs"] = inputs_out.save(directory, f"{split}.inputs")
    if fields.seq2seq:
        info["targets"] = targets_out.save(directory, f"{split}.targets")
    else:
        array = np.asarray(labels, np.int64)
        np.save(directory / f"{split}.labels.npy", array)
        values, counts = np.unique(array, return_counts=True)
        info["labels"] = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
    if split == "validation":
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
        (directory / TEXTS).write_text(lines, encoding="utf-8")
    tokens = info["inputs"]["tokens"] + info.get("targets", {}).get("tokens", 0)
    log(
        f"{spec.name} {split}: {kept:,} examples ({dropped[0]:,} empty dropped), {tokens:,} "
        f"tokens in {time.monotonic() - start:.1f}s"
    )
    return info


def build_cache(config, tok, log: Callable[[str], None] = monitor.console) -> tuple[Path, dict]:
    """(directory, manifest) of the configured task's example cache, building it if missing."""
    d = config.data
    spec = _one_source(config, readers.parse_sources(d.source))
    fields, opts = Fields.from_config(config), ReadOptions.from_config(d)
    clean_cfg = CleanConfig.from_config(d)
    directory = cache.root(config) / "examples" / cache_key(spec, opts, fields, clean_cfg, tok)
    manifest = read_manifest(directory)
    if manifest is not None:
        return directory, manifest
    if jax.process_count() > 1:
        # Every host would tokenize the whole source at once, racing on one directory.
        raise DataError(
            f"no example cache of {spec.name} for this run in a multi-process job: run this "
            f"config once with a single process to build {directory}, on a data.cache_dir "
            "every host reads"
        )
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {tok.path} has no eos piece; train one with jaxlm-data")
    log(f"tokenizing {spec.name} examples into {directory} (once; later runs read the cache)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT,
        "source": spec.name,
        "read": _read_identity(spec, opts),
        "fields": dataclasses.asdict(fields),
        "cleaning": _clean_identity(clean_cfg),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "splits": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    classes = config.model.num_classes if not fields.seq2seq else 0
    for split in SPLITS:
        manifest["splits"][split] = _build_split(
            spec, split, directory, tok, opts, fields, clean_cfg, classes, log
        )
    text = json.dumps(manifest, indent=2, sort_keys=True)
    storage.write_bytes(directory / MANIFEST, text.encode())  # last: marks the cache complete
    return directory, manifest


@dataclasses.dataclass
class Ragged:
    """Variable-length id sequences: example i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    @classmethod
    def load(cls, directory: Path, prefix: str) -> Ragged:
        # A plain ndarray view of the memory map: np.memmap's indexing is slower.
        tokens = np.asarray(np.load(directory / f"{prefix}.tokens.npy", mmap_mode="r"))
        return cls(tokens, np.load(directory / f"{prefix}.offsets.npy"))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, index: np.ndarray, width: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, segment ids) int32 [len(index), width]: each example's ids cut to width - 1,
        then EOS, then padding 0; segment id 1 on real tokens (EOS included), 0 on padding."""
        index = np.asarray(index, np.int64)
        start = self.offsets[index]
        keep = np.minimum(self.offsets[index + 1] - start, width - 1)
        col = np.arange(width, dtype=np.int64)
        real = col < keep[:, None]
        ids = np.zeros((index.shape[0], width), np.int32)
        if self.tokens.shape[0]:
            gathered = self.tokens[np.where(real, start[:, None] + col, 0)]
            np.copyto(ids, gathered, where=real, casting="unsafe")
        ids[np.arange(index.shape[0]), keep] = eos_id
        return ids, (col <= keep[:, None]).astype(np.int32)
