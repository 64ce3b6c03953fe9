"""A mixture of document sources as the training run sees it: each source tokenized once into
its cache (prepare.py), cut into rows (rows.py), with step-addressed batches per process.

Training reads the caches with numpy random access, so TensorFlow is needed only while a cache
is being built. `train_batch(step)` returns this process's rows of the global batch at `step`,
a pure function of (seed, step, data spec).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxlm import monitor, storage
from jaxlm.data import cache_format, sampling
from jaxlm.data.documents import prepare, rows
from jaxlm.data.specs import DataSpec, SourceSpec
from jaxlm.data.types import DataError, DataSource


def ensure_cache(
    source: SourceSpec, spec: DataSpec, tok, log: Callable[[str], None] = monitor.console
) -> tuple[Path, str, dict]:
    """(local directory, directory, manifest) of the source's cache, building it if missing."""
    if source.kind == "prepared":
        directory = source.arg
        manifest = cache_format.read_manifest(directory)
        if manifest is None:
            raise DataError(
                f"prepared:{directory} has no {cache_format.MANIFEST}; run `jaxlm-data prepare "
                f"--out {directory}` first (an interrupted one leaves no manifest)"
            )
    else:
        name = prepare.cache_key(source, spec.read, spec.clean, tok)
        directory = storage.join(cache_format.root(spec.cache_root), "prepared", name)
        manifest = cache_format.read_manifest(directory)
        if manifest is None:
            cache_format.check_single_process(
                f"cache of {source.name}",
                "run `jaxlm-data prepare --config ... --out gs://BUCKET/DIR` once, then train "
                "with data.source=prepared:gs://BUCKET/DIR",
            )
            log(f"tokenizing {source.name} into {directory} (once; later runs read the cache)")
            progress = jax.process_index() == 0
            manifest = prepare.prepare_source(
                source, directory, tok, spec.read, spec.clean, progress=progress, log=log
            )
    if manifest["tokenizer_sha256"] != tok.sha256:
        raise DataError(
            f"{directory} was tokenized with tokenizer sha256 {manifest['tokenizer_sha256'][:12]} "
            f"but this run uses {tok.sha256[:12]} ({tok.path}); set data.tokenizer="
            f"{storage.join(directory, cache_format.tokenizer_file(manifest))} or prepare it "
            "again with this tokenizer"
        )
    files = rows.files_of(manifest)
    return cache_format.local_copy(directory, manifest, files, spec.cache_root), directory, manifest


