"""Pruning the block kernels: sparsity masks (unstructured, N:M) and structured shrinking.

Targets are the matmul kernels of every block: attention query, key, value and out (self and
cross) and the MLP's up, gate and down; never embeddings, norms or heads. Each kernel is a
matrix [inputs, outputs] (attention's out kernel [N, H, D] has N*H inputs).

Scores: `magnitude` |W|; `wanda` |W| x the L2 norm of that input over calibration tokens
(Sun et al. 2023, calibrate.py collects the norms). Sparsity is per matrix: magnitude ranks the
whole matrix, Wanda each output's inputs (the paper's comparison group), and N:M keeps the N
largest of every M consecutive inputs of each output (2:4 is what sparse tensor cores run).
Each group prunes exactly round(sparsity x its size) weights.

Masks live in the run (RUN/masks.safetensors, named by train.masks): a fine-tune from it starts
with masked weights at zero and drops their updates (`apply_masks` in the train step), so the
sparsity stays exact. Structured pruning removes whole KV groups (a KV head and its query
heads) and MLP neurons, the same number in every block: a smaller model config and checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save

from jaxlm import sharding
from jaxlm.compress import calibrate, runs
from jaxlm.config import ConfigError
from jaxlm.models.spec import TransformerConfig

TARGET = re.compile(
    r"(^|/)blocks/\d+/(attn|cross_attn|mlp)/(query|key|value|out|up|gate|down)/kernel$"
)
METHODS = ("magnitude", "wanda")


def is_target(name: str) -> bool:
    return TARGET.search(name) is not None


def num_inputs(name: str) -> int:
    """Leading axes of a target kernel that are its inputs (attention's out: heads and kv)."""
    return 2 if name.endswith("/out/kernel") else 1


def flat(tree) -> dict:
    """{path name: leaf}."""
    return {sharding.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def targets(params) -> dict:
    """{path name: kernel} of the pruned kernels."""
    return {n: x for n, x in flat(params).items() if is_target(n)}


def scores(name: str, kernel: np.ndarray, norms: dict | None) -> np.ndarray:
    """[inputs, outputs] importance of a kernel's weights (|W|, times input norms for wanda)."""
    n_in = num_inputs(name)
    w = np.abs(np.asarray(kernel, np.float32))
    w = w.reshape(int(np.prod(w.shape[:n_in])), -1)
    if norms is None:
        return w
    return w * np.asarray(norms[name], np.float32).reshape(-1, 1)


def _lowest(score: np.ndarray, k: int, axis: int) -> np.ndarray:
    """A 0/1 mask dropping the k lowest scores along `axis` (ties: the first index goes)."""
    order = np.argsort(score, axis=axis, kind="stable")
    drop = np.take(order, np.arange(k), axis=axis)
    mask = np.ones(score.shape, bool)
    np.put_along_axis(mask, drop, False, axis=axis)
    return mask


def mask_matrix(score: np.ndarray, sparsity: float, per_output: bool) -> np.ndarray:
    """Unstructured mask of an [inputs, outputs] score: per matrix, or per output column."""
    if per_output:
        return _lowest(score, round(sparsity * score.shape[0]), axis=0)
    return _lowest(score.reshape(-1), round(sparsity * score.size), axis=0).reshape(score.shape)


def mask_n_m(score: np.ndarray, n: int, m: int, name: str) -> np.ndarray:
    """Keep the n largest of every m consecutive inputs of each output."""
    inputs, outputs = score.shape
    if inputs % m:
        raise ValueError(f"--pattern {n}:{m}: {name} has {inputs} inputs, not a multiple of {m}")
    groups = score.reshape(inputs // m, m, outputs)
    return _lowest(groups, m - n, axis=1).reshape(inputs, outputs)


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), checked: a one-line ValueError naming --pattern."""
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise ValueError(f"--pattern {text!r}: write N:M with 0 < N < M, e.g. 2:4")
    return n, m


def make_masks(
    params, method: str, *, sparsity: float = 0.0, pattern: str = "", norms: dict | None = None
) -> dict:
    """{kernel path: bool mask of its shape} for every target kernel."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"--sparsity {sparsity}: must be in [0, 1)")
    if method == "wanda" and norms is None:
        raise ValueError("wanda needs the calibration input norms (calibrate.input_norms)")
    n_m = parse_pattern(pattern) if pattern else None
    out = {}
    for name, kernel in targets(params).items():
        s = scores(name, jax.device_get(kernel), norms if method == "wanda" else None)
        if n_m:
            m = mask_n_m(s, *n_m, name)
        else:
            m = mask_matrix(s, sparsity, per_output=method == "wanda")
        out[name] = m.reshape(kernel.shape)
    return out


def apply_masks(tree, masks: dict | None):
    """`tree` (parameters or updates) with masked entries set to zero; None: unchanged."""
    if not masks:
        return tree

    def keep(path, x):
        m = masks.get(sharding.path_name(path))
        return x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))

    return jax.tree_util.tree_map_with_path(keep, tree)


