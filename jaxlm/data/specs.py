"""The typed inputs of the data layer: `DataSpec` and its parts, frozen dataclasses.

`jaxlm.config.data_spec(config)` builds a DataSpec from a ConfigDict in one place (as
`model_config` builds the model's TransformerConfig); nothing under jaxlm/data reads a
ConfigDict. Field comments name the config key each field comes from.
"""

from __future__ import annotations

import dataclasses
import re

# What a run's batches are made of; config.OBJECTIVE_LAYOUT says which one an objective needs.
LAYOUTS = (
    "documents",  # token rows cut from cached documents (lm, mlm)
    "spans",  # document rows T5-corrupted into (inputs, targets) pairs (span_corruption)
    "examples",  # one labelled example per row (seq2seq, classify)
    "synthetic",  # generated batches of the objective's shape (data.source=synthetic)
)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of data.source: KIND[:ARG][@WEIGHT]."""

    kind: str
    arg: str = ""
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind

    @property
    def slug(self) -> str:
        """The name as a short file-name-safe string."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.name).strip("_.")[:48] or self.kind


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """The data settings that decide which documents or examples a source yields."""

    text_key: str = "text"  # data.text_key
    tfds_data_dir: str = ""  # data.tfds_data_dir
    train_split: str = "train"  # data.train_split
    eval_split: str = "validation"  # data.eval_split
    eval_fraction: float = 0.05  # data.eval_fraction
    decode_errors: str = "strict"  # data.decode_errors

    def split_name(self, split: str) -> str:
        return self.train_split if split == "train" else self.eval_split


@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """Cleaning before tokenization (data.normalize ... data.dedup); see clean.Cleaner."""

    normalize: str = "NFC"  # none, NFC or NFKC
    strip_control: bool = True
    strip_whitespace: bool = True
    min_chars: int = 1  # data.min_doc_chars
    max_chars: int = 0  # data.max_doc_chars; 0: no limit
    dedup: bool = True


@dataclasses.dataclass(frozen=True)
class ExampleFields:
    """Which feature/field holds what in labelled examples (data.input_key, target_key,
    label_key), for task.objective seq2seq or classify."""

    objective: str  # seq2seq or classify
    input: str
    target: str = ""
    label: str = "label"

    def __post_init__(self) -> None:
        if self.objective not in ("seq2seq", "classify"):
            raise ValueError(f"task.objective={self.objective} does not read labelled examples")

    @property
    def seq2seq(self) -> bool:
        return self.objective == "seq2seq"

    @property
    def other(self) -> str:
        """The target text's field (seq2seq) or the label's (classify)."""
        return self.target if self.seq2seq else self.label

    @property
    def other_config_key(self) -> str:
        return "target_key" if self.seq2seq else "label_key"

    def config_key(self, name: str) -> str:
        return "input_key" if name == self.input else self.other_config_key

    def identity(self) -> dict:
        """The fields that decide an example cache's contents (part of its key)."""
        return {"objective": self.objective, "input": self.input, "other": self.other}


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer a run uses, and how one is trained when none is given (data.tokenizer*)."""

    path: str = ""  # data.tokenizer; empty: init_from's, a prepared cache's, or train one
    # tokenizer.model of the train.init_from run (fine-tuning keeps it; tokenizer.json beside
    # it, a Hugging Face one, is used instead when the run has that)
    init_from: str = ""
    vocab_size: int = 4096
    model_type: str = "bpe"
    byte_fallback: bool = True
    mask: bool = False
    sentinels: int = 0
    sample_chars: int = 20_000_000

    def options(self) -> list:
        """The training options that shape a trained tokenizer (part of its key)."""
        return [self.byte_fallback, self.mask, self.sentinels]


@dataclasses.dataclass(frozen=True)
class SpanSpec:
    """T5 span corruption (task.noise_density, task.mean_span_length)."""

    noise_density: float = 0.15
    mean_span_length: float = 3.0


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Everything the data layer reads: what, how it is cut into batches, where caches go."""

    sources: tuple[SourceSpec, ...]
    layout: str  # one of LAYOUTS
    objective: str  # task.objective: the batch keys of synthetic data, the mask id of mlm
    read: ReadOptions = ReadOptions()
    clean: CleanConfig = CleanConfig()
    tokenizer: TokenizerSpec = TokenizerSpec()
    batch_size: int = 32  # data.batch_size: the global batch
    seq_len: int = 256  # data.seq_len
    target_len: int = 64  # data.target_len
    pack: bool = True  # data.pack
    seed: int = 0  # train.seed: data order, span corruption, synthetic chains
    fields: ExampleFields | None = None  # layout examples only
    spans: SpanSpec = SpanSpec()
    num_classes: int = 0  # model.num_classes: labels are checked against it
    vocab_size: int = 0  # synthetic data's vocabulary (model.vocab_size or tokenizer's)
    cache_root: str = ""  # data.cache_dir (local or gs://); empty: ~/.cache/jaxlm
    prepend_cls: bool = False  # data.prepend_cls: classify rows start with the tokenizer's CLS

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {LAYOUTS}")
        if self.layout == "examples" and self.fields is None:
            raise ValueError("layout examples needs fields (data.input_key and friends)")
