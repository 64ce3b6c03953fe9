"""LoRA: low-rank adapters on chosen kernels of a frozen base run, merged as a parameter transform.

train.lora_rank > 0 makes the trainer hold and update only the adapters: for each DenseGeneral
kernel W [in..., out...] whose path ('blocks/0/attn/query/kernel') matches one of
train.lora_targets' regexes, A [in..., r] and B [r, out...] with B = 0, and the model runs on
W + (alpha / r) * A @ B. The merge happens inside the jitted step, so every entry point of the
model (forward, KV-cache decoding, scoring) sees the adapted kernel, and a fresh adapter leaves
the base exactly as it was (W + 0). The base parameters come from train.init_from (through that
run's model.transforms) on every start and resume; they are an argument of the step, not part of
the train state, so they get no gradient, no optimizer state and are never saved: a LoRA
checkpoint holds the adapters (and their optimizer state) alone. `merge_run` writes a plain run.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxlm import config as config_lib
from jaxlm import finetune, sharding, state
from jaxlm.compress import paths, runs
from jaxlm.config import ConfigError
from jaxlm.state import ModelState


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its module path, input rank and kernel shape."""

    path: tuple  # keys from the model root to the DenseGeneral ('blocks', 0, 'attn', 'query')
    n_in: int
    shape: tuple

    @property
    def name(self) -> str:
        return "/".join(str(k) for k in self.path)

    @property
    def sizes(self) -> tuple[int, int]:
        return math.prod(self.shape[: self.n_in]), math.prod(self.shape[self.n_in :])


@dataclasses.dataclass(frozen=True, eq=False)
class LoraPlan:
    """Which kernels carry adapters, their rank and scale, and the adapters' layout."""

    rank: int
    alpha: float
    targets: tuple[Target, ...]
    abstract: dict  # ShapeDtypeStructs of the adapters, with their shardings
    shardings: dict

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def num_trainable(self) -> int:
        """rank x (in + out) summed over the adapted kernels."""
        return sum(self.rank * sum(t.sizes) for t in self.targets)

    def meta(self, init_from: str) -> dict:
        """What a LoRA checkpoint must agree with to be resumed (saved in its meta)."""
        names = [t.name for t in self.targets]
        return {"rank": self.rank, "alpha": self.alpha, "targets": names, "init_from": init_from}


def make_plan(train_cfg, ms: ModelState) -> LoraPlan:
    """The adapters train.lora_* asks for on the model `ms`; one-line ConfigErrors otherwise."""
    rank, alpha = train_cfg.lora_rank, float(train_cfg.lora_alpha)
    if not train_cfg.init_from:
        raise ConfigError(
            "train.lora_rank > 0 needs train.init_from=WORKDIR[:STEP]: the base run whose "
            "kernels the adapters modify"
        )
    patterns = finetune.normalized_patterns(train_cfg.lora_targets).split(",")
    regexes = []
    for text in filter(None, patterns):
        try:
            regexes.append((text, re.compile(text)))
        except re.error as e:
            raise ConfigError(f"train.lora_targets pattern {text!r} is not a regex ({e})") from None
    if not regexes:
        raise ConfigError("train.lora_targets is empty; name kernels, e.g. attn/query,attn/value")
    if ms.model_cfg.quant != "none":
        raise ConfigError(
            "train.lora_rank on a quantized run (model.quant): train adapters on the float run"
        )
    layers = paths.dense_layers(ms.model_cfg)
    names = ["/".join(map(str, p)) + "/kernel" for p, _ in layers]
    for text, rx in regexes:
        if not any(rx.search(n) for n in names):
            raise ConfigError(
                f"train.lora_targets pattern {text!r} matches no kernel; kernel paths look like "
                f"{', '.join(names[:4])}"
            )
    targets = []
    for (path, layer), name in zip(layers, names, strict=True):
        if any(rx.search(name) for _, rx in regexes):
            shape = (*layer.in_shape, *layer.out_shape)
            targets.append(Target(path, layer.n_in, shape))
    smallest = min(targets, key=lambda t: min(t.sizes))
    if not 1 <= rank <= min(smallest.sizes):
        raise ConfigError(
            f"train.lora_rank={rank} must be in [1, {min(smallest.sizes)}]: {smallest.name}/kernel "
            f"is {smallest.sizes[0]} -> {smallest.sizes[1]}"
        )
    return _layout(rank, alpha, tuple(targets), ms)


def _layout(rank: int, alpha: float, targets: tuple[Target, ...], ms: ModelState) -> LoraPlan:
    """The adapters' shapes (the kernel's dtype) and shardings: A keeps the kernel's input axes,
    B its output axes; the rank axis is replicated."""
    shapes, axes = {}, {}
    for t in targets:
        k, k_axes = paths.at(ms.abstract, t.path)["kernel"], paths.at(ms.axes, t.path)["kernel"]
        paths.put(
            shapes,
            t.path,
            {
                "lora_a": jax.ShapeDtypeStruct((*t.shape[: t.n_in], rank), k.dtype),
                "lora_b": jax.ShapeDtypeStruct((rank, *t.shape[t.n_in :]), k.dtype),
            },
        )
        paths.put(
            axes,
            t.path,
            {
                "lora_a": (*k_axes[: t.n_in], None),
                "lora_b": (None, *k_axes[t.n_in :]),
            },
        )
    shardings = sharding.param_shardings(shapes, axes, ms.mesh, ms.rules)
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings
    )
    return LoraPlan(rank, alpha, targets, abstract, shardings)


