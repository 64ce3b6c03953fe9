"""The training run's view of data: batches addressed by step, for any process, and eval batches.

`make_source(config, workdir)` is the one entry point the trainer uses. Every text source is
tokenized once into the pre-tokenized cache (jaxlm/data/cache.py) and training reads that cache
with numpy random access, so TensorFlow is needed only while a cache is being built. Batches
are numpy dicts (LM: the keys of `pipeline.BATCH_KEYS`; other objectives: their own);
`train_batch(step)` returns this process's rows of the global batch at `step`, a pure function
of (seed, step, data config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from jaxlm import monitor
from jaxlm.config import EXAMPLE_OBJECTIVES
from jaxlm.data import cache, pipeline, prepare, readers, spans, storage
from jaxlm.data.clean import CleanConfig
from jaxlm.data.readers import DataError, ReadOptions, SourceSpec
from jaxlm.data.run_tokenizer import load_tokenizer


@dataclasses.dataclass
class DataSource:
    vocab_size: int
    # (step, process_index=None, process_count=None) -> that process's rows of the global batch
    # at `step` (None: this process, from jax).
    train_batch: Callable[..., dict]
    # (max_batches (0: all), process_index=None, process_count=None) -> fixed validation
    # batches, that process's rows of each.
    eval_batches: Callable[..., list[dict]]
    tokenizer_sha256: str | None = None
    baselines: dict | None = None  # compressor bits per byte on the validation text
    packed: bool = True  # rows hold several documents: the model needs segment ids
    text: TextData | None = None  # the caches behind the batches (None for synthetic data)
    mask_id: int | None = None  # the <mask> piece (masked LM); None: the tokenizer has none
    special_ids: tuple[int, ...] = ()  # ids masking and random replacement never touch
    tokenizer: object | None = None  # the run's Tokenizer (None for synthetic data)
    # Example tasks (seq2seq, classify): (max_examples (0: all)) -> validation examples in
    # order, each {"input_ids": np.ndarray, "input": str, "reference": str or "label": int}.
    eval_examples: Callable[[int], list[dict]] | None = None
    sentinel_ids: tuple[int, ...] = ()  # <extra_id_0>, <extra_id_1>, ... (span corruption)
    # What the run reads (tokenizer hash, caches, counts); training writes it to data.json.
    description: dict | None = None


def make_source(
    config, workdir: str | Path, log: Callable[[str], None] = monitor.console
) -> DataSource:
    specs = readers.parse_sources(config.data.source)
    if specs[0].kind == "synthetic":
        from jaxlm.data import synthetic  # builds on DataSource, defined here

        return synthetic.make_source(config)
    workdir = Path(workdir)
    objective = config.task.objective
    tok = load_tokenizer(config, workdir, specs, log)
    if objective in EXAMPLE_OBJECTIVES:
        from jaxlm.data import examples  # TFDS/JSONL examples, not documents

        data, described = examples.make_example_source(config, tok, log)
    elif objective == "span_corruption":
        t = config.task
        raw = spans.raw_length(
            config.data.seq_len, config.data.target_len, t.noise_density, t.mean_span_length
        )
        text = TextData(config, tok, specs, log, row_len=raw - 1)
        data, described = _span_corruption(config, text, raw), text.describe()
    else:
        text = TextData(config, tok, specs, log)
        data, described = text.source(), text.describe()
    # Not written here: the eval program builds sources too, maybe over other data.
    return dataclasses.replace(data, description=described)


def _span_corruption(config, text: TextData, raw_len: int) -> DataSource:
    """T5 span-corruption batches from the document rows (jaxlm/data/spans.py)."""
    tok, t, d, seed = text.tok, config.task, config.data, config.train.seed
    sentinel_ids = sentinels_of(tok)
    spans.check_sentinels(raw_len, t.noise_density, t.mean_span_length, len(sentinel_ids))

    def corrupt(rows_read, seeds):
        return spans.corrupt_rows(
            rows_read["tokens"][:, :raw_len],
            rows_read["segment_ids"][:, :raw_len],
            seeds,
            sentinel_ids=sentinel_ids,
            eos_id=tok.eos_id,
            seq_len=d.seq_len,
            target_len=d.target_len,
            noise_density=t.noise_density,
            mean_span=t.mean_span_length,
        )

    def train_batch(step: int, process_index=None, process_count=None) -> dict:
        rows_read, index = text.train_rows(step, process_index, process_count)
        return corrupt(rows_read, [(seed, step, int(i)) for i in index])

    def eval_batches(max_batches: int, process_index=None, process_count=None) -> list[dict]:
        out = []
        # Seeded by the batch and the row's place in it: each process corrupts its own rows.
        first = pipeline.process_share(d.batch_size, process_index, process_count)
        for b, (rows_read, real) in enumerate(
            text.eval_rows(max_batches, process_index, process_count)
        ):
            seeds = [(seed, spans.EVAL_SALT, b, first.start + i) for i in range(len(real))]
            batch = corrupt(rows_read, seeds)
            batch["loss_mask"] = batch["loss_mask"] * real[:, None]
            out.append(batch)
        return out

    return DataSource(
        tok.vocab_size,
        train_batch,
        eval_batches,
        tok.sha256,
        packed=False,
        text=text,
        special_ids=tok.special_ids,
        tokenizer=tok,
        sentinel_ids=sentinel_ids,
    )


def sentinels_of(tok) -> tuple[int, ...]:
    """The tokenizer's <extra_id_0>, <extra_id_1>, ... ids, in order."""
    out = []
    while (i := tok.sentinel_id(len(out))) is not None:
        out.append(i)
    if not out:
        raise DataError(
            f"tokenizer {tok.path} has no <extra_id_N> pieces for span corruption; set "
            "data.tokenizer_sentinels=100 to train one that has them"
        )
    return tuple(out)


