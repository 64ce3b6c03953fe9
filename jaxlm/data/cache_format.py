"""One cache format for both pipelines: a directory (local or gs://, through jaxlm.storage) of
.npy arrays plus a JSON manifest written last, so a directory without one is incomplete and
gets rebuilt. Here: the manifest, the cache key, the chunking of texts for tokenization, the
array writers (document shards with EOS, ragged example ids) and the checks both pipelines
make before building (one process, an EOS piece). Reading needs numpy only: arrays are
memory-mapped, from a local copy when the cache is remote.

Document caches (documents/prepare.py) hold

    manifest.json              source, tokenizer hash, cleaning settings and counts, shards
    tokenizer.model            the tokenizer the shards were made with (a Hugging Face one:
                               tokenizer.json, named by the manifest's "tokenizer_file")
    train-00000.tokens.npy     uint16 (vocabularies up to 65536) or int32: documents, each + eos
    train-00000.docs.npy       int64: end offset of every document within its shard
    validation-00000.*.npy     the same for the validation split

Example caches (examples/cache.py) hold ragged id arrays per split (see there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import pathlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from jaxlm import storage
from jaxlm.data.specs import SourceSpec
from jaxlm.data.types import DataError

FORMAT = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"


def tokenizer_file(manifest: dict) -> str:
    """The tokenizer file a document cache keeps (manifests before HF tokenizers name none)."""
    return manifest.get("tokenizer_file", TOKENIZER)


CHUNK_CHARS = 2_000_000  # texts are tokenized in chunks of about this many characters
_DEFAULT_ROOT = "~/.cache/jaxlm"


def root(cache_root: str) -> str:
    """Where caches live: data.cache_dir (local or gs://), by default ~/.cache/jaxlm."""
    if storage.is_remote(cache_root):
        return cache_root.rstrip("/")  # pathlib would turn gs://B/D into gs:/B/D
    return str(pathlib.Path(cache_root or _DEFAULT_ROOT).expanduser())


def local_root(cache_root: str) -> pathlib.Path:
    """A local directory for what must be local (tokenizers, copies of remote caches): the
    cache root itself, or ~/.cache/jaxlm when that is remote."""
    local = _DEFAULT_ROOT if storage.is_remote(cache_root) else cache_root or _DEFAULT_ROOT
    return pathlib.Path(local).expanduser()


def cache_key(spec: SourceSpec, what: dict) -> str:
    """Names a cache by everything that decides its contents (`what`, plus the format and the
    source): '<source slug>-<12 hex digits>'."""
    identity = {"format": FORMAT, "source": spec.name, **what}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"{spec.slug}-{digest}"


def read_manifest(directory: str) -> dict | None:
    """The directory's manifest, or None when it has none (never written or incomplete)."""
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        manifest = json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); delete {directory} and re-run jaxlm-data prepare"
        ) from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path} has cache format {manifest.get('format')}, this jaxlm reads {FORMAT}; "
            "re-run jaxlm-data prepare"
        )
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    text = json.dumps({"format": FORMAT, **manifest}, indent=2, sort_keys=True)
    storage.write_bytes(storage.join(directory, MANIFEST), text.encode())


def local_copy(directory: str, manifest: dict, files: list[str], cache_root: str) -> pathlib.Path:
    """A local directory holding the cache's files: the directory itself, or (remote) a copy
    keyed by the manifest, so a cache rebuilt in place at the same path is copied afresh."""
    if not storage.is_remote(directory):
        return pathlib.Path(directory)
    version = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return storage.local_mirror(directory, files, local_root(cache_root), version)


def check_single_process(what: str, fix: str) -> None:
    """Refuse to build a cache in a multi-process job: every host would tokenize the whole
    source at once, racing on one directory."""
    if jax.process_count() > 1:
        raise DataError(f"no {what} for this run in a multi-process job: {fix}")


def check_eos(tok) -> None:
    """Both caches end every document or example with EOS (examples: at batch time)."""
    if tok.eos_id is None:
        raise DataError(
            f"tokenizer {tok.path} has no eos piece (named </s>, <|endoftext|>, <eos> or [SEP]); "
            "train one with jaxlm-data"
        )


def chunks(
    items: Iterable, size: Callable[[object], int], max_chars: int = CHUNK_CHARS
) -> Iterator[list]:
    """Items in lists of about max_chars characters (`size` gives an item's)."""
    chunk, total = [], 0
    for item in items:
        chunk.append(item)
        total += size(item)
        if total >= max_chars:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def overlapped(items: Iterable, fn: Callable) -> Iterator[tuple]:
    """(item, fn(item)) in order, fn running in a worker thread while the next item is read.

    SentencePiece's batch encoding releases the GIL, so reading and cleaning the next chunk
    overlaps with encoding this one.
    """
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for item in items:
            job = (item, pool.submit(fn, item))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job
        if pending is not None:
            yield pending[0], pending[1].result()


