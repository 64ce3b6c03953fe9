"""Which tokenizer a run uses, and training one when none is given.

In order: data.tokenizer; the tokenizer of the run train.init_from names (fine-tuning keeps its
vocabulary); the one stored with a prepared cache; else one trained once on a sample of the
sources and kept under the cache root, keyed by everything that shapes it. A run copies its
tokenizer into the workdir, and a resumed run checks it still matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jax

from jaxlm import monitor, storage
from jaxlm.config import EXAMPLE_OBJECTIVES
from jaxlm.data import cache, prepare, tokenizer
from jaxlm.data.clean import CleanConfig
from jaxlm.data.readers import DataError, ReadOptions, SourceSpec


def _local(path: str, config) -> Path:
    """A local path for a possibly remote file (remote ones are copied to the cache once)."""
    if not storage.is_remote(path):
        return Path(path).expanduser()
    parent, _, name = path.rstrip("/").rpartition("/")
    return storage.local_mirror(parent, [name], cache.root(config)) / name


def tokenizer_key(config, specs: list[SourceSpec]) -> str:
    """Names an automatically trained tokenizer by everything that shapes it."""
    d, opts = config.data, ReadOptions.from_config(config.data)
    what = {
        "sources": [[s.name, s.weight, opts.identity(s)] for s in specs],
        "clean": dataclasses.asdict(CleanConfig.from_config(d)),
        "options": [d.tokenizer_byte_fallback, d.tokenizer_mask, d.tokenizer_sentinels],
        "sample_chars": d.tokenizer_sample_chars,
    }
    if config.task.objective in EXAMPLE_OBJECTIVES:  # trained on the examples' fields
        what["fields"] = [config.task.objective, d.input_key, d.target_key, d.label_key]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{'+'.join(s.slug for s in specs)[:48]}-{digest}"


def train_tokenizer(config, specs: list[SourceSpec], out_path: str | Path):
    """Train the configured SentencePiece model on a sample of the configured sources."""
    d = config.data
    if config.task.objective in EXAMPLE_OBJECTIVES:
        from jaxlm.data import example_reader  # TensorFlow only for TFDS examples

        texts = _first_chars(example_reader.example_texts(config, specs), d.tokenizer_sample_chars)
    else:
        texts = prepare.sample_texts(
            specs, ReadOptions.from_config(d), CleanConfig.from_config(d), d.tokenizer_sample_chars
        )
    return tokenizer.train_tokenizer(
        texts,
        out_path,
        d.tokenizer_vocab_size,
        d.tokenizer_type,
        d.tokenizer_sample_chars,
        byte_fallback=d.tokenizer_byte_fallback,
        mask=d.tokenizer_mask,
        sentinels=d.tokenizer_sentinels,
    )


def _first_chars(texts, max_chars: int) -> list[str]:
    """Texts in order until max_chars characters are taken."""
    out, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def init_from_tokenizer(config) -> Path | None:
    """The tokenizer of the run train.init_from names (fine-tuning keeps its vocabulary)."""
    if not config.train.init_from:
        return None
    from jaxlm import finetune  # imports the trainer, which imports this module

    path = storage.join(finetune.parse_init_from(config.train.init_from)[0], "tokenizer.model")
    if not storage.exists(path):
        raise DataError(
            f"train.init_from: {path} not found; point it at a jaxlm-train run directory "
            "(one trained on text, with its tokenizer.model)"
        )
    return _local(path, config)


def resolve_tokenizer(
    config, specs: list[SourceSpec], log: Callable[[str], None] = monitor.console
):
    """data.tokenizer, else the train.init_from run's, else the one stored with prepared
    caches, else one trained on a sample of the sources (kept under the cache root's
    tokenizers/ and reused)."""
    d = config.data
    if d.tokenizer:
        return tokenizer.Tokenizer(_local(d.tokenizer, config))
    if (pretrained := init_from_tokenizer(config)) is not None:
        return tokenizer.Tokenizer(pretrained)
    prepared = [s for s in specs if s.kind == "prepared"]
    if prepared:
        return tokenizer.Tokenizer(_local(storage.join(prepared[0].arg, cache.TOKENIZER), config))
    path = tokenizer.tokenizer_cache_path(
        cache.root(config), tokenizer_key(config, specs), d.tokenizer_type, d.tokenizer_vocab_size
    )
    if path.is_file():
        return tokenizer.Tokenizer(path)
    if jax.process_count() > 1:  # every host would train its own, possibly different one
        raise DataError(
            "no tokenizer for a multi-process job: train one with `jaxlm-data tokenizer --config "
            "... --out PATH` and set data.tokenizer=PATH (or use data.source=prepared:DIR)"
        )
    log(f"training a {d.tokenizer_vocab_size}-piece {d.tokenizer_type} tokenizer (once)")
    return train_tokenizer(config, specs, path)


def load_tokenizer(config, workdir: Path, specs: list[SourceSpec], log=monitor.console):
    """The run's tokenizer: WORKDIR/tokenizer.model on resume (it must match data.tokenizer
    when that is set), else `resolve_tokenizer`, copied into the workdir."""
    local = workdir / "tokenizer.model"
    if local.is_file():
        tok = tokenizer.Tokenizer(local)
        if config.data.tokenizer:
            wanted = tokenizer.Tokenizer(_local(config.data.tokenizer, config))
            if wanted.sha256 != tok.sha256:
                raise DataError(
                    f"{local} (sha256 {tok.sha256[:12]}) is not data.tokenizer "
                    f"{config.data.tokenizer} (sha256 {wanted.sha256[:12]}): this run was "
                    "trained with another tokenizer; use a new --workdir"
                )
        return tok
    tok = resolve_tokenizer(config, specs, log)
    storage.write_bytes(local, tok.path.read_bytes())
    return tokenizer.Tokenizer(local)
