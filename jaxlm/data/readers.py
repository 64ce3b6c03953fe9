"""Reading helpers every source kind shares: UTF-8 decoding, the hash split, file globs,
JSON lines and their fields, and TFDS builders and splits (documents/read.py and
examples/read.py read through these; sources.py says which kind reads how). Every helper
fails with a one-line DataError naming the fix rather than yield an empty dataset. Only the
TFDS helpers import TensorFlow.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import re
from collections.abc import Iterator

from jaxlm import storage
from jaxlm.data.specs import ReadOptions
from jaxlm.data.types import DataError

_SURROGATES = re.compile("[\ud800-\udfff]")


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


def empty_file(path: str, pattern: str) -> DataError:
    return DataError(f"{path} is empty; remove it or narrow the pattern {pattern!r}")


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
                raise empty_file(path, pattern)


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
        from jaxlm.data.builtin import stdlib_builder  # noqa: F401  (registers the builder)
    elif own:
        from jaxlm.data.builtin import task_builders  # noqa: F401  (registers both task builders)
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