def save_array(directory: str, name: str, array: np.ndarray) -> None:
    """Write one .npy file of a cache (local or remote)."""
    buf = io.BytesIO()
    np.save(buf, array)
    storage.write_bytes(storage.join(directory, name), buf.getvalue())


def load_array(directory: pathlib.Path, name: str, mmap: bool = False) -> np.ndarray:
    """One .npy file of a local cache (copy), memory-mapped if asked: a plain ndarray view of
    the memory map (np.memmap's indexing is slower)."""
    if mmap:
        return np.asarray(np.load(directory / name, mmap_mode="r"))
    return np.load(directory / name)


def token_dtype(vocab_size: int):
    """The id dtype on disk: uint16 for vocabularies up to 65536 (half the bytes), else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


class ShardWriter:
    """Appends tokenized documents (eos added) to one split, cutting shards at document ends."""

    def __init__(self, directory: str, split: str, vocab_size: int, eos_id: int, shard_tokens: int):
        self.directory, self.split, self.eos_id = directory, split, eos_id
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._parts: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: list[list[int]]) -> int:
        """Append documents; returns the tokens added (eos included)."""
        if not ids:
            return 0
        lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
        ends = np.cumsum(lengths)
        stream = np.empty(int(ends[-1]), self.dtype)
        is_text = np.ones(stream.shape[0], bool)
        is_text[ends - 1] = False
        text_tokens = stream.shape[0] - len(ids)
        stream[is_text] = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, text_tokens)
        stream[ends - 1] = self.eos_id
        first, start = 0, 0
        while first < len(ids):  # fill shards to shard_tokens, cutting at document ends
            room = self.shard_tokens - self._buffered
            last = max(int(np.searchsorted(ends, start + room)), first)
            stop = min(last + 1, len(ids))
            self._parts.append(stream[start : ends[stop - 1]])
            self._lengths.append(lengths[first:stop])
            self._buffered += int(ends[stop - 1]) - start
            if self._buffered >= self.shard_tokens:
                self._flush()
            first, start = stop, int(ends[stop - 1])
        return stream.shape[0]

    def _flush(self) -> None:
        if not self._parts:
            return
        tokens = np.concatenate(self._parts)
        ends = np.cumsum(np.concatenate(self._lengths))
        # Rows find documents by their eos: a tokenizer that emits eos from text breaks that.
        if int(np.count_nonzero(tokens == self.eos_id)) != ends.shape[0]:
            raise DataError(
                "the tokenizer produced its eos id from plain text, so documents cannot be "
                "told apart; use a SentencePiece model whose eos is a control symbol"
            )
        name = f"{self.split}-{len(self.shards):05d}"
        for suffix, array in (("tokens", tokens), ("docs", ends)):
            save_array(self.directory, f"{name}.{suffix}.npy", array)
        self.shards.append(
            {
                "tokens": f"{name}.tokens.npy",
                "docs": f"{name}.docs.npy",
                "num_tokens": int(tokens.shape[0]),
                "num_docs": int(ends.shape[0]),
            }
        )
        self._parts, self._lengths, self._buffered = [], [], 0

    def close(self) -> dict:
        """Write the last shard; the split's manifest entry."""
        self._flush()
        return {
            "shards": self.shards,
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_docs": sum(s["num_docs"] for s in self.shards),
        }


class RaggedWriter:
    """Collects variable-length id lists into one id array plus offsets (example caches)."""

    def __init__(self, dtype) -> None:
        self.dtype, self.parts, self.lengths = dtype, [], []

    def add(self, ids: list[list[int]]) -> int:
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        total = int(lengths.sum())
        self.parts.append(np.fromiter(itertools.chain.from_iterable(ids), self.dtype, total))
        self.lengths.append(lengths)
        return total

    def save(self, directory: str, prefix: str) -> dict:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        save_array(directory, f"{prefix}.tokens.npy", tokens)
        save_array(directory, f"{prefix}.offsets.npy", offsets)
        return {"tokens": int(tokens.shape[0]), "max_len": int(lengths.max(initial=0))}


@dataclasses.dataclass
class Ragged:
    """Variable-length id sequences: item i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    @classmethod
    def load(cls, directory: pathlib.Path, prefix: str) -> Ragged:
        tokens = load_array(directory, f"{prefix}.tokens.npy", mmap=True)
        return cls(tokens, load_array(directory, f"{prefix}.offsets.npy"))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, index: np.ndarray, width: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, segment ids) int32 [len(index), width]: each item's ids cut to width - 1,
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
