"""Paths into a model's parameter tree: its dense layers by module path, and reading, setting
and copying subtrees of a nested parameter dict at such a path."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from jaxlm.models.families import build_model
from jaxlm.models.layers import DenseGeneral
from jaxlm.models.spec import TransformerConfig


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


def dir_bytes(path: str | Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
