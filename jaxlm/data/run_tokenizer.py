"""Which tokenizer a run uses, and training one when none is given.

In order: data.tokenizer; the tokenizer of the run train.init_from names (fine-tuning keeps its
vocabulary; config.data_spec resolves its path); the one stored with a prepared cache; else
one trained once on a sample of the sources and kept under the cache root, keyed by everything
that shapes it. A run copies its tokenizer into the workdir, and a resumed run checks it still
matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jax

from jaxlm import monitor, storage
from jaxlm.data import cache_format, sources, tokenizer
from jaxlm.data.documents import prepare
from jaxlm.data.examples.cache import example_texts
from jaxlm.data.specs import DataSpec
from jaxlm.data.types import DataError


def _local(path: str, spec: DataSpec) -> Path:
    """A local path for a possibly remote file (remote ones are copied to the cache once)."""
    if not storage.is_remote(path):
        return Path(path).expanduser()
    parent, _, name = path.rstrip("/").rpartition("/")
    return storage.local_mirror(parent, [name], cache_format.local_root(spec.cache_root)) / name


def tokenizer_key(spec: DataSpec) -> str:
    """Names an automatically trained tokenizer by everything that shapes it."""
    t, opts = spec.tokenizer, spec.read
    what = {
        "sources": [[s.name, s.weight, sources.identity(s, opts)] for s in spec.sources],
        "clean": dataclasses.asdict(spec.clean),
        "options": t.options(),
        "sample_chars": t.sample_chars,
    }
    if spec.fields is not None:  # trained on the examples' fields
        f = spec.fields
        what["fields"] = [f.objective, f.input, f.target, f.label]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{'+'.join(s.slug for s in spec.sources)[:48]}-{digest}"


def train_tokenizer(spec: DataSpec, out_path: str | Path):
    """Train the configured SentencePiece model on a sample of the configured sources."""
    t = spec.tokenizer
    if spec.fields is not None:
        texts = _first_chars(example_texts(spec), t.sample_chars)
    else:
        texts = prepare.sample_texts(list(spec.sources), spec.read, spec.clean, t.sample_chars)
    return tokenizer.train_tokenizer(
        texts,
        out_path,
        t.vocab_size,
        t.model_type,
        t.sample_chars,
        byte_fallback=t.byte_fallback,
        mask=t.mask,
        sentinels=t.sentinels,
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


def resolve_tokenizer(spec: DataSpec, log: Callable[[str], None] = monitor.console):
    """data.tokenizer, else the train.init_from run's, else the one stored with prepared
    caches, else one trained on a sample of the sources (kept under the cache root's
    tokenizers/ and reused)."""
    t = spec.tokenizer
    if t.path:
        return tokenizer.load(_local(t.path, spec))
    if t.init_from:
        # config names the run's tokenizer.model; a run with a Hugging Face one has tokenizer.json.
        path = stored_tokenizer(t.init_from.rstrip("/").rpartition("/")[0] or ".")
        if not storage.exists(path):
            raise DataError(
                f"train.init_from: {t.init_from} not found; point it at a jaxlm-train run "
                "directory (one trained on text, with its tokenizer.model or tokenizer.json)"
            )
        return tokenizer.load(_local(path, spec))
    prepared = [s for s in spec.sources if s.kind == "prepared"]
    if prepared:
        return tokenizer.load(_local(stored_tokenizer(prepared[0].arg), spec))
    path = tokenizer.tokenizer_cache_path(
        cache_format.local_root(spec.cache_root), tokenizer_key(spec), t.model_type, t.vocab_size
    )
    if path.is_file():
        return tokenizer.load(path)
    if jax.process_count() > 1:  # every host would train its own, possibly different one
        raise DataError(
            "no tokenizer for a multi-process job: train one with `jaxlm-data tokenizer --config "
            "... --out PATH` and set data.tokenizer=PATH (or use data.source=prepared:DIR)"
        )
    log(f"training a {t.vocab_size}-piece {t.model_type} tokenizer (once)")
    return train_tokenizer(spec, path)


def stored_tokenizer(directory: str) -> str:
    """The tokenizer file of a run directory or prepared cache (local or remote):
    tokenizer.json when there is one (a Hugging Face tokenizer), else tokenizer.model."""
    sp_file, hf_file = (storage.join(directory, name) for name in tokenizer.RUN_FILES)
    return hf_file if storage.exists(hf_file) else sp_file


def load_tokenizer(spec: DataSpec, workdir: Path, log=monitor.console):
    """The run's tokenizer: WORKDIR/tokenizer.model (or tokenizer.json, a Hugging Face one) on
    resume (it must match data.tokenizer when that is set), else `resolve_tokenizer`, copied
    into the workdir."""
    local = tokenizer.run_file(workdir)
    if local is not None:
        tok = tokenizer.load(local)
        if spec.tokenizer.path:
            wanted = tokenizer.load(_local(spec.tokenizer.path, spec))
            if wanted.sha256 != tok.sha256:
                raise DataError(
                    f"{local} (sha256 {tok.sha256[:12]}) is not data.tokenizer "
                    f"{spec.tokenizer.path} (sha256 {wanted.sha256[:12]}): this run was "
                    "trained with another tokenizer; use a new --workdir"
                )
        return tok
    tok = resolve_tokenizer(spec, log)
    local = workdir / tok.filename
    storage.write_bytes(local, tok.to_bytes())
    return tokenizer.load(local)
