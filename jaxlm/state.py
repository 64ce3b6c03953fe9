"""A model's state on a mesh, from its `TransformerConfig` alone: no optimizer, no data.

`ModelState.build(model_cfg, mesh, rules)` gives the graphdef, the abstract parameters, their
logical axes and shardings; `init` creates parameters already sharded (never whole on one device)
and `restore` reads a checkpoint's parameters straight into those shardings, checked against the
checkpoint's meta. `open_run(workdir, config, ...)` is how every reader of a finished run
(LanguageModel, compression, export, a distillation teacher) gets its parameters. The trainer
adds the optimizer, the data and the objective on top of it; the eval program, `LanguageModel`
and the benchmarks use it as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxlm import config as config_lib
from jaxlm import sharding, transforms
from jaxlm.checkpoint import Checkpointer, CheckpointError, open_step
from jaxlm.models.families import build_model
from jaxlm.models.spec import TransformerConfig

# Model fields free to change between runs of one checkpoint: they change no parameter.
_FREE_FIELDS = ("dropout", "attention_impl", "dtype", "remat", "qat")


def abstract_model(model_cfg: TransformerConfig) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, abstract params as a pure dict, logical axes per param), allocating nothing.

    Traced once per config in a process (building the modules costs ~0.1 s even abstractly, and
    a setup, an eval and a load each need it); each call gets its own dicts."""
    graphdef, params, axes = _abstract_model(model_cfg)
    return graphdef, _copy_dicts(params), _copy_dicts(axes)


