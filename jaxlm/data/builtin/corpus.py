"""The embedded corpus: the running interpreter's standard library sources (no download)."""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

# Directories that hold third-party code rather than the standard library.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
# Test code is excluded: it is huge, repetitive and full of deliberately odd inputs.
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Files whose path hash falls in this percentage are validation: the python_stdlib corpus and
# the tasks cut from it (code_tasks) share the split, so no validation file is ever trained on.
VALIDATION_PERCENT = 5.0


def config_name() -> str:
    """The running interpreter's minor version as a dataset config name, e.g. ``py3_11``."""
    return f"py{sys.version_info.major}_{sys.version_info.minor}"


def default_source_key() -> str:
    """Cache key of the embedded corpus, e.g. ``python_stdlib_py3_11`` (stdlibs differ)."""
    return f"python_stdlib_{config_name()}"


def stdlib_root() -> pathlib.Path:
    """The running interpreter's standard library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(rel: pathlib.PurePosixPath) -> bool:
    for part in rel.parts:
        if part in _EXCLUDED_DIRS or part in _TEST_DIRS or part.startswith("test_"):
            return True
    return False


def _read_utf8(path: pathlib.Path) -> str | None:
    """The file's exact text (no newline translation), or None if empty or not UTF-8."""
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


@functools.cache
def _stdlib_files_cached(root: str) -> tuple[tuple[str, pathlib.Path], ...]:
    base = pathlib.Path(root)
    out = []
    for folder, dirs, files in os.walk(base):
        # Prune excluded trees instead of filtering their files: site-packages can be huge.
        dirs[:] = [d for d in dirs if not _is_excluded(pathlib.PurePosixPath(d))]
        for name in files:
            path = pathlib.Path(folder, name)
            rel = pathlib.PurePosixPath(path.relative_to(base).as_posix())
            if not name.endswith(".py") or _is_excluded(rel) or not path.is_file():
                continue
            if _read_utf8(path) is not None:
                out.append((rel.as_posix(), path))
    return tuple(sorted(out))


def stdlib_files() -> list[tuple[str, pathlib.Path]]:
    """Sorted (relative posix path, absolute path) of the standard library's non-test sources."""
    return list(_stdlib_files_cached(str(stdlib_root())))


def split_of(relpath: str, validation_percent: float) -> str:
    """Deterministic split of a file by the hash of its relative path."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 10000
    return "validation" if bucket < validation_percent * 100 else "train"


def iter_split(
    split: str, validation_percent: float = VALIDATION_PERCENT
) -> Iterator[tuple[str, str]]:
    """Yield (relpath, text) of the split's files in sorted path order."""
    if split not in ("train", "validation"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'validation'")
    for rel, path in stdlib_files():
        if split_of(rel, validation_percent) != split:
            continue
        text = _read_utf8(path)
        if text is not None:
            yield rel, text


def read_split(split: str, validation_percent: float = VALIDATION_PERCENT) -> list[str]:
    """The texts of a split, in sorted path order."""
    return [text for _, text in iter_split(split, validation_percent)]