# --- caches and batches ---------------------------------------------------------------------


def ensure_cache(spec: SourceSpec, config, tok, log=monitor.console) -> tuple[Path, str, dict]:
    """(local directory, directory, manifest) of the source's cache, building it if missing."""
    d = config.data
    if spec.kind == "prepared":
        directory = spec.arg
        manifest = cache.read_manifest(directory)
        if manifest is None:
            raise DataError(
                f"prepared:{directory} has no {cache.MANIFEST}; run `jaxlm-data prepare --out "
                f"{directory}` first (an interrupted one leaves no manifest)"
            )
    else:
        opts, clean_cfg = ReadOptions.from_config(d), CleanConfig.from_config(d)
        name = prepare.cache_key(spec, opts, clean_cfg, tok)
        directory = str(cache.root(config) / "prepared" / name)
        manifest = cache.read_manifest(directory)
        if manifest is None:
            if jax.process_count() > 1:
                # Every host would tokenize the whole source at once, racing on one directory.
                raise DataError(
                    f"no cache of {spec.name} for this run in a multi-process job: run "
                    "`jaxlm-data prepare --config ... --out gs://BUCKET/DIR` once, then train "
                    "with data.source=prepared:gs://BUCKET/DIR"
                )
            log(f"tokenizing {spec.name} into {directory} (once; later runs read the cache)")
            progress = jax.process_index() == 0
            manifest = prepare.prepare_source(
                spec, directory, tok, opts, clean_cfg, progress=progress, log=log
            )
    if manifest["tokenizer_sha256"] != tok.sha256:
        raise DataError(
            f"{directory} was tokenized with tokenizer sha256 {manifest['tokenizer_sha256'][:12]} "
            f"but this run uses {tok.sha256[:12]} ({tok.path}); set data.tokenizer="
            f"{storage.join(directory, cache.TOKENIZER)} or prepare it again with this tokenizer"
        )
    if storage.is_remote(directory):
        version = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        files = cache.files_of(manifest)
        return (
            storage.local_mirror(directory, files, cache.root(config), version),
            directory,
            manifest,
        )
    return Path(directory), directory, manifest


