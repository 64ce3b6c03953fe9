"""Looking at the input pipeline: decoded rows with their masks, and its throughput."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxlm.data import sampling
from jaxlm.data.documents import prepare, rows
from jaxlm.data.documents.text import TextData
from jaxlm.data.run_tokenizer import resolve_tokenizer
from jaxlm.data.specs import DataSpec


def _quiet(_: str) -> None:
    pass


def _compact(values: np.ndarray, limit: int) -> str:
    shown = " ".join(str(int(v)) for v in values[:limit])
    return shown + (" ..." if len(values) > limit else "")


def describe_rows(text: TextData, split: str, step: int, count: int, limit: int = 48) -> str:
    """The first `count` rows of the train batch at `step` (or of the validation set), each
    with its documents decoded and its segment ids, positions and loss mask."""
    if split == "train":
        sources, ids = text.sampler.rows_for_step(step)
        rows_of = text.train
    else:
        sources, ids = sampling.eval_rows([r.num_rows for r in text.valid], text.weights, 1, 0)
        rows_of = text.valid
    sources, ids = sources[:count], ids[:count]
    data = text.read(rows_of, sources, ids)
    batch = rows.make_batch(data, text.tok.byte_lengths)
    lines = []
    for i, (src, row) in enumerate(zip(sources, ids, strict=True)):
        seg, mask = batch["segment_ids"][i], batch["loss_mask"][i]
        where = f"{split} step {step}" if split == "train" else split
        lines.append(
            f"row {i} ({where}, {text.specs[src].name} row {row}): {int(seg.max())} document(s), "
            f"{int(mask.sum())}/{len(mask)} targets counted, {int((seg == 0).sum())} padding"
        )
        for k in range(1, int(seg.max()) + 1):
            at = np.flatnonzero(seg == k)
            decoded = text.tok.decode(batch["inputs"][i][at])
            shown = decoded if len(decoded) <= 160 else decoded[:157] + "..."
            pos = batch["positions"][i][at]
            lines.append(
                f"  segment {k}: positions {pos[0]}-{pos[-1]}, {int(mask[at].sum())} counted: "
                f"{shown!r}"
            )
        lines.append(f"  segment_ids {_compact(seg, limit)}")
        lines.append(f"  positions   {_compact(batch['positions'][i], limit)}")
        lines.append(f"  loss_mask   {_compact(mask, limit)}")
    return "\n".join(lines)


def bench(spec: DataSpec, steps: int = 500, progress: bool = True) -> dict:
    """Tokens per second from raw text (read, clean, tokenize, write, cut into batches) and
    from the cache (step-addressed random batches)."""
    d, specs = spec, spec.sources
    if spec.layout == "synthetic":
        raise ValueError("synthetic data has no text pipeline to measure; choose a text source")
    tok = resolve_tokenizer(spec, _quiet)  # trained or loaded before the clock starts
    if any(s.kind == "tfds" for s in specs):
        import tensorflow_datasets  # noqa: F401  (import time is not pipeline time)
    opts, clean_cfg = spec.read, spec.clean
    raw_tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for i, source in enumerate(s for s in specs if s.kind != "prepared"):
            out = str(Path(tmp) / str(i))
            manifest = prepare.prepare_source(
                source, out, tok, opts, clean_cfg, splits=("train",), progress=progress, log=_quiet
            )
            split = rows.TokenSplit(Path(out), manifest, "train")
            cut = rows.Rows(split, d.seq_len, d.pack)
            for start in range(0, cut.num_rows, d.batch_size):
                ids = np.arange(start, min(start + d.batch_size, cut.num_rows))
                rows.make_batch(cut.read(ids), tok.byte_lengths)
            raw_tokens += split.num_tokens
        raw_s = time.perf_counter() - t0
    text = TextData(spec, tok, _quiet)  # the real cache, built now if missing
    text.train_batch(0)  # first touch of the memory maps
    steps_iter = range(steps)
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, desc="cache", file=sys.stderr, delay=2.0, leave=False)
    t0 = time.perf_counter()
    for step in steps_iter:
        text.train_batch(step)
    cache_s = time.perf_counter() - t0
    cache_tokens = steps * d.batch_size * d.seq_len
    return {
        "raw_tokens_per_sec": round(raw_tokens / raw_s) if raw_tokens else None,
        "raw_tokens": raw_tokens,
        "raw_seconds": round(raw_s, 3),
        "cache_tokens_per_sec": round(cache_tokens / cache_s),
        "cache_steps": steps,
        "batch_size": d.batch_size,
        "seq_len": d.seq_len,
        "pack": d.pack,
    }
