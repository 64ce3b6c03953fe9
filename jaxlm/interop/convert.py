"""Hugging Face model folders <-> jaxlm run directories, through one table of architectures.

`import_hf(hf_dir, run_dir)` writes a run directory every jaxlm program uses as if jaxlm had
trained it (config.json, an Orbax checkpoint at step 0 with the usual meta, the tokenizer);
`export_hf(run_dir, out_dir)` writes a folder transformers' `from_pretrained` loads;
`load_hf(hf_dir)` converts in memory (`LanguageModel.from_pretrained`). Both writers build in a
temporary folder beside the target and rename it at the end: a failure leaves nothing behind.

A family module (gpt2.py, llama.py, bert.py, t5.py) defines, for the HF classes it lists in
`ARCHITECTURES` (class name -> task.objective):
  config_from_hf(hf, architecture) -> dict of model.* keys (other sections' keys dotted)
  params_from_hf(tensors, cfg, architecture) -> jaxlm's parameter tree (nested dict, blocks by
      int index), popping from `tensors` every tensor it uses; a tensor it needs and lacks is a
      KeyError; what is left afterwards is refused as unexpected here
  config_to_hf(cfg, architecture, special_ids) -> HF config.json dict; a ConversionError when
      the architecture cannot represent cfg (export picks the first architecture that can)
  params_to_hf(params, cfg, architecture) -> {HF tensor name: array}
Layouts are converted there, once; jaxlm -> HF -> jaxlm is bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding, state
from jaxlm.checkpoint import Checkpointer
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.interop import bert, gpt2, hf_files, llama, t5
from jaxlm.interop.hf_files import ConversionError
from jaxlm.models.spec import TransformerConfig

# The family modules, one a line; export tries their architectures in this order.
FAMILIES: tuple[ModuleType, ...] = (
    gpt2,
    llama,
    bert,
    t5,
)
# HF architecture (config.json "architectures") -> the family module converting it.
ARCHITECTURES: dict[str, ModuleType] = {
    name: module for module in FAMILIES for name in module.ARCHITECTURES
}
# Tokenizer files a Hugging Face folder may hold (see jaxlm/data/tokenizer.py's load).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model")
# Rows of an imported run's eval batches and its generation context, at most.
_MAX_SEQ_LEN = 1024


def architecture_of(hf: dict, where: object) -> tuple[str, ModuleType]:
    """The (name, family module) of an HF config's first `architectures` entry."""
    names = hf.get("architectures") or []
    if not names or names[0] not in ARCHITECTURES:
        got = names[0] if names else f"none (model_type={hf.get('model_type')!r})"
        raise ConversionError(
            f"{where}: config.json architectures={got}: jaxlm converts "
            f"{', '.join(sorted(ARCHITECTURES))}; save the model as one of those"
        )
    return names[0], ARCHITECTURES[names[0]]


def run_config(keys: dict, objective: str) -> ml_collections.ConfigDict:
    """A jaxlm run config for a converted model: the base config with the converter's keys
    (model.* keys by name, keys of other sections dotted: "data.tokenizer_mask")."""
    config = config_lib.base_config()
    if objective in config_lib.EXAMPLE_OBJECTIVES:
        # Example fields to read until the user names theirs (seqio's names; a converter's
        # own keys below win: BERT classifiers read "text").
        config.data.input_key, config.data.target_key = "inputs", "targets"
    for key, value in keys.items():
        section, _, leaf = key.rpartition(".")
        group = config[section or "model"]
        if leaf not in group or isinstance(group[leaf], ml_collections.ConfigDict):
            raise ConversionError(f"converter returned unknown config key {key!r}")
        group[leaf] = value
    config.task.objective = objective
    config.model.dtype = "float32"  # what transformers computes in; bfloat16 is an override
    config.data.seq_len = min(config.model.max_len, _MAX_SEQ_LEN)
    config_lib.validate(config)
    return config


