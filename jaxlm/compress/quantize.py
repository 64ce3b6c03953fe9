"""Post-training weight quantization of a run into a new run: int8, or int4 in groups.

`quantize_run(workdir, out, kind, group_size)` restores a float run (through its model.transforms),
rounds every block matmul kernel (attention query/key/value/out and the MLP's) to integers with
fp32 scales (jaxlm/models/quant.py) and writes OUT, whose config says model.quant and
model.quant_group_size: its checkpoint stores the integer kernels (int8, or int4 packed two to a
uint8), and every program that builds its model (jaxlm-eval, jaxlm-generate,
LanguageModel.load) builds the quantized layers, which dequantize before each einsum. Embeddings,
norms and heads stay float.

`int8` and `int4` are also parameter transforms (model.transforms=jaxlm.compress.quantize:int8)
that quantize a float run as it is loaded, without writing a new run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from jaxlm import config as config_lib
from jaxlm.compress import paths, runs
from jaxlm.config import ConfigError
from jaxlm.models import quant
from jaxlm.models.spec import TransformerConfig


def quantize_params(
    params: dict, model_cfg: TransformerConfig, kind: str, group_size: int = 0
) -> tuple[dict, TransformerConfig]:
    """(params with integer kernels and scales, the quantized model's config) of a float model.

    A group size that does not divide a kernel's input is a one-line ValueError naming it.
    """
    if kind not in quant.QMAX:
        raise ConfigError(f"--bits: quantize to int8 or int4, not {kind!r}")
    if model_cfg.quant != "none":
        raise ConfigError(
            f"model.quant={model_cfg.quant}: the run is already quantized; quantize the float "
            "run it came from"
        )
    qcfg = dataclasses.replace(model_cfg, quant=kind, quant_group_size=group_size, qat=False)
    layers = [(p, m) for p, m in paths.dense_layers(qcfg) if m.quant != "none"]
    for path, layer in layers:  # every kernel checked before any work
        where = "/".join(map(str, path)) + "/kernel"
        quant.check_kernel(kind, layer.in_shape, group_size, where)
    out = paths.copy_tree(params)
    for path, layer in layers:
        node = paths.at(out, path)
        node["kernel"], node["scale"] = quant.quantize_kernel(
            node["kernel"], layer.n_in, kind, group_size
        )
    return out, qcfg


def int8(params: dict, model_cfg: TransformerConfig) -> tuple[dict, TransformerConfig]:
    """Transform: int8 weights, one scale per output channel."""
    return quantize_params(params, model_cfg, "int8", 0)


def int4(params: dict, model_cfg: TransformerConfig) -> tuple[dict, TransformerConfig]:
    """Transform: int4 weights, one scale per 32 input rows and output."""
    return quantize_params(params, model_cfg, "int4", 32)


def quantize_run(
    workdir: str | Path,
    out: str | Path,
    bits: int,
    group_size: int = 0,
    step: int | None = None,
    devices=None,
) -> dict:
    """Write OUT: the run in WORKDIR (its latest step unless `step`) with int`bits` kernels."""
    if bits not in (4, 8):
        raise ConfigError(f"--bits={bits}: use 8 (int8) or 4 (int4)")
    if group_size < 0:
        raise ConfigError(f"--group_size={group_size} must be >= 0 (0: one scale per output)")
    runs.check_out(out)  # and the source, before any restore
    config = config_lib.load_run_config(workdir)
    if config.model.quant != "none":
        raise ConfigError(
            f"model.quant={config.model.quant}: {workdir} is already quantized; quantize the "
            "float run it came from"
        )
    if config.train.lora_rank > 0:
        raise ConfigError(
            f"{workdir} is a LoRA run (train.lora_rank={config.train.lora_rank}), its checkpoint "
            "holds adapters only: run jaxlm-compress merge-lora first, then quantize the merged run"
        )
    src = runs.SourceRun.open(workdir, step, devices)
    kind = f"int{bits}"
    qparams, qcfg = quantize_params(src.params, src.model.model_cfg, kind, group_size)
    qms = src.model.build(qcfg, src.model.mesh, src.model.rules)
    qparams = jax.device_put(qparams, qms.shardings)
    record = {"quant": kind, "group_size": group_size}
    new_config = runs.config_for(src.config, qcfg, qat=False)
    runs.write_run(out, src, new_config, qparams, qcfg, {}, record)
    return {"out": str(out), "step": src.step, **record}
