"""The example cache: labelled examples (example_reader.py) cleaned and tokenized once, for
the batches of examples.py.

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
from jaxlm.data import cache, example_reader, prepare, readers, storage
from jaxlm.data.clean import CleanConfig
from jaxlm.data.readers import DataError, ReadOptions, SourceSpec

FORMAT = 1
MANIFEST = "manifest.json"
TEXTS = "validation.texts.jsonl"
SPLITS = readers.SPLITS  # ("train", "validation")
_CHUNK_CHARS = 2_000_000  # examples are tokenized in chunks of about this many characters
_LOG_EVERY_S = 30.0  # seconds between progress lines while a cache is built


def cache_key(
    spec: SourceSpec, opts: ReadOptions, fields: example_reader.Fields, clean_cfg, tok
) -> str:
    """Names an example cache by everything that decides its contents."""
    what = {
        "format": FORMAT,
        "source": spec.name,
        "read": example_reader.read_identity(spec, opts),
        "fields": dataclasses.asdict(fields),
        "clean": example_reader.clean_identity(clean_cfg),
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
    spec,
    split,
    directory: Path,
    tok,
    opts,
    fields: example_reader.Fields,
    clean_cfg,
    num_classes,
    log,
) -> dict:
    """Read, clean and tokenize one split into the directory; its manifest entry."""
    dtype = cache.token_dtype(tok.vocab_size)
    inputs_out, targets_out = _RaggedWriter(dtype), _RaggedWriter(dtype)
    labels, texts, dropped, kept = [], [], [0], 0
    records = example_reader.records(spec, split, opts, fields, num_classes)
    # Training drops examples that are empty after cleaning: they teach nothing. Validation
    # keeps every example, so scores stay comparable with other work on the same split.
    chunks = _chunks(
        records,
        example_reader.text_cleaner(clean_cfg),
        fields.seq2seq,
        dropped if split == "train" else None,
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
    spec = example_reader.one_source(config, readers.parse_sources(d.source))
    fields, opts = example_reader.Fields.from_config(config), ReadOptions.from_config(d)
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
        "read": example_reader.read_identity(spec, opts),
        "fields": dataclasses.asdict(fields),
        "cleaning": example_reader.clean_identity(clean_cfg),
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