def load_hf(hf_dir: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """(run config, parameters as float32 numpy arrays in jaxlm's tree) of an HF folder."""
    hf_dir = Path(hf_dir).expanduser()
    hf = hf_files.read_config(hf_dir)
    name, module = architecture_of(hf, hf_dir)
    try:
        config = run_config(module.config_from_hf(hf, name), module.ARCHITECTURES[name])
    except KeyError as e:
        raise ConversionError(f"{hf_dir}/config.json has no {e.args[0]!r}; re-save it") from None
    except config_lib.ConfigError as e:
        raise ConversionError(f"{hf_dir}: {e}") from None
    cfg = config_lib.model_config(config, config.model.vocab_size)
    tensors = hf_files.read_tensors(hf_dir)
    try:
        params = module.params_from_hf(tensors, cfg, name)
    except KeyError as e:
        raise ConversionError(
            f"{hf_dir}: tensor {e.args[0]!r} is missing for {name}; the weights do not match "
            "config.json (re-save the model)"
        ) from None
    if tensors:
        raise ConversionError(
            f"{hf_dir}: unexpected tensor(s) {', '.join(sorted(tensors)[:3])} for {name}: jaxlm's "
            "model has no place for them; convert a model without them"
        )
    return config, checked_params(params, cfg, hf_dir)


def checked_params(params: dict, cfg: TransformerConfig, where: object) -> dict:
    """`params` as float32 numpy arrays, checked leaf by leaf against cfg's model."""
    _, abstract, _ = state.abstract_model(cfg)
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in want:
        name = sharding.path_name(path)
        if path not in got:
            raise ConversionError(f"{where}: no tensor converts to jaxlm parameter {name}")
        if tuple(got[path].shape) != tuple(leaf.shape):
            raise ConversionError(
                f"{where}: jaxlm parameter {name} gets shape {tuple(got[path].shape)}, the "
                f"model needs {tuple(leaf.shape)}; config.json and the weights disagree"
            )
    if len(got) != len(want):
        extra = sorted(set(map(sharding.path_name, got)) - {sharding.path_name(p) for p, _ in want})
        raise ConversionError(f"{where}: converted parameters {extra[:3]} are not in the model")
    return jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params, abstract)


def hf_tokenizer(hf_dir: str | Path) -> tokenizer_lib.TokenizerAPI | None:
    """The folder's tokenizer, or None when it has no tokenizer files."""
    hf_dir = Path(hf_dir).expanduser()
    if not any((Path(hf_dir) / n).is_file() for n in _TOKENIZER_FILES):
        return None
    return tokenizer_lib.load(hf_dir)


