"""Source kinds: `data.source` parsed into weighted sources, and the one table of kinds.

`data.source` is a comma-separated mixture of `KIND[:ARG][@WEIGHT]`, for example
`tfds:lm1b@0.7,jsonl:/data/c4-{split}-*.json.gz@0.3`. A new kind is one KINDS entry: how to
write it, its cache identity (the read options that shape what it yields, part of every cache
key) and its readers (documents; labelled examples where it has them). tests/test_data.py
fails when a kind lacks its reader or its identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from jaxlm.data.builtin import corpus
from jaxlm.data.documents import read as documents_read
from jaxlm.data.examples import read as examples_read
from jaxlm.data.specs import ReadOptions, SourceSpec
from jaxlm.data.types import SPLITS, DataError


@dataclasses.dataclass(frozen=True)
class SourceKind:
    usage: str  # how to write it, for error messages
    reads: str  # "text" (read, cleaned, tokenized into a cache), "cache" or "generated"
    identity: Callable[[SourceSpec, ReadOptions], dict]
    documents: Callable[[str, str, ReadOptions], Iterator[str]] | None = None
    # (arg, split, opts, fields, num_classes) -> (input text, target text or label)
    examples: Callable[..., Iterator[tuple]] | None = None

    @property
    def takes_arg(self) -> bool:
        return ":" in self.usage.split(" ")[0]


def _files_identity(text_key: bool) -> Callable[[SourceSpec, ReadOptions], dict]:
    def identity(spec: SourceSpec, opts: ReadOptions) -> dict:
        out: dict = {"splits": [opts.train_split, opts.eval_split]}
        if text_key:
            out["text_key"] = opts.text_key
        if "{split}" not in spec.arg:
            out["eval_fraction"] = opts.eval_fraction
        return {**out, "decode_errors": opts.decode_errors}

    return identity


def _tfds_identity(spec: SourceSpec, opts: ReadOptions) -> dict:
    del spec
    return {
        "splits": [opts.train_split, opts.eval_split],
        "text_key": opts.text_key,
        "decode_errors": opts.decode_errors,
    }


def _file_identity(spec: SourceSpec, opts: ReadOptions) -> dict:
    del spec
    return {"eval_fraction": opts.eval_fraction, "decode_errors": opts.decode_errors}


def _stdlib_identity(spec: SourceSpec, opts: ReadOptions) -> dict:
    del spec, opts
    return {"python": corpus.config_name()}  # each interpreter has its own stdlib


def _nothing_read(spec: SourceSpec, opts: ReadOptions) -> dict:
    del spec, opts
    return {}  # a prepared cache carries its own identity; synthetic data reads nothing


KINDS: dict[str, SourceKind] = {
    "python_stdlib": SourceKind(
        "python_stdlib (the embedded corpus: this interpreter's standard library)",
        "text",
        _stdlib_identity,
        documents_read.stdlib_documents,
    ),
    "synthetic": SourceKind(
        "synthetic (a learnable random token stream; no text, no TensorFlow)",
        "generated",
        _nothing_read,
    ),
    "tfds": SourceKind(
        "tfds:NAME[/CONFIG][:VERSION] (a prepared TFDS text dataset)",
        "text",
        _tfds_identity,
        documents_read.tfds_documents,
        examples_read.tfds_records,
    ),
    "text": SourceKind(
        "text:GLOB (plain text files, one document each)",
        "text",
        _files_identity(text_key=False),
        documents_read.text_documents,
    ),
    "jsonl": SourceKind(
        "jsonl:GLOB (JSON lines, .gz allowed, one document per line)",
        "text",
        _files_identity(text_key=True),
        documents_read.jsonl_documents,
        examples_read.jsonl_records,
    ),
    "file": SourceKind(
        "file:PATH (one text file: the last data.eval_fraction of it validates)",
        "text",
        _file_identity,
        documents_read.file_documents,
    ),
    "prepared": SourceKind(
        "prepared:DIR (a cache written by jaxlm-data prepare)", "cache", _nothing_read
    ),
}
EXAMPLE_KINDS = tuple(k for k, v in KINDS.items() if v.examples is not None)
_EXAMPLE = "tfds:lm1b@0.7,text:/data/books/*.txt@0.3"


def parse_sources(text: str) -> list[SourceSpec]:
    """Parse `data.source`; raise DataError naming the fix on anything malformed."""
    kinds = "; ".join(k.usage for k in KINDS.values())
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise DataError(f"data.source {text!r} has an empty entry; write e.g. {_EXAMPLE}")
        body, weight = part, 1.0
        head, at, tail = part.rpartition("@")
        if at:
            try:
                body, weight = head, float(tail)
            except ValueError:
                raise DataError(
                    f"data.source entry {part!r}: weight {tail!r} is not a number"
                ) from None
            if not weight > 0:
                raise DataError(f"data.source entry {part!r}: the weight must be > 0")
        name, colon, arg = body.partition(":")
        if name not in KINDS:
            raise DataError(f"unknown data source {body!r}; use one of: {kinds}")
        kind = KINDS[name]
        if not kind.takes_arg and colon:
            raise DataError(f"data source {name!r} takes no argument; write just {name}")
        if kind.takes_arg and not arg:
            raise DataError(f"data source {name!r} needs an argument: {kind.usage}")
        specs.append(SourceSpec(name, arg, weight))
    if len(specs) > 1 and any(s.kind == "synthetic" for s in specs):
        raise DataError("synthetic data cannot be mixed with text sources; use it alone")
    return specs


def identity(spec: SourceSpec, opts: ReadOptions) -> dict:
    """The read options that shape this source's documents (part of cache keys)."""
    return KINDS[spec.kind].identity(spec, opts)


def documents(spec: SourceSpec, split: str, opts: ReadOptions) -> Iterator[str]:
    """The split's documents (split is "train" or "validation") in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    reader = KINDS[spec.kind].documents
    if reader is None:
        raise ValueError(f"data source {spec.name!r} has no documents to read")
    return reader(spec.arg, split, opts)
