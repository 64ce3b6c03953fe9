"""Where documents come from: `data.source` parsed into weighted sources, and their documents.

`data.source` is a comma-separated mixture of `KIND[:ARG][@WEIGHT]`, for example
`tfds:lm1b@0.7,jsonl:/data/c4-{split}-*.json.gz@0.3`. Kinds are listed in KINDS. File globs may
contain `{split}`, replaced by data.train_split / data.eval_split; without it, a document goes
to validation when a hash of its text falls in data.eval_fraction, so exact duplicates always
share a split. Every reader fails with a one-line DataError naming the fix rather than yield
an empty dataset. Only the TFDS reader imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import json
import re
from collections.abc import Iterator

from jaxlm import storage
from jaxlm.data import corpus

KINDS = {
    "python_stdlib": "python_stdlib (the embedded corpus: this interpreter's standard library)",
    "synthetic": "synthetic (a learnable random token stream; no text, no TensorFlow)",
    "tfds": "tfds:NAME[/CONFIG][:VERSION] (a prepared TFDS text dataset)",
    "text": "text:GLOB (plain text files, one document each)",
    "jsonl": "jsonl:GLOB (JSON lines, .gz allowed, one document per line)",
    "file": "file:PATH (one text file: the last data.eval_fraction of it validates)",
    "prepared": "prepared:DIR (a cache written by jaxlm-data prepare)",
}
_NO_ARG = ("python_stdlib", "synthetic")
SPLITS = ("train", "validation")
_SURROGATES = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """Bad data input or settings; the one-line message names the fix."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
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


def parse_sources(text: str) -> list[SourceSpec]:
    """Parse `data.source`; raise DataError naming the fix on anything malformed."""
    kinds = "; ".join(KINDS.values())
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
        kind, colon, arg = body.partition(":")
        if kind not in KINDS:
            raise DataError(f"unknown data source {body!r}; use one of: {kinds}")
        if kind in _NO_ARG and colon:
            raise DataError(f"data source {kind!r} takes no argument; write just {kind}")
        if kind not in _NO_ARG and not arg:
            raise DataError(f"data source {kind!r} needs an argument: {KINDS[kind]}")
        specs.append(SourceSpec(kind, arg, weight))
    if len(specs) > 1 and any(s.kind == "synthetic" for s in specs):
        raise DataError("synthetic data cannot be mixed with text sources; use it alone")
    return specs


_EXAMPLE = "tfds:lm1b@0.7,text:/data/books/*.txt@0.3"


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """The data settings that decide which documents a source yields."""

    text_key: str = "text"
    tfds_data_dir: str = ""
    train_split: str = "train"
    eval_split: str = "validation"
    eval_fraction: float = 0.05
    decode_errors: str = "strict"

    @classmethod
    def from_config(cls, data) -> ReadOptions:
        return cls(
            data.text_key,
            data.tfds_data_dir,
            data.train_split,
            data.eval_split,
            data.eval_fraction,
            data.decode_errors,
        )

    def identity(self, spec: SourceSpec) -> dict:
        """The options that shape this source's documents (part of cache keys)."""
        if spec.kind in ("tfds", "text", "jsonl"):
            out = {"splits": [self.train_split, self.eval_split]}
            if spec.kind != "text":
                out["text_key"] = self.text_key
            if spec.kind != "tfds" and "{split}" not in spec.arg:
                out["eval_fraction"] = self.eval_fraction
        elif spec.kind == "file":
            out = {"eval_fraction": self.eval_fraction}
        elif spec.kind == "python_stdlib":
            return {"python": corpus.config_name()}  # each interpreter has its own stdlib
        else:
            return {}
        out["decode_errors"] = self.decode_errors
        return out

    def split_name(self, split: str) -> str:
        return self.train_split if split == "train" else self.eval_split