@contextlib.contextmanager
def _building(target: Path):
    """A temporary folder beside `target`, renamed to it on success and removed on failure."""
    target = Path(target)
    if target.exists():
        raise ConversionError(f"{target} exists; pass a new directory (nothing was written)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Convert an HF folder into a new jaxlm run directory (step 0); returns its path."""
    hf_dir, run_dir = Path(hf_dir).expanduser(), Path(run_dir).expanduser()
    if run_dir.exists():
        raise ConversionError(f"{run_dir} exists; pass a new --workdir (nothing was written)")
    config, params = load_hf(hf_dir)
    tok = hf_tokenizer(hf_dir)
    vocab = config.model.vocab_size
    if tok is not None and tok.vocab_size > vocab:
        raise ConversionError(
            f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
            f"vocab_size={vocab} embeddings; use the model's own tokenizer"
        )
    if tok is None:  # token ids only: evaluation reads synthetic rows of the same vocabulary
        config.data.source = "synthetic"
    name = hf_files.read_config(hf_dir)["architectures"][0]  # load_hf checked it
    cfg = config_lib.model_config(config, vocab)
    with _building(run_dir) as tmp:
        if tok is not None:
            (tmp / tok.filename).write_bytes(tok.to_bytes())
        config_lib.save_config(config, tmp)
        meta = {
            **state.checkpoint_meta(cfg, None if tok is None else tok.sha256),
            "train.freeze": "",
            "step": 0,
            "imported_from": {"architecture": name, "path": str(Path(hf_dir).absolute())},
        }
        ckpt = Checkpointer(tmp / "checkpoints", keep=1, async_save=False)
        try:
            arrays = jax.tree.map(jnp.asarray, params)
            ckpt.save(0, {"params": arrays, "step": jnp.zeros((), jnp.int32)}, meta)
        finally:
            ckpt.close()
    return run_dir


def run_params(run_dir: str | Path, step: int | None = None):
    """(config, model config, parameters as numpy, tokenizer or None) of a run's checkpoint,
    through its model.transforms, on one device."""
    config = config_lib.load_run_config(run_dir)
    tok_path = tokenizer_lib.run_file(run_dir)
    tok = None if tok_path is None else tokenizer_lib.load(tok_path)
    mesh_cfg = copy.deepcopy(config.mesh)
    mesh_cfg.dcn_data, mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, 1, 1, 1
    mesh = sharding.mesh_from_config(mesh_cfg, jax.devices()[:1])
    run = state.open_run(run_dir, config, step, mesh, None if tok is None else tok.sha256)
    params = jax.tree.map(np.asarray, jax.device_get(run.params))
    return config, run.model.model_cfg, params, tok


def special_ids(tok: tokenizer_lib.TokenizerAPI | None) -> dict:
    """HF config.json's token ids, from the tokenizer's roles (None where it has none)."""
    roles = {"bos_token_id": "bos", "eos_token_id": "eos", "pad_token_id": "pad"}
    roles.update(decoder_start_token_id="pad", sep_token_id="sep", cls_token_id="cls")
    return {k: None if tok is None else getattr(tok, f"{r}_id") for k, r in roles.items()}


def pick_architecture(cfg: TransformerConfig, objective: str, ids: dict) -> tuple[str, dict]:
    """(name, HF config) of the first architecture for `objective` that represents cfg."""
    why = []
    for name, module in ARCHITECTURES.items():
        if module.ARCHITECTURES[name] != objective:
            continue
        try:
            return name, module.config_to_hf(cfg, name, ids)
        except ConversionError as e:
            why.append(f"{name}: {e}")
    raise ConversionError(
        f"no Hugging Face architecture jaxlm converts represents this task.objective={objective} "
        f"model ({'; '.join(why) or 'none for that objective'})"
    )


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_size: int | str | None = None,
    step: int | None = None,
    architecture: str | None = None,
) -> Path:
    """Write a run's checkpoint (the latest unless `step`) as an HF folder: config.json,
    safetensors in `dtype` (sharded above max_shard_size), tokenizer files. `architecture`
    None picks the first one that represents the model."""
    if dtype not in hf_files.DTYPES:
        raise ConversionError(f"dtype={dtype!r}: export as one of {', '.join(hf_files.DTYPES)}")
    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists():
        raise ConversionError(f"{out_dir} exists; pass a new output folder (nothing was written)")
    if max_shard_size is not None:
        hf_files.parse_size(max_shard_size)
    config, cfg, params, tok = run_params(run_dir, step)
    objective, ids = config.task.objective, special_ids(tok)
    if architecture is None:
        architecture, hf = pick_architecture(cfg, objective, ids)
    else:
        if architecture not in ARCHITECTURES:
            raise ConversionError(
                f"architecture={architecture!r}: use one of {', '.join(sorted(ARCHITECTURES))}"
            )
        hf = ARCHITECTURES[architecture].config_to_hf(cfg, architecture, ids)
    tensors = ARCHITECTURES[architecture].params_to_hf(params, cfg, architecture)
    hf["dtype"] = dtype
    with _building(out_dir) as tmp:
        hf_files.write_tensors(tmp, tensors, dtype, max_shard_size)
        hf_files.write_json(tmp / hf_files.CONFIG, hf)
        if tok is not None:
            hf_files.write_tokenizer(tmp, tok, cfg.max_len)
    return out_dir
