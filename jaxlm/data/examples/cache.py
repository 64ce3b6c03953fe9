"""The example cache: labelled examples (read.py) cleaned and tokenized once, for the batches
of source.py, in the one cache format (cache_format.py: local or gs://).

`build_cache(spec, tok)` reads one `tfds:NAME` or `jsonl:GLOB` source whose examples hold
data.input_key and data.target_key (seq2seq) or data.label_key (classify) and writes their ids.

Cleaning applies the configured normalization and control/whitespace stripping to every text
but never drops a validation example (a benchmark's example count must not change): the
document filters data.min_doc_chars, data.max_doc_chars and data.dedup do not apply. A
training example whose input (or seq2seq target) is empty after cleaning is dropped and
counted in the manifest. Examples of JSONL files without `{split}` in the glob go to
validation when a hash of their raw input falls in data.eval_fraction, so equal inputs always
share a split.

The cache, `<data.cache_dir>/examples/<slug>-<hash>/`, is keyed by the source, the read
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

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from jaxlm import monitor, storage
from jaxlm.data import cache_format, sources
from jaxlm.data.examples.read import clean_identity, text_cleaner
from jaxlm.data.specs import DataSpec, ExampleFields, ReadOptions, SourceSpec
from jaxlm.data.types import SPLITS, DataError

TEXTS = "validation.texts.jsonl"
_LOG_EVERY_S = 30.0  # seconds between progress lines while a cache is built


def one_source(spec: DataSpec) -> SourceSpec:
    """The one tfds:NAME or jsonl:GLOB source an example task reads."""
    objective = spec.objective
    if len(spec.sources) != 1:
        names = ", ".join(s.name for s in spec.sources)
        raise DataError(
            f"task.objective={objective} reads one source of examples, not a mixture of "
            f"{len(spec.sources)} ({names}); set data.source to a single tfds:NAME or jsonl:GLOB"
        )
    source = spec.sources[0]
    if source.kind not in sources.EXAMPLE_KINDS:
        raise DataError(
            f"task.objective={objective} reads labelled examples from tfds:NAME or jsonl:GLOB, "
            f"not {source.name}; point data.source at one of those"
        )
    return source


def records(
    source: SourceSpec, split: str, opts: ReadOptions, fields: ExampleFields, num_classes=0
) -> Iterator[tuple[str, str | int]]:
    """(raw input text, raw target text or int label) of the split's examples, in order."""
    return sources.KINDS[source.kind].examples(source.arg, split, opts, fields, num_classes)


def read_identity(source: SourceSpec, opts: ReadOptions) -> dict:
    out = sources.identity(source, opts)
    out.pop("text_key", None)  # examples are read by data.input_key and friends
    return out


def cache_key(source: SourceSpec, opts: ReadOptions, fields: ExampleFields, clean_cfg, tok) -> str:
    """Names an example cache by everything that decides its contents."""
    what = {
        "read": read_identity(source, opts),
        "fields": fields.identity(),
        "clean": clean_identity(clean_cfg),
        "tokenizer": tok.sha256,
    }
    return cache_format.cache_key(source, what)


def files_of(manifest: dict) -> list[str]:
    """Every file an example cache's manifest refers to."""
    seq2seq = manifest["fields"]["objective"] == "seq2seq"
    parts = ("inputs", "targets") if seq2seq else ("inputs",)
    names = [TEXTS]
    for split in manifest["splits"]:
        names += [f"{split}.{p}.{a}.npy" for p in parts for a in ("tokens", "offsets")]
        names += [] if seq2seq else [f"{split}.labels.npy"]
    return names


def example_texts(spec: DataSpec) -> Iterator[str]:
    """Cleaned input and target texts of the train split, example by example (non-empty only):
    what a tokenizer for the task is trained on when data.tokenizer is empty."""
    source, fields = one_source(spec), spec.fields
    clean = text_cleaner(spec.clean)
    for text, other in records(source, "train", spec.read, fields):
        for t in (text, other) if fields.seq2seq else (text,):
            if t := clean(t):
                yield t


def _chunks(
    records_in: Iterable[tuple[str, str | int]],
    clean: Callable[[str], str],
    seq2seq: bool,
    dropped: list[int] | None = None,
) -> Iterator[tuple[list[str], list]]:
    """Cleaned (inputs, targets or labels) in chunks of about CHUNK_CHARS characters. With
    `dropped` (a one-item counter), examples with an empty input or target are left out."""

    def kept() -> Iterator[tuple[str, str | int]]:
        for text, other in records_in:
            text = clean(text)
            if seq2seq:
                other = clean(other)
            if dropped is not None and not (text and (other or not seq2seq)):
                dropped[0] += 1
                continue
            yield text, other

    def size(pair: tuple) -> int:
        return len(pair[0]) + (len(pair[1]) if seq2seq else 0)

    for chunk in cache_format.chunks(kept(), size):
        yield [t for t, _ in chunk], [o for _, o in chunk]


