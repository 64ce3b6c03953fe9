"""Fine-tuning: start from a trained run's parameters (train.init_from), freeze some (train.freeze).

`load_pretrained` matches parameters by path ('blocks/0/attn/query/kernel'): every parameter of
this model that the pretrained run has with the same shape is taken from its checkpoint, the rest
(new heads) keep their fresh initialization, and pretrained parameters this model lacks are
dropped. So a decoder LM can start a decoder classifier and an encoder MLM an encoder
classifier; a differing model.* dimension is an error naming the parameters.

`freeze_mask` turns train.freeze's comma-separated regexes into the tree of bools that
`optim.make_optimizer` takes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import sharding, state, transforms
from jaxlm.checkpoint import CheckpointError
from jaxlm.config import ConfigError, parse_init_from

_SHOWN = 5  # parameters named in one error or summary line before "(+N more)"


def flat_params(tree) -> dict:
    """{path name: leaf} of a parameter tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {sharding.path_name(p): leaf for p, leaf in leaves}


def _listing(names, limit: int = _SHOWN) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _prefixed(key: str, fn, *args):
    """fn(*args), with `key: ` in front of a CheckpointError's message."""
    try:
        return fn(*args)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None


def _restore_sharding(leaf, axes, mesh, rules) -> NamedSharding:
    """The rules' sharding for a pretrained-only parameter; replicated if a dim does not divide."""
    spec = sharding.logical_to_spec(axes, rules)
    for dim, entry in zip(leaf.shape, spec, strict=False):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        if dim % math.prod(mesh.shape[n] for n in names):
            return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, spec)


def load_pretrained(
    init_from: str, params: dict, rules, tokenizer_sha256: str | None
) -> tuple[dict, dict]:
    """This model's `params` (freshly initialized, sharded) with the pretrained run's matches.

    `init_from` is WORKDIR[:STEP] (the latest step when left out), `rules` this run's
    mesh.rules, `tokenizer_sha256` this run's (None: not checked). The pretrained parameters
    are restored and passed through that run's model.transforms (jaxlm/transforms.py), as every
    program that uses a run does; the matches are then placed in `params`' shardings and cast
    to their dtypes. Returns (params, report), report = {"loaded", "new", "dropped": [paths],
    "step": int, "workdir": str}. Raises a one-line ConfigError or CheckpointError for a
    missing run, step or checkpoint, another tokenizer, parameters of another shape, or no
    parameter in common.
    """
    workdir, step = parse_init_from(init_from)
    key = f"train.init_from={init_from}"
    if not (Path(workdir) / "config.json").is_file():  # as config.load_run_config looks for it
        raise ConfigError(
            f"{key}: {workdir}/config.json not found; point it at the --workdir of a trained run"
        )
    try:
        src_config = config_lib.load_run_config(workdir)
        names = transforms.check(config_lib.transform_names(src_config))
        ckpt, step = state.open_checkpoint(src_config, workdir, step)
    except (ConfigError, CheckpointError) as e:
        raise type(e)(f"{key}: {e}") from None
    # The checkpoint's errors name its directory; the prefix names the key that led there.
    try:
        where = f"{ckpt.directory}/{step}"
        meta = _prefixed(key, ckpt.read_meta, step)
        theirs = meta.get("tokenizer_sha256")
        if theirs is not None and tokenizer_sha256 is not None and theirs != tokenizer_sha256:
            raise ConfigError(
                f"{key}: the pretrained run used tokenizer sha256 {theirs[:12]}, this run "
                f"{tokenizer_sha256[:12]}; leave data.tokenizer empty so the pretrained run's "
                "tokenizer is used (token ids must mean the same)"
            )
        src_cfg = _prefixed(key, state.saved_model_config, meta, where)
        if src_cfg.quant != "none":  # integer kernels would be taken as float values
            raise ConfigError(
                f"{key}: {workdir} is quantized (model.quant={src_cfg.quant}); start from the "
                "float run it was quantized from"
            )
        _, src_abstract, src_axes = state.abstract_model(src_cfg)
        # Checked on shapes, before anything is read.
        ours = flat_params(params)
        shapes, _ = transforms.apply_abstract(names, src_abstract, src_cfg)
        _check_matches(key, workdir, ours, flat_params(shapes))
        shardings = [getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(params)]
        if not all(isinstance(sh, NamedSharding) for sh in shardings):
            raise TypeError("load_pretrained needs params with NamedShardings (create_state's)")
        mesh = shardings[0].mesh
        # Restored in the rules' layout (replicated where a dim does not divide): never whole
        # on one device.
        abstract = jax.tree.map(
            lambda leaf, axes: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=_restore_sharding(leaf, axes, mesh, rules)
            ),
            src_abstract,
            src_axes,  # its tuples sit where src_abstract has leaves: taken whole
        )
        restored = _prefixed(key, ckpt.restore_params, step, abstract)
    finally:
        ckpt.close()
    src = flat_params(transforms.apply(names, restored, src_cfg)[0])
    common = [n for n in ours if n in src]

    def pick(path, fresh):
        name = sharding.path_name(path)
        if name not in src:
            return fresh
        return jax.device_put(src[name].astype(fresh.dtype), fresh.sharding)

    merged = jax.tree_util.tree_map_with_path(pick, params)
    report = {
        "loaded": common,
        "new": [n for n in ours if n not in src],
        "dropped": [n for n in src if n not in ours],
        "step": step,
        "workdir": workdir,
    }
    return merged, report