def documents(spec: SourceSpec, split: str, opts: ReadOptions) -> Iterator[str]:
    """The split's documents (split is "train" or "validation") in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if spec.kind == "python_stdlib":
        return (text for _, text in corpus.iter_split(split))
    if spec.kind == "tfds":
        return _tfds_documents(spec.arg, opts.split_name(split), opts)
    if spec.kind == "text":
        return _text_documents(spec.arg, split, opts)
    if spec.kind == "jsonl":
        return _jsonl_documents(spec.arg, split, opts)
    if spec.kind == "file":
        return iter([_file_part(spec.arg, split, opts)])
    raise ValueError(f"data source {spec.name!r} has no documents to read")


def decode(data: bytes, where: str, errors: str) -> str:
    """UTF-8 text; with errors="strict" a DataError names the offending byte and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return data.decode("utf-8", "replace")
        raise DataError(
            f"{where} is not UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r}); convert "
            "it, or set data.decode_errors=replace to substitute U+FFFD for bad bytes"
        ) from None


def in_split(text: str, split: str, eval_fraction: float) -> bool:
    """Hash split: equal texts always land in the same split."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    is_eval = int.from_bytes(digest, "little") < eval_fraction * 2.0**64
    return is_eval == (split == "validation")


def match_files(kind: str, pattern: str, split: str, opts: ReadOptions) -> tuple[list[str], bool]:
    """(matching files, whether the glob chose the split via {split})."""
    by_name = "{split}" in pattern
    resolved = pattern.replace("{split}", opts.split_name(split))
    files = storage.glob(resolved)
    if not files:
        key = "train_split" if split == "train" else "eval_split"
        hint = f" ({{split}} is data.{key})" if by_name else ""
        raise DataError(
            f"{kind}:{resolved} matches no files{hint}; check the path (wildcards: * ? [..] **)"
        )
    return files, by_name


def _empty_file(path: str, pattern: str) -> DataError:
    return DataError(f"{path} is empty; remove it or narrow the pattern {pattern!r}")


def _text_documents(pattern: str, split: str, opts: ReadOptions) -> Iterator[str]:
    files, by_name = match_files("text", pattern, split, opts)
    for path in files:
        data = storage.read_bytes(path)
        if not data:
            raise _empty_file(path, pattern)
        text = decode(data, path, opts.decode_errors)
        if by_name or in_split(text, split, opts.eval_fraction):
            yield text


def _jsonl_documents(pattern: str, split: str, opts: ReadOptions) -> Iterator[str]:
    files, by_name = match_files("jsonl", pattern, split, opts)
    for obj, where in json_objects(files, pattern, opts):
        text = text_field(obj, opts.text_key, "text_key", where, opts)
        if by_name or in_split(text, split, opts.eval_fraction):
            yield text


def json_objects(files: list[str], pattern: str, opts: ReadOptions) -> Iterator[tuple[dict, str]]:
    """Each non-blank line of the JSONL files (.gz allowed) as (object, "path:line")."""
    for path in files:
        with storage.open_binary(path) as raw:
            lines = gzip.open(raw) if path.endswith(".gz") else raw
            seen = False
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                seen = True
                where = f"{path}:{lineno}"
                yield _json_object(decode(line, where, opts.decode_errors), where), where
            if not seen:
                raise _empty_file(path, pattern)


def _json_object(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where} is not a JSON object ({e.msg}); JSONL needs one per line"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} is a JSON {type(obj).__name__}, not an object; JSONL needs one")
    return obj


def field(obj: dict, key: str, config_key: str, where: str):
    """obj[key]; a missing field names the fields there are and the config key to set."""
    if key not in obj:
        raise DataError(
            f"{where} has no field {key!r} (it has {sorted(obj)[:8]}); set data.{config_key} "
            "to the field that holds it"
        )
    return obj[key]


def text_field(obj: dict, key: str, config_key: str, where: str, opts: ReadOptions) -> str:
    """A JSON field that must hold text (lone surrogates: an error or U+FFFD, as configured)."""
    text = field(obj, key, config_key, where)
    if not isinstance(text, str):
        raise DataError(
            f"{where}: field {key!r} is {type(text).__name__}, not a string; set "
            f"data.{config_key} to a text field"
        )
    if _SURROGATES.search(text):  # JSON escapes can encode lone surrogates, which are not text
        if opts.decode_errors != "replace":
            raise DataError(
                f"{where}: field {key!r} holds a lone UTF-16 surrogate; fix the file or set "
                "data.decode_errors=replace"
            )
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _file_part(path: str, split: str, opts: ReadOptions) -> str:
    if not storage.exists(path):
        raise DataError(f"file:{path} does not exist; check the path in data.source")
    data = storage.read_bytes(path)
    if not data:
        raise DataError(f"file:{path} is empty; point data.source at a file with text in it")
    text = decode(data, path, opts.decode_errors)
    # Cut at a line end so no line is split between train and validation.
    at = int(len(text) * (1.0 - opts.eval_fraction))
    newline = text.find("\n", at)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut] if split == "train" else text[cut:]


def tfds_builder(name: str, opts: ReadOptions):
    """The TFDS builder of `name`; our own datasets are prepared locally on first use."""
    import tensorflow_datasets as tfds  # Lazy: only TFDS sources need TensorFlow.

    data_dir = opts.tfds_data_dir or None
    if data_dir and not storage.exists(data_dir):
        raise DataError(
            f"data.tfds_data_dir {data_dir} does not exist; point it at the directory where "
            "`tfds build` prepared the dataset (local or gs://)"
        )
    # Our own datasets, generated from local files: import the module that registers them.
    base = name.split("/")[0].split(":")[0]
    own = base in ("python_stdlib", "code_docstring", "stdlib_package")
    if base == "python_stdlib":
        from jaxlm.data import stdlib_builder  # noqa: F401  (registers the builder)
    elif own:
        from jaxlm.data import task_builders  # noqa: F401  (registers both task builders)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"TFDS has no dataset {name!r}; check the name (tfds.list_builders()), "
            "e.g. tfds:lm1b, tfds:c4/en, tfds:wikipedia/20230601.en"
        ) from None
    except (AssertionError, ValueError) as e:  # unknown config or version
        first = str(e).strip().splitlines()[0][:300]
        raise DataError(f"TFDS cannot load {name!r}: {first}") from None
    if own:
        if not builder.is_prepared():  # TFDS's own progress lines say "Downloading"
            print(f"building TFDS {name} once from the embedded corpus (nothing is downloaded)")
        try:
            builder.download_and_prepare()  # generated from local files: nothing is downloaded
        except OSError as e:
            # Another run started at the same time may have finished the same build first: TFDS
            # renames its incomplete directory into place, and the loser's check (FileExistsError,
            # no errno) or rename (ENOTEMPTY) fails. Then read the build it prepared; any other
            # error stands.
            lost = isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY)
            if not lost:
                raise
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():
                raise
    return builder


def tfds_split(builder, name: str, split: str, train: bool):
    """The builder's tf.data split in file order; unprepared data or a bad split name is a
    DataError naming the fix (`train` picks the config key it names: train_split/eval_split)."""
    try:
        return builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:
        raise DataError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir}; run `tfds build {name} "
            "--data_dir DIR` and set data.tfds_data_dir=DIR (training never downloads)"
        ) from None
    except ValueError as e:  # unknown split
        first = str(e).strip().splitlines()[0][:200]
        key = "train_split" if train else "eval_split"
        raise DataError(
            f"TFDS dataset {name}: {first} Set data.{key} (TFDS syntax, e.g. train[:1%])"
        ) from None


def _tfds_documents(name: str, split: str, opts: ReadOptions) -> Iterator[str]:
    import tensorflow as tf

    builder = tfds_builder(name, opts)
    features = builder.info.features
    if opts.text_key not in features:
        raise DataError(
            f"TFDS dataset {name} has no feature {opts.text_key!r} (it has "
            f"{sorted(features.keys())}); set data.text_key"
        )
    ds = tfds_split(builder, name, split, train=split == opts.train_split)
    texts = ds.map(lambda ex: ex[opts.text_key], num_parallel_calls=tf.data.AUTOTUNE)
    where = f"TFDS {name} split {split}"
    for data in texts.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        yield decode(data, where, opts.decode_errors)
