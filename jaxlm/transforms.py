"""Parameter transforms: (params, model config) -> (params, model config), between a checkpoint's
restore and its use.

Every program that loads a run for use passes its parameters through `apply`: `LanguageModel`
(so jaxlm-generate), the eval program and `train.init_from`. Resuming a run does not: it
continues the parameters as they were saved. A run names its transforms in `model.transforms`
(comma-separated), so a run directory that needs a layout converter, an adapter merge or a
quantizer says so in its config.json and every program applies the same chain, in order.

A name is a key of `REGISTRY` or an importable `package.module:function`, so research code plugs
in a transform without editing jaxlm. A transform may change the model config (a quantizer, a
pruner that drops heads): `state.ModelState.transformed` lays the result out for that model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import jax

from jaxlm.config_checks import ConfigError
from jaxlm.models.spec import TransformerConfig

Transform = Callable[[dict, TransformerConfig], tuple[dict, TransformerConfig]]


def identity(params: dict, model_cfg: TransformerConfig) -> tuple[dict, TransformerConfig]:
    return params, model_cfg


REGISTRY: dict[str, Transform] = {"identity": identity}


def resolve(name: str) -> Transform:
    """The transform a name stands for, or a ConfigError naming the fix."""
    if name in REGISTRY:
        return REGISTRY[name]
    module_name, _, attr = name.partition(":")
    if not attr:
        raise ConfigError(
            f"model.transforms: unknown transform {name!r}; use one of {sorted(REGISTRY)} or "
            "an importable package.module:function"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.transforms: cannot import {name!r} ({e})") from None
    if not callable(fn):
        raise ConfigError(f"model.transforms: {name!r} is not a function")
    return fn


def check(names: Sequence[str]) -> tuple[str, ...]:
    """`names` once each resolves (a one-line ConfigError otherwise): call before any loading."""
    for name in names:
        resolve(name)
    return tuple(names)


def apply(
    names: Sequence[str], params: dict, model_cfg: TransformerConfig
) -> tuple[dict, TransformerConfig]:
    """`params` of a `model_cfg` model through the named transforms, in order."""
    fns = [resolve(n) for n in names]  # every name checked before any work
    for name, fn in zip(names, fns, strict=True):
        params, model_cfg = fn(params, model_cfg)
        if not isinstance(model_cfg, TransformerConfig):
            raise TypeError(f"transform {name!r} must return (params, TransformerConfig)")
    return params, model_cfg


def apply_abstract(
    names: Sequence[str], abstract: dict, model_cfg: TransformerConfig
) -> tuple[dict, TransformerConfig]:
    """What `apply` would return, from shapes alone (jax.eval_shape): checks before a restore.

    Transforms are jax functions of the parameters, so they trace on abstract values.
    """
    out = {}

    def run(params):
        params, out["model_cfg"] = apply(names, params, model_cfg)
        return params

    shapes = jax.eval_shape(run, abstract)
    return shapes, out["model_cfg"]