class TextData:
    """A mixture of cached sources cut into rows, with step-addressed batches per process."""

    def __init__(
        self, config, tok, specs: list[SourceSpec], log=monitor.console, row_len: int = 0
    ) -> None:
        d = config.data
        self.config, self.tok, self.specs = config, tok, specs
        # Rows hold row_len + 1 tokens (inputs and shifted targets); span corruption asks for
        # rows longer than data.seq_len, since corruption shortens them.
        self.row_len = row_len or d.seq_len
        self.caches = [ensure_cache(spec, config, tok, log) for spec in specs]
        self.train = self._rows("train")
        self.valid = self._rows("validation")
        self.weights = [s.weight for s in specs]
        self.sampler = pipeline.StepSampler(
            [r.num_rows for r in self.train], self.weights, d.batch_size, config.train.seed
        )

    def _rows(self, split: str) -> list[cache.Rows]:
        d, out = self.config.data, []
        for spec, (local, directory, manifest) in zip(self.specs, self.caches, strict=True):
            if split not in manifest["splits"]:
                raise DataError(
                    f"{directory} has no {split} split; "
                    f"re-run `jaxlm-data prepare --out {directory}`"
                )
            rows = cache.Rows(cache.TokenSplit(local, manifest, split), self.row_len, d.pack)
            if rows.num_rows == 0:
                raise DataError(
                    f"{spec.name} {split} split has too little text for one row; add text or "
                    "lower data.seq_len"
                )
            out.append(rows)
        return out

    def read(self, rows_of: list[cache.Rows], sources: np.ndarray, rows: np.ndarray) -> dict:
        """Rows of row_len + 1 tokens from the given sources (see cache.Rows.read)."""
        if len(rows_of) == 1:
            return rows_of[0].read(rows)
        width = self.row_len + 1
        out = {k: np.zeros((len(rows), width), np.int32) for k in cache.ROW_KEYS}
        for m in np.unique(sources):
            at = sources == m
            for k, v in rows_of[m].read(rows[at]).items():
                out[k][at] = v
        return out

    def train_rows(self, step: int, process_index=None, process_count=None) -> tuple:
        """(this process's rows read, their indices in the global batch) at `step`."""
        sources, rows = self.sampler.rows_for_step(step)
        share = pipeline.process_share(len(rows), process_index, process_count)
        return self.read(self.train, sources[share], rows[share]), np.arange(len(rows))[share]

    def train_batch(self, step: int, process_index=None, process_count=None) -> dict:
        rows_read, _ = self.train_rows(step, process_index, process_count)
        return pipeline.make_batch(rows_read, self.tok.byte_lengths)

    def eval_rows(self, max_batches: int, process_index=None, process_count=None):
        """Per validation batch (in order): (this process's rows read, which are real); the
        last batch is filled up with repeated rows that must count nothing."""
        size = self.config.data.batch_size
        sources, rows = pipeline.eval_rows(
            [r.num_rows for r in self.valid], self.weights, size, max_batches
        )
        share = pipeline.process_share(size, process_index, process_count)
        for start in range(0, len(rows), size):
            real = np.arange(start, start + size) < len(rows)
            src = np.where(real, np.resize(sources[start : start + size], size), 0)[share]
            row = np.where(real, np.resize(rows[start : start + size], size), 0)[share]
            yield self.read(self.valid, src, row), real[share]

    def eval_batches(self, max_batches: int, process_index=None, process_count=None) -> list:
        """The validation rows in order, in full batches; fill rows count nothing."""
        out = []
        for rows_read, real in self.eval_rows(max_batches, process_index, process_count):
            batch = pipeline.make_batch(rows_read, self.tok.byte_lengths)
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
        sources = []
        for spec, (_, directory, manifest), tr, va in zip(
            self.specs, self.caches, self.train, self.valid, strict=True
        ):
            splits = {
                name: {
                    "tokens": m["num_tokens"],
                    "documents": m["num_docs"],
                    "bytes": m["num_bytes"],
                    "rows": rows.num_rows,
                    "cleaning": m["cleaning"],
                }
                for name, m, rows in (
                    ("train", manifest["splits"]["train"], tr),
                    ("validation", manifest["splits"]["validation"], va),
                )
            }
            sources.append(
                {"source": spec.name, "weight": spec.weight, "cache": directory, **splits}
            )
        return {"tokenizer_sha256": self.tok.sha256, "sources": sources}

    def source(self) -> DataSource:
        return DataSource(
            self.tok.vocab_size,
            self.train_batch,
            self.eval_batches,
            self.tok.sha256,
            self.baselines(),
            packed=self.config.data.pack,
            text=self,
            mask_id=self.tok.mask_id,
            special_ids=self.tok.special_ids,
            tokenizer=self.tok,
        )