class TextData:
    """A mixture of cached sources cut into rows, with step-addressed batches per process."""

    def __init__(self, spec: DataSpec, tok, log=monitor.console, row_len: int = 0) -> None:
        self.spec, self.tok, self.specs = spec, tok, list(spec.sources)
        # Rows hold row_len + 1 tokens (inputs and shifted targets); span corruption asks for
        # rows longer than data.seq_len, since corruption shortens them.
        self.row_len = row_len or spec.seq_len
        self.caches = [ensure_cache(source, spec, tok, log) for source in self.specs]
        self.train = self._rows("train")
        self.valid = self._rows("validation")
        self.weights = [s.weight for s in self.specs]
        self.sampler = sampling.StepSampler(
            [r.num_rows for r in self.train], self.weights, spec.batch_size, spec.seed
        )

    def _rows(self, split: str) -> list[rows.Rows]:
        out = []
        for source, (local, directory, manifest) in zip(self.specs, self.caches, strict=True):
            if split not in manifest["splits"]:
                raise DataError(
                    f"{directory} has no {split} split; "
                    f"re-run `jaxlm-data prepare --out {directory}`"
                )
            cut = rows.Rows(rows.TokenSplit(local, manifest, split), self.row_len, self.spec.pack)
            if cut.num_rows == 0:
                raise DataError(
                    f"{source.name} {split} split has too little text for one row; add text or "
                    "lower data.seq_len"
                )
            out.append(cut)
        return out

    def read(self, rows_of: list[rows.Rows], sources_at: np.ndarray, ids: np.ndarray) -> dict:
        """Rows of row_len + 1 tokens from the given sources (see rows.Rows.read)."""
        if len(rows_of) == 1:
            return rows_of[0].read(ids)
        width = self.row_len + 1
        out = {k: np.zeros((len(ids), width), np.int32) for k in rows.ROW_KEYS}
        for m in np.unique(sources_at):
            at = sources_at == m
            for k, v in rows_of[m].read(ids[at]).items():
                out[k][at] = v
        return out

    def train_rows(self, step: int, process_index=None, process_count=None) -> tuple:
        """(this process's rows read, their indices in the global batch) at `step`."""
        sources_at, ids = self.sampler.rows_for_step(step)
        share = sampling.process_share(len(ids), process_index, process_count)
        return self.read(self.train, sources_at[share], ids[share]), np.arange(len(ids))[share]

    def train_batch(self, step: int, process_index=None, process_count=None) -> dict:
        rows_read, _ = self.train_rows(step, process_index, process_count)
        return rows.make_batch(rows_read, self.tok.byte_lengths)

    def eval_rows(self, max_batches: int, process_index=None, process_count=None):
        """Per validation batch (in order): (this process's rows read, which are real); the
        last batch is filled up with rows that must count nothing."""
        size = self.spec.batch_size
        sources_at, ids = sampling.eval_rows(
            [r.num_rows for r in self.valid], self.weights, size, max_batches
        )
        for at, real in sampling.eval_slots(len(ids), size, process_index, process_count):
            src = np.where(real, sources_at[at], 0)
            row = np.where(real, ids[at], 0)
            yield self.read(self.valid, src, row), real

    def eval_batches(self, max_batches: int, process_index=None, process_count=None) -> list:
        """The validation rows in order, in full batches; fill rows count nothing."""
        out = []
        for rows_read, real in self.eval_rows(max_batches, process_index, process_count):
            batch = rows.make_batch(rows_read, self.tok.byte_lengths)
            for key in ("loss_mask", "target_bytes", "segment_ids"):  # fill rows are padding
                batch[key] = batch[key] * real[:, None]
            out.append(batch)
        return out

    def baselines(self) -> dict | None:
        """Compressor bits per byte over the sources' validation text, weighted by bytes."""
        parts = [
            (m.get("baselines"), m["splits"]["validation"]["num_bytes"]) for *_, m in self.caches
        ]
        if any(b is None for b, _ in parts):
            return None
        total = sum(n for _, n in parts)
        return {k: sum(b[k] * n for b, n in parts) / total for k in parts[0][0]}

    def describe(self) -> dict:
        """What the run reads, for WORKDIR/data.json."""
        out = []
        for source, (_, directory, manifest), tr, va in zip(
            self.specs, self.caches, self.train, self.valid, strict=True
        ):
            splits = {
                name: {
                    "tokens": m["num_tokens"],
                    "documents": m["num_docs"],
                    "bytes": m["num_bytes"],
                    "rows": cut.num_rows,
                    "cleaning": m["cleaning"],
                }
                for name, m, cut in (
                    ("train", manifest["splits"]["train"], tr),
                    ("validation", manifest["splits"]["validation"], va),
                )
            }
            out.append(
                {"source": source.name, "weight": source.weight, "cache": directory, **splits}
            )
        return {"tokenizer_sha256": self.tok.sha256, "sources": out}

    def source(self) -> DataSource:
        return DataSource(
            self.tok.vocab_size,
            self.train_batch,
            self.eval_batches,
            self.tok.sha256,
            self.baselines(),
            packed=self.spec.pack,
            text=self,
            mask_id=self.tok.mask_id,
            special_ids=self.tok.special_ids,
            tokenizer=self.tok,
        )


def build(spec: DataSpec, tok, log: Callable[[str], None]) -> tuple[DataSource, dict]:
    """(the DataSource of lm/mlm document rows, its describe() dict for data.json)."""
    text = TextData(spec, tok, log)
    return text.source(), text.describe()
