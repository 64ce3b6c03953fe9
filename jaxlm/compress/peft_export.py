"""A LoRA run's adapters in PEFT's format: adapter_config.json and adapter_model.safetensors.

For a base run imported from Hugging Face (jaxlm-convert import) or one an HF architecture of
jaxlm/interop represents, so `peft.PeftModel.from_pretrained(hf_model, OUT)` applies the same
adapters to the transformers model. Which HF module each adapted kernel is comes from the
interop converter itself: a probe kernel is pushed through its params_to_hf and must land, whole,
in one HF weight, as W = K.T (a Linear) or W = K (GPT-2's Conv1D, PEFT's fan_in_fan_out).
Kernels that HF fuses with others (GPT-2's c_attn holds query, key and value) are refused.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxlm import config as config_lib
from jaxlm import state
from jaxlm.compress import lora, paths
from jaxlm.config import parse_init_from
from jaxlm.interop import convert
from jaxlm.interop.hf_files import ConversionError, write_json

_TASKS = {"lm": "CAUSAL_LM"}


def hf_modules(plan: lora.LoraPlan, abstract: dict, cfg, architecture: str) -> list:
    """(HF module name, fan_in_fan_out) of each adapted kernel, found through params_to_hf."""
    module = convert.ARCHITECTURES[architecture]
    probe = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract)
    found = []
    for t in plan.targets:
        node = paths.at(probe, t.path)
        k = np.arange(1, math.prod(t.shape) + 1, dtype=np.float32).reshape(t.shape)
        node["kernel"] = k
        hit = {n: np.asarray(x) for n, x in module.params_to_hf(probe, cfg, architecture).items()}
        hit = {n: x for n, x in hit.items() if np.any(x)}
        node["kernel"] = np.zeros(t.shape, np.float32)
        k2 = k.reshape(t.sizes)
        if len(hit) != 1 or not next(iter(hit)).endswith(".weight"):
            raise ConversionError(
                f"{t.name}/kernel is not one whole {architecture} weight ({', '.join(hit)}): "
                "PEFT export needs train.lora_targets on unfused kernels"
            )
        ((name, w),) = hit.items()
        if w.shape not in (k2.shape, k2.T.shape):
            raise ConversionError(f"{t.name}/kernel maps to {name} {w.shape}, not {k2.shape}")
        conv1d = w.shape == k2.shape and np.array_equal(w, k2)
        if not (conv1d or np.array_equal(w, k2.T)):
            raise ConversionError(f"{t.name}/kernel maps to {name} permuted; PEFT cannot load it")
        found.append((name.removesuffix(".weight"), conv1d))
    return found


def export_peft(workdir: str | Path, out: str | Path, step: int | None = None) -> dict:
    """Write OUT (a new folder) with the LoRA run's adapters for the base's HF architecture."""
    out = Path(out)
    if out.exists():
        raise ConversionError(f"{out} exists; pass a new output folder (nothing was written)")
    config, plan, adapters, _, ms, step, meta = lora.restore_run(workdir, step, base=False)
    objective = config.task.objective
    if objective not in _TASKS:
        raise ConversionError(f"task.objective={objective}: PEFT export covers {list(_TASKS)}")
    architecture, source = _base_architecture(config, ms.model_cfg)
    modules = hf_modules(plan, ms.abstract, ms.model_cfg, architecture)
    if len({fan for _, fan in modules}) > 1:
        raise ConversionError("adapters on both Linear and Conv1D weights: export them apart")
    tensors = {}
    for t, (name, _) in zip(plan.targets, modules, strict=True):
        ad = jax.device_get(paths.at(adapters, t.path))
        a = np.asarray(ad["lora_a"], np.float32).reshape(t.sizes[0], plan.rank)
        b = np.asarray(ad["lora_b"], np.float32).reshape(plan.rank, t.sizes[1])
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": _TASKS[objective],
        "r": plan.rank,
        "lora_alpha": plan.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": modules[0][1],
        "target_modules": [name for name, _ in modules],
        "base_model_name_or_path": source,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", adapter_config)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "step": step, "architecture": architecture, "tensors": len(tensors)}


def _base_architecture(config, model_cfg) -> tuple[str, str]:
    """(HF architecture, source path) of the LoRA run's base: what jaxlm-convert import recorded
    in its checkpoint, else the first architecture that represents the model."""
    base_dir, base_step = parse_init_from(config.train.init_from)
    base_config = config_lib.load_run_config(base_dir)
    ckpt, base_step = state.open_checkpoint(base_config, base_dir, base_step)
    try:
        imported = ckpt.read_meta(base_step).get("imported_from") or {}
    finally:
        ckpt.close()
    if imported.get("architecture") in convert.ARCHITECTURES:
        return imported["architecture"], imported.get("path", "")
    name, _ = convert.pick_architecture(model_cfg, config.task.objective, {})
    return name, ""