def _encoded(chunks: Iterable[tuple[list[str], list]], tok, seq2seq: bool) -> Iterator[tuple]:
    """(inputs, others, input ids, target ids or None) per chunk, encoded in a worker thread
    while the next chunk is read and cleaned (cache_format.overlapped)."""

    def encode(chunk: tuple[list[str], list]) -> tuple:
        inputs, others = chunk
        return tok.encode_batch(inputs), tok.encode_batch(others) if seq2seq else None

    for chunk, ids in cache_format.overlapped(chunks, encode):
        yield *chunk, *ids


def _build_split(source: SourceSpec, split: str, directory: str, tok, spec: DataSpec, log) -> dict:
    """Read, clean and tokenize one split into the directory; its manifest entry."""
    fields = spec.fields
    dtype = cache_format.token_dtype(tok.vocab_size)
    inputs_out, targets_out = cache_format.RaggedWriter(dtype), cache_format.RaggedWriter(dtype)
    labels, texts, dropped, kept = [], [], [0], 0
    classes = spec.num_classes if not fields.seq2seq else 0
    read = records(source, split, spec.read, fields, classes)
    # Training drops examples that are empty after cleaning: they teach nothing. Validation
    # keeps every example, so scores stay comparable with other work on the same split.
    chunks = _chunks(
        read, text_cleaner(spec.clean), fields.seq2seq, dropped if split == "train" else None
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
            log(f"  {source.name} {split}: {kept:,} examples ({kept / (now - start):,.0f}/s)")
            last_log = now
    if kept == 0:
        key = "train_split" if split == "train" else "eval_split"
        raise DataError(
            f"{source.name} has no {split} examples ({dropped[0]} empty after cleaning); check "
            f"data.source and data.{key}" + ("" if source.kind == "tfds" else "/eval_fraction")
        )
    info: dict = {"examples": kept, "dropped_empty": dropped[0]}
    info["inputs"] = inputs_out.save(directory, f"{split}.inputs")
    if fields.seq2seq:
        info["targets"] = targets_out.save(directory, f"{split}.targets")
    else:
        array = np.asarray(labels, np.int64)
        cache_format.save_array(directory, f"{split}.labels.npy", array)
        values, counts = np.unique(array, return_counts=True)
        info["labels"] = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
    if split == "validation":
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
        storage.write_bytes(storage.join(directory, TEXTS), lines.encode("utf-8"))
    tokens = info["inputs"]["tokens"] + info.get("targets", {}).get("tokens", 0)
    log(
        f"{source.name} {split}: {kept:,} examples ({dropped[0]:,} empty dropped), {tokens:,} "
        f"tokens in {time.monotonic() - start:.1f}s"
    )
    return info


def build_cache(
    spec: DataSpec, tok, log: Callable[[str], None] = monitor.console
) -> tuple[Path, str, dict]:
    """(local directory, directory, manifest) of the task's example cache, building it if
    missing; a cache under a gs:// data.cache_dir is read from a local copy."""
    source = one_source(spec)
    name = cache_key(source, spec.read, spec.fields, spec.clean, tok)
    directory = storage.join(cache_format.root(spec.cache_root), "examples", name)
    manifest = cache_format.read_manifest(directory)
    if manifest is None:
        cache_format.check_single_process(
            f"example cache of {source.name}",
            f"run this config once with a single process to build {directory}, on a "
            "data.cache_dir every host reads",
        )
        cache_format.check_eos(tok)
        log(f"tokenizing {source.name} examples into {directory} (once; later runs read it)")
        manifest = _build(source, directory, tok, spec, log)
    local = cache_format.local_copy(directory, manifest, files_of(manifest), spec.cache_root)
    return local, directory, manifest


def _build(source: SourceSpec, directory: str, tok, spec: DataSpec, log) -> dict:
    # A rebuild in place first drops the old manifest: a crash midway then leaves a directory
    # that reads as unbuilt, never an old manifest over a mix of old and new arrays.
    storage.remove(storage.join(directory, cache_format.MANIFEST))
    manifest = {
        "source": source.name,
        "read": read_identity(source, spec.read),
        "fields": spec.fields.identity(),
        "cleaning": clean_identity(spec.clean),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "splits": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for split in SPLITS:
        manifest["splits"][split] = _build_split(source, split, directory, tok, spec, log)
    cache_format.write_manifest(directory, manifest)  # last: marks the cache complete
    return {"format": cache_format.FORMAT, **manifest}
