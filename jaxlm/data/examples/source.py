"""Labelled-example tasks (seq2seq pairs, classification): one example per row, not documents.

`build(spec, tok)` builds (or reuses) the task's example cache (read.py reads the examples,
cache.py cleans and tokenizes them once) and serves step-addressed numpy batches from it. A
batch row is an example's ids cut to the row length minus one, then EOS, then padding (id 0);
eval batches cover every validation example once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np

from jaxlm import monitor
from jaxlm.data import sampling
from jaxlm.data.batches import classify_batch, seq2seq_batch
from jaxlm.data.cache_format import Ragged, load_array
from jaxlm.data.examples.cache import TEXTS, build_cache
from jaxlm.data.specs import DataSpec
from jaxlm.data.types import SPLITS, DataError, DataSource


@dataclasses.dataclass
class ExampleSplit:
    """One split of the cache, loaded: inputs, targets (seq2seq) or labels (classify)."""

    inputs: Ragged
    targets: Ragged | None
    labels: np.ndarray | None

    @property
    def size(self) -> int:
        return self.inputs.offsets.shape[0] - 1


class ExampleData:
    """The example cache of one task, with step-addressed batches for any process."""

    def __init__(self, spec: DataSpec, tok, log: Callable[[str], None] = monitor.console) -> None:
        self.spec, self.tok, self.fields = spec, tok, spec.fields
        self.directory, self.location, self.manifest = build_cache(spec, tok, log)
        self.splits = {split: self._load(split) for split in SPLITS}
        self.train, self.valid = self.splits["train"], self.splits["validation"]
        self.sampler = sampling.StepSampler([self.train.size], [1.0], spec.batch_size, spec.seed)
        self._texts: list[dict] | None = None

    def _load(self, split: str) -> ExampleSplit:
        s2s = self.fields.seq2seq
        data = ExampleSplit(
            Ragged.load(self.directory, f"{split}.inputs"),
            Ragged.load(self.directory, f"{split}.targets") if s2s else None,
            None if s2s else load_array(self.directory, f"{split}.labels.npy"),
        )
        if data.labels is not None:
            classes = self.spec.num_classes
            bad = np.flatnonzero((data.labels < 0) | (data.labels >= classes))
            if bad.size:
                label = int(data.labels[bad[0]])
                hint = (
                    " (-1 marks unlabelled examples, e.g. GLUE test splits: use a labelled "
                    "data.eval_split)"
                    if label < 0
                    else ""
                )
                raise DataError(
                    f"{self.manifest['source']} {split} example {int(bad[0])} has label {label}, "
                    f"outside 0..{classes - 1}; set --config.model.num_classes to the number of "
                    f"labels{hint}"
                )
        return data

    def batch(self, split: ExampleSplit, index: np.ndarray) -> dict[str, np.ndarray]:
        """The model arrays of these examples, one per row."""
        spec, eos = self.spec, self.tok.eos_id
        if self.fields.seq2seq:
            inputs, input_seg = split.inputs.rows(index, spec.seq_len, eos)
            return seq2seq_batch(
                inputs, input_seg, *split.targets.rows(index, spec.target_len, eos)
            )
        if not spec.prepend_cls:
            return classify_batch(*split.inputs.rows(index, spec.seq_len, eos), split.labels[index])
        # [CLS] text [SEP]: the CLS id takes column 0, the text one column less.
        inputs, input_seg = split.inputs.rows(index, spec.seq_len - 1, eos)
        column = np.ones((len(inputs), 1), np.int32)
        inputs = np.concatenate([column * self.cls_id, inputs], axis=1)
        return classify_batch(inputs, np.concatenate([column, input_seg], 1), split.labels[index])

    @property
    def cls_id(self) -> int:
        if self.tok.cls_id is None:
            raise DataError(
                "data.prepend_cls: the tokenizer has no CLS token; set --config.data.prepend_cls"
                "=false or use a tokenizer with one ([CLS])"
            )
        return self.tok.cls_id

    def train_batch(self, step: int, process_index=None, process_count=None) -> dict:
        """This process's rows of the global batch at `step` (a keyed permutation per epoch)."""
        _, rows = self.sampler.rows_for_step(step)
        share = sampling.process_share(len(rows), process_index, process_count)
        return self.batch(self.train, rows[share])

    def eval_batches(self, max_batches: int, process_index=None, process_count=None) -> list:
        """Validation examples in order in full batches (max_batches 0: all); the last batch is
        filled with repeated real examples whose loss_mask / example_mask is 0."""
        size, total = self.spec.batch_size, self.valid.size
        if max_batches > 0:
            total = min(total, max_batches * size)
        out = []
        for index, real in sampling.eval_slots(total, size, process_index, process_count):
            batch = self.batch(self.valid, index)
            if self.fields.seq2seq:
                batch["loss_mask"] = batch["loss_mask"] * real[:, None]
            else:
                batch["example_mask"] = real.astype(np.float32)
            out.append(batch)
        return out

    def texts(self) -> list[dict]:
        """The cleaned validation texts, in order."""
        if self._texts is None:
            with open(self.directory / TEXTS, encoding="utf-8") as f:
                self._texts = [json.loads(line) for line in f]
        return self._texts

    def eval_examples(self, max_examples: int) -> list[dict]:
        """Validation examples in order (0: all): input ids as in the batches (EOS included),
        the cleaned input text, and the reference text (seq2seq) or label (classify)."""
        n = self.valid.size if max_examples <= 0 else min(max_examples, self.valid.size)
        ids, seg = self.valid.inputs.rows(np.arange(n), self.spec.seq_len, self.tok.eos_id)
        lengths = seg.sum(axis=1)
        out = []
        for i, text in enumerate(self.texts()[:n]):
            example = {"input_ids": ids[i, : lengths[i]].copy(), "input": text["input"]}
            if self.fields.seq2seq:
                example["reference"] = text["target"]
            else:
                example["label"] = int(self.valid.labels[i])
            out.append(example)
        return out

    def describe(self) -> dict:
        """What the run reads, for WORKDIR/data.json."""
        d = self.spec
        splits = {}
        for name, split in self.splits.items():
            lengths = split.inputs.lengths
            info = {
                "examples": split.size,
                "dropped_empty": self.manifest["splits"][name]["dropped_empty"],
                "input_tokens": _length_stats(lengths),
                # Inputs longer than seq_len - 1 ids lose their end (EOS takes the last slot).
                "truncated_inputs": int((lengths > d.seq_len - 1).sum()),
            }
            if split.targets is not None:
                lengths = split.targets.lengths
                info["target_tokens"] = _length_stats(lengths)
                info["truncated_targets"] = int((lengths > d.target_len - 1).sum())
            else:
                values, counts = np.unique(split.labels, return_counts=True)
                info["labels"] = {str(v): int(c) for v, c in zip(values, counts, strict=True)}
            splits[name] = info
        return {
            "tokenizer_sha256": self.tok.sha256,
            "task": self.fields.objective,
            "source": self.manifest["source"],
            "fields": {"input": self.fields.input, self.fields.other_config_key: self.fields.other},
            "cache": self.location,
            "cleaning": self.manifest["cleaning"],
            "seq_len": d.seq_len,
            **({"target_len": d.target_len} if self.fields.seq2seq else {}),
            **splits,
        }

    def source(self) -> DataSource:
        tok = self.tok
        return DataSource(
            vocab_size=tok.vocab_size,
            train_batch=self.train_batch,
            eval_batches=self.eval_batches,
            tokenizer_sha256=tok.sha256,
            packed=False,
            tokenizer=tok,
            eval_examples=self.eval_examples,
            special_ids=tok.special_ids,
        )


def _length_stats(lengths: np.ndarray) -> dict:
    if lengths.size == 0:
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    p50, p95 = np.percentile(lengths, [50, 95])
    return {
        "mean": round(float(lengths.mean()), 2),
        "p50": int(p50),
        "p95": int(p95),
        "max": int(lengths.max()),
    }


def build(
    spec: DataSpec, tok, log: Callable[[str], None] = monitor.console
) -> tuple[DataSource, dict]:
    """(the DataSource of a seq2seq or classify task, its describe() dict for data.json)."""
    data = ExampleData(spec, tok, log)
    return data.source(), data.describe()
