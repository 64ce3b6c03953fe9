"""Hugging Face model folders on disk: config.json, safetensors weights (one file or shards with
an index), tokenizer files. Numpy only (safetensors' numpy API; bf16 through ml_dtypes).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxlm.data.tokenizer import TokenizerAPI

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_FLOATS = (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30})


class ConversionError(ValueError):
    """A model jaxlm cannot convert; one line naming the config key (or tensor) and the fix."""


def read_config(hf_dir: str | Path) -> dict:
    """The folder's config.json as a dict."""
    path = Path(hf_dir) / CONFIG
    if not path.is_file():
        raise ConversionError(
            f"{path} not found: {hf_dir} is not a Hugging Face model folder; pass the folder "
            "that save_pretrained wrote (config.json and model.safetensors)"
        )
    try:
        return json.loads(path.read_text("utf-8"))
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); re-save the model") from None


def weight_files(hf_dir: str | Path) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards its index names."""
    hf_dir = Path(hf_dir)
    if (hf_dir / INDEX).is_file():
        index = json.loads((hf_dir / INDEX).read_text("utf-8"))
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing or not names:
            raise ConversionError(
                f"{hf_dir / INDEX} names shards that are missing ({', '.join(missing[:3])}); "
                "download every shard into the folder"
            )
        return [hf_dir / n for n in names]
    if (hf_dir / WEIGHTS).is_file():
        return [hf_dir / WEIGHTS]
    bins = sorted(p.name for p in hf_dir.glob("*.bin"))
    hint = (
        f" (it has {bins[0]}: re-save it with save_pretrained(dir, safe_serialization=True))"
        if bins
        else ""
    )
    raise ConversionError(f"{hf_dir} has no {WEIGHTS} or {INDEX}{hint}")


def read_tensors(hf_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors weights, floats as float32 (exact for bf16/fp16)."""
    out: dict[str, np.ndarray] = {}
    for path in weight_files(hf_dir):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                x = f.get_tensor(name)
                out[name] = x.astype(np.float32) if x.dtype in _FLOATS else x
    return out


def take_lm_head(tensors: dict, tied: bool, embedding: np.ndarray, embed_name: str):
    """jaxlm's untied [D, V] head from HF's `lm_head.weight` [V, D], or None when tied.

    A tied model may still carry the copy transformers saves; it must equal the embedding.
    """
    head = tensors.pop("lm_head.weight", None)
    if not tied:
        if head is None:
            raise KeyError("lm_head.weight")
        return head.T
    if head is not None and not np.array_equal(head, embedding):
        raise ConversionError(
            f"lm_head.weight differs from {embed_name} but config.json says "
            "tie_word_embeddings=true; set it to false to keep both"
        )
    return None


def parse_size(size: int | str) -> int:
    """Bytes in a shard size: 1000, "200KB", "5GB", "2GiB"."""
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise ConversionError(
                f"max_shard_size={size!r}: write bytes or a size like 200KB, 5GB, 2GiB"
            )
        n = int(float(m[1]) * _UNITS[(m[2] or "").lower()])
    if n <= 0:
        raise ConversionError(f"max_shard_size={size!r} must be positive")
    return n


def write_tensors(
    out_dir: Path,
    tensors: dict[str, np.ndarray],
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
) -> list[str]:
    """Write `tensors` as model.safetensors, or as shards of at most max_shard_size bytes
    (a tensor larger than that gets a shard of its own) with model.safetensors.index.json, in
    transformers' naming. Float tensors are cast to `dtype`. Returns the file names written."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: export as one of {', '.join(DTYPES)}")
    cast = {
        k: np.ascontiguousarray(v.astype(DTYPES[dtype]) if v.dtype in _FLOATS else v)
        for k, v in tensors.items()
    }
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(cast):
        n = cast[name].nbytes
        if limit is not None and shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = cast[name]
        size += n
    meta = {"format": "pt"}  # transformers reads the tensors as PyTorch ones
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / WEIGHTS), metadata=meta)
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.nbytes for v in cast.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX]


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: Path, tok: TokenizerAPI, max_len: int) -> None:
    """The tokenizer's file (tokenizer.json, or a SentencePiece tokenizer.model) and a
    tokenizer_config.json naming its special tokens, so AutoTokenizer loads the same roles."""
    (out_dir / tok.filename).write_bytes(tok.to_bytes())
    config: dict = {"model_max_length": max_len}
    if tok.filename == "tokenizer.json":  # any tokenizer.json loads as a fast tokenizer
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for role in ("bos", "eos", "unk", "pad", "mask", "cls", "sep"):
        idx = getattr(tok, f"{role}_id")
        if idx is not None:
            config[f"{role}_token"] = tok.id_to_piece(idx)
    write_json(out_dir / "tokenizer_config.json", config)