def init_adapters(plan: LoraPlan, seed: int) -> dict:
    """Fresh adapters (call under jit with out_shardings=plan.shardings): A uniform in
    +-1/sqrt(in) (PEFT's kaiming-uniform bound), B zero, so W + A @ B = W exactly."""
    key = jax.random.fold_in(jax.random.key(seed), 3)
    out = {}
    for i, t in enumerate(plan.targets):
        a = paths.at(plan.abstract, t.path)
        bound = 1.0 / math.sqrt(t.sizes[0])
        shape, dt = a["lora_a"].shape, a["lora_a"].dtype
        lora_a = jax.random.uniform(jax.random.fold_in(key, i), shape, dt, -bound, bound)
        paths.put(out, t.path, {"lora_a": lora_a, "lora_b": jnp.zeros(a["lora_b"].shape, dt)})
    return out


def delta(lora_a, lora_b):
    """A @ B over the rank axis, in fp32: [in..., r] x [r, out...] -> [in..., out...]."""
    return jnp.tensordot(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), axes=1)


def merge(base: dict, adapters: dict, plan: LoraPlan) -> dict:
    """`base` with W + scale * A @ B in each adapted kernel, computed in fp32 and cast back to
    the kernel's dtype; every other parameter is `base`'s own array."""
    merged = paths.copy_tree(base)
    for t in plan.targets:
        node, ad = paths.at(merged, t.path), paths.at(adapters, t.path)
        w = node["kernel"]
        update = w.astype(jnp.float32) + plan.scale * delta(ad["lora_a"], ad["lora_b"])
        node["kernel"] = update.astype(w.dtype)
    return merged


def load_base(init_from: str, ms: ModelState, tokenizer_sha256: str | None) -> dict:
    """The frozen base parameters: every one of them from train.init_from (a LoRA run trains no
    fresh parameter), in `ms`'s layout."""
    zeros = jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), ms.abstract),
        out_shardings=ms.shardings,
    )()
    params, report = finetune.load_pretrained(init_from, zeros, ms.rules, tokenizer_sha256)
    if report["new"]:
        raise ConfigError(
            f"train.init_from={init_from} lacks {len(report['new'])} parameter(s) of this model "
            f"({', '.join(report['new'][:3])}); LoRA trains only adapters, so the base run must "
            "have every parameter: make model.* match its config.json"
        )
    return params


def restore_run(workdir: str | Path, step: int | None = None, devices=None, base: bool = True):
    """(config, plan, adapters, base params, model state, step, meta) of a LoRA run's
    checkpoint (the latest unless `step`), its base restored from its train.init_from (None
    when not `base`)."""
    config = config_lib.load_run_config(workdir)
    if config.train.lora_rank <= 0:
        raise ConfigError(
            f"{workdir} is not a LoRA run (its train.lora_rank is 0): nothing to merge"
        )
    mesh = sharding.mesh_from_config(config.mesh, devices)
    ckpt, step = state.open_checkpoint(config, workdir, step)
    try:
        meta = ckpt.read_meta(step)
        model_cfg = state.saved_model_config(meta, f"{ckpt.directory}/{step}")
        ms = ModelState.build(model_cfg, mesh, config.mesh.rules)
        plan = make_plan(config.train, ms)
        adapters = ckpt.restore_params(step, plan.abstract)
    finally:
        ckpt.close()
    if base:
        base = load_base(config.train.init_from, ms, meta.get("tokenizer_sha256"))
    return config, plan, adapters, base or None, ms, step, meta


def load_merged(config, ms: ModelState, ckpt, step: int, tokenizer_sha256: str | None) -> dict:
    """A LoRA run's checkpoint `step` as the model's parameters: its adapters (checked against
    the model and tokenizer) merged in fp32 into the base they were trained on."""
    plan = make_plan(config.train, ms)
    adapters = ckpt.restore_params(step, plan.abstract, expect_meta=ms.meta(tokenizer_sha256))
    base = load_base(config.train.init_from, ms, tokenizer_sha256)
    with ms.rules_context():
        fn = jax.jit(lambda b, a: merge(b, a, plan), out_shardings=ms.shardings)
        return fn(base, adapters)


def merge_run(workdir: str | Path, out: str | Path, step: int | None = None) -> dict:
    """Write OUT: a plain run whose kernels are the LoRA run's merged ones (fp32 merge)."""
    runs.check_out(out)  # before any restore
    config, plan, adapters, base, ms, step, meta = restore_run(workdir, step)
    with ms.rules_context():
        params = jax.jit(lambda b, a: merge(b, a, plan), out_shardings=ms.shardings)(base, adapters)
    src = runs.SourceRun(Path(workdir), config, ms, params, step, meta.get("tokenizer_sha256"))
    merged = [t.name for t in plan.targets]
    new_config = runs.config_for(config, ms.model_cfg, qat=False)
    runs.write_run(out, src, new_config, params, ms.model_cfg, {}, {"merged_lora": merged})
    return {"out": str(out), "step": step, "merged": merged}
