"""Documents to their cache (cache_format.py): read, clean, tokenize on every core, write shards.

Tokenization uses SentencePiece's own thread pool (all cores, GIL released) while this thread
reads and cleans the next chunk of documents, so both overlap. TensorFlow is imported only by
TFDS sources.
"""

from __future__ import annotations

import dataclasses
import lzma
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator

from jaxlm import storage
from jaxlm.data import cache_format, sources
from jaxlm.data.clean import Cleaner
from jaxlm.data.specs import CleanConfig, ReadOptions, SourceSpec
from jaxlm.data.tokenizer import RUN_FILES, TokenizerAPI
from jaxlm.data.types import SPLITS, DataError

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 tokens per shard
_BASELINE_BYTES = 1 << 21  # zlib/xz baselines use at most this much validation text


def cache_key(
    spec: SourceSpec, opts: ReadOptions, clean_cfg: CleanConfig, tok: TokenizerAPI
) -> str:
    """Names a document cache by everything that decides its contents (seq_len does not: rows
    are cut at read time)."""
    what = {
        "read": sources.identity(spec, opts),
        "clean": dataclasses.asdict(clean_cfg),
        "tokenizer": tok.sha256,
    }
    return cache_format.cache_key(spec, what)


def cleaned(
    spec: SourceSpec, split: str, opts: ReadOptions, clean_cfg: CleanConfig
) -> tuple[Iterator[str], Cleaner]:
    """The split's documents after cleaning, and the cleaner holding the counts."""
    cleaner = Cleaner(clean_cfg)
    docs = (t for t in map(cleaner, sources.documents(spec, split, opts)) if t is not None)
    return docs, cleaner


def sample_texts(
    specs: list[SourceSpec], opts: ReadOptions, clean_cfg: CleanConfig, max_chars: int
) -> Iterator[str]:
    """Cleaned training documents for tokenizer training, each source by its weight."""
    total = sum(s.weight for s in specs)
    for spec in specs:
        budget = max_chars * spec.weight / total
        docs, _ = cleaned(spec, "train", opts, clean_cfg)
        for text in docs:
            yield text
            budget -= len(text)
            if budget <= 0:
                break


def tokenized(
    texts: Iterable[str], tok: TokenizerAPI
) -> Iterator[tuple[list[str], list[list[int]]]]:
    """(texts, ids) chunk by chunk; the next chunk is read while this one is encoded."""
    return cache_format.overlapped(cache_format.chunks(texts, len), tok.encode_batch)


class _Progress:
    """Documents and tokens on stderr, shown only once a run has taken a few seconds."""

    def __init__(self, enabled: bool, label: str) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc=label, unit=" docs", file=sys.stderr, delay=2.0, leave=False)
        self.tokens = 0

    def update(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(docs)
            self._bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def prepare_source(
    spec: SourceSpec,
    out_dir: str,
    tok: TokenizerAPI,
    opts: ReadOptions,
    clean_cfg: CleanConfig,
    *,
    splits: tuple[str, ...] = SPLITS,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize the source's splits into a cache directory; returns its manifest."""
    cache_format.check_eos(tok)
    manifest = {
        "source": spec.name,
        "read": sources.identity(spec, opts),
        "cleaning": dataclasses.asdict(clean_cfg),
        "tokenizer_sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        # Only a Hugging Face tokenizer is named: SentencePiece manifests stay as they were.
        **({} if tok.filename == cache_format.TOKENIZER else {"tokenizer_file": tok.filename}),
        "splits": {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # A rebuild in place first drops the old manifest: a crash midway then leaves a directory
    # that reads as unprepared, never an old manifest over a mix of old and new shards.
    storage.remove(storage.join(out_dir, cache_format.MANIFEST))
    for name in RUN_FILES:  # a rebuild with the other kind of tokenizer leaves one file
        storage.remove(storage.join(out_dir, name))
    storage.write_bytes(storage.join(out_dir, tok.filename), tok.to_bytes())
    for split in splits:
        docs, cleaner = cleaned(spec, split, opts, clean_cfg)
        writer = cache_format.ShardWriter(out_dir, split, tok.vocab_size, tok.eos_id, shard_tokens)
        bar = _Progress(progress, f"{spec.name} {split}")
        num_bytes, sample, sample_bytes = 0, [], 0
        try:
            for texts, ids in tokenized(docs, tok):
                bar.update(len(texts), writer.add(ids))
                for text in texts:
                    size = len(text.encode("utf-8"))
                    num_bytes += size
                    if split == "validation" and sample_bytes < _BASELINE_BYTES:
                        sample.append(text)
                        sample_bytes += size
        finally:
            bar.close()
        info = {**writer.close(), "num_bytes": num_bytes, "cleaning": dict(cleaner.counts)}
        log(f"{spec.name} {split}: {cleaner.summary()}; {info['num_tokens']:,} tokens")
        if info["num_docs"] == 0:
            raise DataError(
                f"{spec.name} has no {split} documents after cleaning ({cleaner.summary()}); "
                f"check the source, data.eval_fraction and data.min_doc_chars / max_doc_chars"
            )
        manifest["splits"][split] = info
        if sample:
            manifest["baselines"] = compression_bits_per_byte(sample)
    cache_format.write_manifest(out_dir, manifest)
    return {"format": cache_format.FORMAT, **manifest}


def compression_bits_per_byte(texts: list[str]) -> dict[str, float]:
    """Bits per byte of zlib -9 and xz -9 on the texts joined with "\\n", as UTF-8."""
    data = "\n".join(texts).encode("utf-8")
    if not data:
        raise ValueError("compression_bits_per_byte needs non-empty text")
    return {
        "zlib-9": 8.0 * len(zlib.compress(data, 9)) / len(data),
        "xz-9": 8.0 * len(lzma.compress(data, preset=9)) / len(data),
    }