def _check_matches(key: str, workdir: str, ours: dict, src: dict) -> None:
    """A one-line ConfigError unless the parameters both models have agree in shape and there
    is at least one."""
    common = [n for n in ours if n in src]
    wrong = [n for n in common if tuple(ours[n].shape) != tuple(src[n].shape)]
    if wrong:
        details = [
            f"{n}: pretrained {tuple(src[n].shape)} vs {tuple(ours[n].shape)}" for n in wrong
        ]
        raise ConfigError(
            f"{key}: {len(wrong)} parameter(s) differ in shape from the pretrained run "
            f"({_listing(details)}); make model.* match {workdir}/config.json"
        )
    if not common:
        raise ConfigError(
            f"{key}: none of the pretrained run's {len(src)} parameters (e.g. "
            f"{_listing(sorted(src), 3)}) is in this model (e.g. {_listing(sorted(ours), 3)});"
            " fine-tune a model of the same model.family"
        )


def summary_line(report: dict) -> str:
    """One console line: what init_from loaded, what is freshly initialized, what was dropped."""
    line = (
        f"init_from {report['workdir']} step {report['step']}: "
        f"loaded {len(report['loaded'])} parameters"
    )
    if report["new"]:
        line += f"; new: {_listing(report['new'], 8)}"
    if report["dropped"]:
        line += f"; dropped: {_listing(report['dropped'], 8)}"
    return line


def normalized_patterns(patterns: str) -> str:
    """train.freeze without blanks around its comma-separated patterns ("a, b" -> "a,b")."""
    return ",".join(p.strip() for p in patterns.split(",") if p.strip())


def trained_only(tree, frozen) -> list:
    """The leaves of `tree` whose `frozen` mask leaf is False (all of them when frozen is None)."""
    leaves = jax.tree.leaves(tree)
    if frozen is None:
        return leaves
    return [x for x, f in zip(leaves, jax.tree.leaves(frozen), strict=True) if not f]


def freeze_mask(abstract_params, patterns: str):
    """True for parameters whose path matches one of the comma-separated regexes (re.search).

    None when `patterns` is empty: nothing is frozen. A pattern that matches nothing, or
    patterns that freeze every parameter, are ConfigErrors.
    """
    regexes = []
    for text in filter(None, normalized_patterns(patterns).split(",")):
        try:
            regexes.append((text, re.compile(text)))
        except re.error as e:
            raise ConfigError(f"train.freeze pattern {text!r} is not a regex ({e})") from None
    if not regexes:
        return None
    names = list(flat_params(abstract_params))
    for text, rx in regexes:
        if not any(rx.search(n) for n in names):
            raise ConfigError(
                f"train.freeze pattern {text!r} matches no parameter; paths look like "
                f"{_listing(names, 4)}"
            )
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: any(rx.search(sharding.path_name(p)) for _, rx in regexes), abstract_params
    )
    if all(jax.tree.leaves(mask)):
        raise ConfigError(
            f"train.freeze={patterns!r} freezes every parameter, so nothing would train; "
            "narrow the patterns"
        )
    return mask