@functools.lru_cache(maxsize=32)
def _abstract_model(model_cfg: TransformerConfig) -> tuple[nnx.GraphDef, dict, dict]:
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    axes = jax.tree.map(
        lambda v: v.get_metadata()["axes"], params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return graphdef, params.to_pure_dict(), axes.to_pure_dict()


def _copy_dicts(tree: Any) -> Any:
    """The nested dicts copied; their leaves (ShapeDtypeStructs, axis-name tuples) are immutable."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def init_params(model_cfg: TransformerConfig, seed: int) -> dict:
    """Fresh parameters as a pure dict; call under jit with out_shardings (ModelState.init)."""
    # RBG keys: XLA's RngBitGenerator compiles in seconds where threefry took 95 s for GPT-2
    # small on an H100 (2026-11-23); values match across meshes (tests/test_sharding.py).
    key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), 1)
    model = build_model(model_cfg, rngs=nnx.Rngs(params=key))
    return nnx.state(model, nnx.Param).to_pure_dict()


def checkpoint_meta(model_cfg: TransformerConfig, tokenizer_sha256: str | None) -> dict:
    """What a checkpoint's parameters must agree with to be restored into a model."""
    m = dataclasses.asdict(model_cfg)
    for key in _FREE_FIELDS:
        m.pop(key)
    return {"model": m, "tokenizer_sha256": tokenizer_sha256}


def saved_model_config(meta: dict, where: object) -> TransformerConfig:
    """The TransformerConfig a checkpoint (at `where`, named in errors) was written with."""
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    saved = meta.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"checkpoint {where} has no model config in its meta: not written by jaxlm; "
            "pass the --workdir of a jaxlm run"
        )
    # Fields missing from the meta (added to jaxlm later) keep their defaults.
    return TransformerConfig(**{k: v for k, v in saved.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class ModelState:
    """The parameters' structure and layout for one model on one mesh."""

    model_cfg: TransformerConfig
    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    abstract: dict  # ShapeDtypeStructs of the parameters, carrying their shardings
    axes: dict  # logical axis names per parameter
    shardings: dict  # NamedSharding per parameter

    @classmethod
    def build(cls, model_cfg: TransformerConfig, mesh: Mesh, rules) -> ModelState:
        graphdef, shapes, axes = abstract_model(model_cfg)
        shardings = sharding.param_shardings(shapes, axes, mesh, rules)
        abstract = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings
        )
        return cls(model_cfg, mesh, tuple(rules), graphdef, abstract, axes, shardings)

    def rules_context(self):
        """The logical-axis rules in force (activation constraints) while tracing the model."""
        return sharding.use_rules(self.mesh, self.rules)

    def init(self, seed: int) -> dict:
        """Fresh parameters, born sharded: jit with out_shardings, never whole on one device."""
        with self.rules_context():
            return jax.jit(
                lambda: init_params(self.model_cfg, seed), out_shardings=self.shardings
            )()

    def meta(self, tokenizer_sha256: str | None) -> dict:
        return checkpoint_meta(self.model_cfg, tokenizer_sha256)

    def restore(self, ckpt: Checkpointer, step: int, tokenizer_sha256: str | None) -> dict:
        """The parameters of checkpoint `step`, straight into this layout; the checkpoint's
        model config and tokenizer must agree (a one-line CheckpointError otherwise)."""
        return ckpt.restore_params(step, self.abstract, expect_meta=self.meta(tokenizer_sha256))

    def merge(self, params: Any) -> nnx.Module:
        """The NNX module holding `params`."""
        return nnx.merge(self.graphdef, params)

    def transformed(self, params: dict, names: Sequence[str]) -> tuple[dict, ModelState]:
        """`params` through the named transforms (jaxlm/transforms.py), placed in the layout of
        the model they then belong to; returns that model's state too (self when unchanged)."""
        params, model_cfg = transforms.apply(names, params, self.model_cfg)
        ms = self if model_cfg == self.model_cfg else self.build(model_cfg, self.mesh, self.rules)
        if jax.tree.structure(params) != jax.tree.structure(ms.abstract):
            raise ValueError(
                f"model.transforms={','.join(names)}: the parameters no longer fit the model "
                "config the transforms returned; a transform that adds or drops parameters "
                "must return the config of that model"
            )
        # Transforms compute eagerly; the result goes back into the model's layout.
        return jax.device_put(params, ms.shardings), ms


def open_checkpoint(config, workdir, step: int | None) -> tuple[Checkpointer, int]:
    """A run's checkpointer (train.checkpoint_dir, or WORKDIR/checkpoints) and the step to
    restore (the latest when None), checked: a missing step names the ones saved."""
    return open_step(config_lib.checkpoint_dir(config, workdir), step, workdir)


# Reads checkpoint `step` into a model state's layout: (model state, checkpointer, step,
# tokenizer sha256) -> parameters. ModelState.restore is the plain one.
Reader = Callable[[ModelState, Checkpointer, int, "str | None"], dict]


@dataclasses.dataclass(frozen=True)
class OpenedRun:
    """A run's checkpoint ready for use (see `open_run`)."""

    params: dict
    model: ModelState
    step: int


def open_run(
    workdir: str | Path,
    config,
    step: int | None,
    mesh: Mesh,
    tokenizer_sha256: str | None,
    *,
    fit_model: Callable[[TransformerConfig], TransformerConfig] | None = None,
    check_meta: Callable[[dict], None] | None = None,
    read: Reader | None = None,
) -> OpenedRun:
    """Checkpoint `step` of the run in `workdir` (the latest when None) for use: the model
    `config` describes, with the vocabulary the checkpoint's meta records, built on `mesh`; its
    parameters restored (checked against that model and tokenizer), then put through the run's
    model.transforms. No optimizer state and no data are read.

    `check_meta` sees the meta first (for a caller's own clearer errors); `fit_model` changes
    fields that change no parameter before the build; `read` replaces the plain restore (a LoRA
    run's adapters merged into their base).
    """
    names = transforms.check(config_lib.transform_names(config))
    ckpt, step = open_checkpoint(config, workdir, step)
    try:
        meta = ckpt.read_meta(step)
        if check_meta is not None:
            check_meta(meta)
        saved = saved_model_config(meta, ckpt.directory / str(step))
        model_cfg = config_lib.model_config(config, saved.vocab_size)
        if fit_model is not None:
            model_cfg = fit_model(model_cfg)
        model = ModelState.build(model_cfg, mesh, config.mesh.rules)
        params = (read or ModelState.restore)(model, ckpt, step, tokenizer_sha256)
    finally:
        ckpt.close()
    params, model = model.transformed(params, names)
    return OpenedRun(params, model, step)