def sparsity_of(masks: dict) -> dict:
    """{kernel path: share of zeros in its mask}."""
    return {n: float(1.0 - np.mean(np.asarray(m))) for n, m in masks.items()}


def load_masks(path: str, model) -> dict:
    """train.masks as {kernel path: bool array}, placed in the parameters' shardings; a
    one-line ConfigError for a missing file or a mask that fits no parameter of `model`."""
    try:
        loaded = load_file(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"train.masks={path}: cannot read it ({e}); point it at the masks.safetensors "
            "that jaxlm-compress prune wrote"
        ) from None
    shapes, shardings = flat(model.abstract), flat(model.shardings)
    out = {}
    for name, m in loaded.items():
        if name not in shapes or tuple(m.shape) != tuple(shapes[name].shape):
            want = tuple(shapes[name].shape) if name in shapes else "no such parameter"
            raise ConfigError(
                f"train.masks={path}: mask {name} {tuple(m.shape)} does not fit this model "
                f"({want}); use the model config of the run the masks were made for"
            )
        out[name] = jax.device_put(np.asarray(m, bool), shardings[name])
    return out


# --- Structured: whole KV groups and MLP neurons -------------------------------------------

# Leaf (relative to an attention or MLP module) -> (axis, which indices slice it).
_SLICES = {
    "query/kernel": (1, "heads"),
    "query/bias": (0, "heads"),
    "key/kernel": (1, "groups"),
    "key/bias": (0, "groups"),
    "value/kernel": (1, "groups"),
    "value/bias": (0, "groups"),
    "out/kernel": (0, "heads"),
    "up/kernel": (1, "neurons"),
    "up/bias": (0, "neurons"),
    "gate/kernel": (1, "neurons"),
    "gate/bias": (0, "neurons"),
    "down/kernel": (0, "neurons"),
}
_MODULE = re.compile(r"^(?P<module>(.*/)?blocks/\d+/(attn|cross_attn|mlp))/(?P<leaf>\w+/\w+)$")


