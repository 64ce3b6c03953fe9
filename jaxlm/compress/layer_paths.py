"""What the compressors share: a model's dense layers by path, and writing a new run directory.

A compressed run (merged LoRA, quantized) is a plain run directory: config.json, the source run's
tokenizer and data.json, and one checkpoint, so jaxlm-eval, jaxlm-generate and
LanguageModel.load use it like any other. It is written beside its destination and renamed into
place, so a failure leaves nothing half-written under --out.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import ConfigError
from jaxlm.models.families import build_model
from jaxlm.models.layers import DenseGeneral
from jaxlm.models.transformer import TransformerConfig

_COPIED = ("tokenizer.model", "tokenizer.json", "data.json")


def dense_layers(model_cfg: TransformerConfig) -> list[tuple[tuple, DenseGeneral]]:
    """(module path, abstract DenseGeneral) for every dense layer of the model, in order."""
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, DenseGeneral)]


def at(tree: dict, path: tuple):
    """The subtree of a nested parameter dict at a module path."""
    for key in path:
        tree = tree[key]
    return tree


def put(tree: dict, path: tuple, value) -> None:
    """Set `value` at a module path of a nested dict, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def copy_tree(tree: dict) -> dict:
    """New dicts all the way down, the same leaves: safe to assign into."""
    return jax.tree.map(lambda x: x, tree)


def check_out(out: str | Path) -> Path:
    """--out as a Path, refused in one line when something is already there."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists; pass a new directory (nothing was written)")
    return out


def run_config(config, model_cfg: TransformerConfig):
    """A copy of a run's config describing `model_cfg`'s parameters as they are stored: no
    transforms left to apply, no base run, no adapters, no fake quantization."""
    config = copy.deepcopy(config)
    for f in dataclasses.fields(TransformerConfig):
        if f.name in config.model:
            config.model[f.name] = getattr(model_cfg, f.name)
    config.model.transforms = ""
    config.train.init_from = ""
    config.train.checkpoint_dir = ""
    config.train.lora_rank = 0
    config.train.qat = False
    return config


def write_run(out: Path, source: str | Path, config, params: dict, step: int, meta: dict) -> None:
    """OUT: config.json, SOURCE's tokenizer and data.json, and a checkpoint of `params` at
    `step`; built in a sibling directory and renamed into place (atomic on one file system)."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in _COPIED:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, tmp / name)
        config_lib.save_config(config, tmp)
        ckpt = Checkpointer(tmp / "checkpoints", keep=1, async_save=False)
        try:
            state = {"params": params, "step": jnp.asarray(step, jnp.int32)}
            ckpt.save(step, state, {**meta, "step": step})
        finally:
            ckpt.close()
        tmp.rename(out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
