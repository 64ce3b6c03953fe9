"""The training run's view of data: global batches addressed by step, and fixed eval batches.

`make_source(config, workdir)` is the one entry point the trainer uses. Batches are numpy dicts
with the keys of `pipeline.make_batch`; the batch at step s is a pure function of (seed, s).
The synthetic source imports neither TensorFlow nor SentencePiece models.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxlm.data import corpus, pipeline

EVAL_STEP_OFFSET = 2**40


@dataclasses.dataclass
class DataSource:
    vocab_size: int
    train_batch: Callable[[int], dict]  # step -> global batch
    eval_batches: Callable[[int], list[dict]]  # max batches (0: all) -> fixed validation batches
    tokenizer_sha256: str | None = None
    baselines: dict | None = None  # compressor bits per byte on the validation text
    packed: bool = True  # rows hold several documents: the model needs segment ids


def cache_dir(config) -> Path:
    return Path(config.data.cache_dir or Path.home() / ".cache" / "jaxlm").expanduser()


def make_source(config, workdir: str | Path) -> DataSource:
    if config.data.source == "synthetic":
        return _synthetic(config)
    return _python_stdlib(config, Path(workdir))


def _synthetic(config) -> DataSource:
    d, seed = config.data, config.train.seed
    vocab = config.model.vocab_size or d.tokenizer_vocab_size

    def batch(step: int) -> dict:
        out = pipeline.synthetic_batch(step, d.batch_size, d.seq_len, vocab, seed)
        out["target_bytes"] = np.zeros_like(out["target_bytes"])  # no text: no bits per byte
        return out

    def eval_batches(n: int) -> list[dict]:
        # Same chain, steps no run reaches: validation batches never appear in training.
        return [batch(EVAL_STEP_OFFSET + i) for i in range(n or 4)]

    return DataSource(vocab, batch, eval_batches, packed=False)


def load_tokenizer(config, workdir: Path):
    """The run's tokenizer: the workdir's copy on resume, else data.tokenizer, else trained."""
    from jaxlm.data.tokenizer import Tokenizer, get_or_train_tokenizer

    local = workdir / "tokenizer.model"
    if local.is_file():
        return Tokenizer(local)
    if config.data.tokenizer:
        tok = Tokenizer(Path(config.data.tokenizer).expanduser())
    else:
        tok = get_or_train_tokenizer(
            lambda: corpus.read_split("train"),
            config.data.tokenizer_vocab_size,
            config.data.tokenizer_type,
            cache_dir(config),
            corpus.default_source_key(),
        )
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok.path, local)
    return Tokenizer(local)


def _python_stdlib(config, workdir: Path) -> DataSource:
    d, seed = config.data, config.train.seed
    tok = load_tokenizer(config, workdir)
    key = corpus.default_source_key()
    train = pipeline.load_packed("train", tok, d.seq_len, cache_dir(config), key)
    valid = pipeline.load_packed("validation", tok, d.seq_len, cache_dir(config), key)
    sampler = pipeline.StepSampler(train.num_rows, d.batch_size, seed)
    byte_lengths = tok.byte_lengths

    def train_batch(step: int) -> dict:
        return pipeline.make_batch(train, sampler.rows_for_step(step), byte_lengths)

    def eval_batches(n: int) -> list[dict]:
        return fixed_batches(valid, d.batch_size, n, byte_lengths)

    baselines = pipeline.compression_bits_per_byte(corpus.read_split("validation"))
    return DataSource(tok.vocab_size, train_batch, eval_batches, tok.sha256, baselines)


def fixed_batches(split, batch_size: int, max_batches: int, byte_lengths) -> list[dict]:
    """The split in order, in full batches; the last is padded with rows that count nothing."""
    total = -(-split.num_rows // batch_size)
    count = total if max_batches <= 0 else min(max_batches, total)
    out = []
    for b in range(count):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        real = rows < split.num_rows
        batch = pipeline.make_batch(split, np.where(real, rows, 0), byte_lengths)
        batch["loss_mask"] = batch["loss_mask"] * real[:, None]
        batch["target_bytes"] = batch["target_bytes"] * real[:, None]
        out.append(batch)
    return out