def _top(score: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores, in their original order."""
    return np.sort(np.argsort(-score, kind="stable")[:keep])


def structured_keep(
    params, cfg: TransformerConfig, heads: float, neurons: float, norms: dict | None
) -> tuple[dict, TransformerConfig]:
    """({module path: {"heads", "groups" | "neurons": kept indices}}, the smaller config).

    A KV group scores the sum over its query heads of ||norm x W_out[n]|| (norm = 1 for
    magnitude); a neuron ||norm_f x W_down[f]|| x ||W_up[:, f]||. Each block drops the
    round(fraction x count) lowest, at least one group and one neuron stay.
    """
    for flag, v in (("--heads", heads), ("--neurons", neurons)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{flag} {v}: must be in [0, 1)")
    if heads and cfg.positions == "relative":
        raise ValueError(
            "--heads: model.positions=relative shares one bias table over every block's heads; "
            "prune --neurons only"
        )
    k, g = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    if abs(heads * k - round(heads * k)) > 1e-6:
        raise ValueError(
            f"--heads {heads} is {heads * k:g} of the {k} KV groups per block, and only whole "
            f"groups (a KV head with its {g} query heads) can go; use a multiple of {1 / k:g}"
        )
    keep_groups = k - min(round(heads * k), k - 1)
    keep_neurons = cfg.d_ff - min(round(neurons * cfg.d_ff), cfg.d_ff - 1)
    p = {n: np.asarray(jax.device_get(x), np.float32) for n, x in flat(params).items()}
    keep: dict[str, dict] = {}
    for name in p:
        m = _MODULE.match(name)
        if not m or m["leaf"] not in ("out/kernel", "down/kernel"):
            continue
        w = p[name]
        norm = 1.0 if norms is None else np.asarray(norms[name], np.float32)[..., None]
        if m["leaf"] == "out/kernel":  # [N, H, D]
            head = np.sqrt(np.sum(np.square(norm * w), axis=(1, 2)))
            groups = _top(head.reshape(k, g).sum(axis=1), keep_groups)
            kept = (groups[:, None] * g + np.arange(g)).reshape(-1)
            keep[m["module"]] = {"groups": groups, "heads": kept}
        else:  # down [F, D]; up [D, F]
            up = p[name.replace("down/kernel", "up/kernel")]
            score = np.linalg.norm(norm * w, axis=1) * np.linalg.norm(up, axis=0)
            keep[m["module"]] = {"neurons": _top(score, keep_neurons)}
    new_cfg = dataclasses.replace(
        cfg,
        num_heads=keep_groups * g,
        num_kv_heads=keep_groups,
        head_dim=cfg.head_dim,
        d_ff=keep_neurons,
    )
    return keep, new_cfg


def shrink(params, keep: dict):
    """`params` with each module's leaves cut to the kept heads, groups and neurons (host
    numpy arrays: the caller places them, e.g. in the smaller model's shardings)."""

    def cut(path, x):
        m = _MODULE.match(sharding.path_name(path))
        if not m or m["module"] not in keep or m["leaf"] not in _SLICES:
            return x
        axis, which = _SLICES[m["leaf"]]
        idx = keep[m["module"]].get(which)
        return x if idx is None else np.take(x, idx, axis=axis)

    return jax.tree_util.tree_map_with_path(cut, jax.device_get(params))


def structured(params, cfg, *, heads: float, neurons: float, norms: dict | None = None):
    """(smaller params, smaller config): a transform of (params, config)."""
    keep, new_cfg = structured_keep(params, cfg, heads, neurons, norms)
    return shrink(params, keep), new_cfg


# --- A run into a pruned run ---------------------------------------------------------------

MASKS_FILE = "masks.safetensors"


@dataclasses.dataclass(frozen=True)
class PruneRequest:
    method: str = "magnitude"  # magnitude or wanda
    sparsity: float = 0.0  # unstructured share per matrix
    pattern: str = ""  # N:M semi-structured, e.g. 2:4
    heads: float = 0.0  # structured: share of KV groups removed per block
    neurons: float = 0.0  # structured: share of MLP neurons removed per block
    calibration_batches: int = 8  # wanda: training batches whose inputs give the norms

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        for flag, v in (("--sparsity", self.sparsity), ("--heads", self.heads)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{flag} {v}: must be in [0, 1)")
        if not 0.0 <= self.neurons < 1.0:
            raise ValueError(f"--neurons {self.neurons}: must be in [0, 1)")
        if self.pattern:
            parse_pattern(self.pattern)
        masked = bool(self.sparsity or self.pattern)
        shrunk = bool(self.heads or self.neurons)
        if masked == shrunk:
            raise ValueError(
                "prune needs one kind: --sparsity or --pattern (masks), or --heads and/or "
                "--neurons (a smaller model); prune the result again for both"
            )
        if self.sparsity and self.pattern:
            raise ValueError("--sparsity and --pattern: give one (N:M fixes the sparsity)")
        if self.method == "wanda" and self.calibration_batches < 1:
            raise ValueError("--calibration_batches must be >= 1 for --method wanda")


def prune_run(workdir, out, request: PruneRequest, step: int | None = None, devices=None) -> dict:
    """Prune run `workdir` into the new run `out`; returns the record saved in compress.json."""
    request.check()
    runs.check_out(out)  # before any restore
    src = runs.SourceRun.open(workdir, step, devices)
    norms = None
    if request.method == "wanda":
        data = src.data()
        batches = src.calibration_batches(data, request.calibration_batches)
        names = sorted(targets(src.params))
        norms = calibrate.input_norms(src.model, src.eval_sums(data), src.params, batches, names)
    record = {"prune": dataclasses.asdict(request)}
    record["params_before"] = int(sum(x.size for x in jax.tree.leaves(src.params)))
    files: dict[str, bytes] = {}
    if request.heads or request.neurons:
        params, model_cfg = structured(
            src.params,
            src.model.model_cfg,
            heads=request.heads,
            neurons=request.neurons,
            norms=norms,
        )
        small = src.model.build(model_cfg, src.model.mesh, src.model.rules)
        params = jax.device_put(params, small.shardings)
        config = runs.config_for(src.config, model_cfg, masks="")
    else:
        masks = make_masks(
            src.params,
            request.method,
            sparsity=request.sparsity,
            pattern=request.pattern,
            norms=norms,
        )
        params, model_cfg = apply_masks(src.params, masks), src.model.model_cfg
        path = str(Path(out).absolute() / MASKS_FILE)
        config = runs.config_for(src.config, model_cfg, masks=path)
        files[MASKS_FILE] = save({n: np.asarray(m, np.uint8) for n, m in masks.items()})
        record["sparsity"] = sparsity_of(masks)
    record["params_after"] = int(sum(x.size for x in jax.tree.leaves(params)))
    record["model"] = {
        "num_heads": model_cfg.num_heads,
        "num_kv_heads": model_cfg.num_kv_heads,
        "d_ff": model_cfg.d_ff,
    }
    runs.write_run(out, src, config, params, model_cfg, files, record)
    return record
