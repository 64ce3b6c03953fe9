"""Paths that may be local or remote (gs://): glob, read, write, and local copies for memmap.

Remote paths go through etils epath, which uses tf.io.gfile when TensorFlow is installed and
fsspec/gcsfs otherwise; local paths never touch either.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import pathlib
import shutil
import tempfile
from typing import IO

_GLOB_CHARS = "*?["


def is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def as_path(path: str | os.PathLike[str]):
    """A pathlib.Path for local paths (with ~ expanded), an epath.Path for remote ones."""
    if is_remote(path):
        from etils import epath

        return epath.Path(str(path))
    return pathlib.Path(os.path.expanduser(str(path)))


def join(base: str | os.PathLike[str], *names: str) -> str:
    return str(as_path(base).joinpath(*names))


def glob(pattern: str) -> list[str]:
    """Sorted files matching pattern (`**` spans directories)."""
    if not is_remote(pattern):
        hits = globlib.glob(os.path.expanduser(pattern), recursive=True)
        return sorted(p for p in hits if os.path.isfile(p))
    parts = pattern.split("/")
    first = next((i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS)), len(parts))
    if first == len(parts):  # no wildcard: the path itself, if it exists
        return [pattern] if as_path(pattern).is_file() else []
    base = as_path("/".join(parts[:first]))
    if not base.exists():
        return []
    return sorted(str(p) for p in base.glob("/".join(parts[first:])) if p.is_file())


def exists(path: str | os.PathLike[str]) -> bool:
    return as_path(path).exists()


def open_binary(path: str | os.PathLike[str]) -> IO[bytes]:
    return as_path(path).open("rb")


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    return as_path(path).read_bytes()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file whole; local writes are atomic (temp file + rename)."""
    target = as_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        target.write_bytes(data)  # object stores replace objects atomically
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def size(path: str | os.PathLike[str]) -> int:
    """A file's size in bytes (epath's stat of a remote file has `length`, not `st_size`)."""
    st = as_path(path).stat()
    return st.length if is_remote(path) else st.st_size


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a file if it exists."""
    target = as_path(path)
    if target.exists():
        target.unlink()


def local_mirror(
    remote_dir: str, names: list[str], cache_root: pathlib.Path, version: str = ""
) -> pathlib.Path:
    """Copy named files of a remote directory once into cache_root (memmap needs local files).

    `version` (e.g. a hash of the remote manifest) keys the copy, so a cache rebuilt in place
    at the same path is copied afresh instead of mixing old and new files of equal size.
    """
    key = hashlib.sha256(f"{remote_dir.rstrip('/')}|{version}".encode()).hexdigest()[:16]
    local = cache_root / "mirror" / key
    local.mkdir(parents=True, exist_ok=True)
    missing = [n for n in names if not (local / n).is_file()]
    need = sum(size(join(remote_dir, n)) for n in missing)
    free = shutil.disk_usage(local).free
    if need > free:
        raise OSError(
            f"copying {remote_dir} needs {need / 2**30:.1f} GiB under {local} but "
            f"{free / 2**30:.1f} GiB are free; point data.cache_dir at a larger disk"
        )
    for name in missing:
        src, dst = as_path(remote_dir) / name, local / name
        # A unique temp name: several processes on one host may mirror the same cache at once.
        fd, tmp = tempfile.mkstemp(dir=local, prefix=name + ".", suffix=".tmp")
        try:
            with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)  # streamed: shards can be gigabytes
            os.replace(tmp, dst)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
    return local
