"""A trained run read for compression, and a new run directory written whole or not at all.

`SourceRun.open(workdir)` restores a run's parameters through ModelState (and its
model.transforms) with no optimizer and no data; `data()` builds its data only when a method
calibrates. `write_run` writes config.json, the source's tokenizer and data.json, one params
checkpoint, compress.json and any extra files into a temporary sibling and renames it into
place, so a failed or interrupted compression leaves no directory behind; the result loads in
every program like a trained run. LoRA runs are read by lora.restore_run (adapters and base).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding, state, tasks
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import ConfigError
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.feed import to_device
from jaxlm.data.source import build_source
from jaxlm.data.types import DataSource
from jaxlm.models.spec import TransformerConfig

# Fields of a model config that change no parameter: the new run keeps its source's values.
_FREE = ("dropout", "attention_impl", "dtype", "remat", "qat")  # qat: from train.qat
# Files of the source run the new run reads as they are: its tokenizer and what its data is.
_COPIED = (*tokenizer_lib.RUN_FILES, "data.json")


@dataclasses.dataclass
class SourceRun:
    workdir: Path
    config: object  # as saved: for_platform applies to the model built here, not to new runs
    model: state.ModelState
    params: dict
    step: int
    tokenizer_sha256: str | None

    @classmethod
    def open(cls, workdir: str | Path, step: int | None = None, devices=None) -> SourceRun:
        config = config_lib.load_run_config(workdir)
        here = config_lib.for_platform(config, jax.devices()[0].platform)
        tok = tokenizer_lib.run_file(workdir)
        sha = None if tok is None else tokenizer_lib.load(tok).sha256
        mesh = sharding.mesh_from_config(config.mesh, devices)
        # Calibration records activations from Python: a rematerialized block would leak them
        # out of its trace. remat changes no parameter (nor the saved meta).
        no_remat = functools.partial(dataclasses.replace, remat="none")
        run = state.open_run(workdir, here, step, mesh, sha, fit_model=no_remat)
        return cls(Path(workdir), config, run.model, run.params, run.step, sha)

    def data(self) -> DataSource:
        return build_source(config_lib.data_spec(self.config), self.workdir)

    def calibration_batches(self, data: DataSource, n: int) -> list[dict]:
        """The first `n` training batches (the run's (seed, step) order), on device."""
        batch_sh = sharding.batch_sharding(self.model.mesh)
        return [to_device(data.train_batch(i), batch_sh) for i in range(n)]

    def eval_sums(self, data: DataSource):
        return tasks.make_objective(self.config, data).eval_sums


def config_for(config, model_cfg: TransformerConfig, **train):
    """A copy of `config` describing `model_cfg` (every dimension explicit, no transforms:
    the parameters are saved transformed; no base run and no adapters: they are saved whole)
    with train.* keys set from `train`."""
    config = copy.deepcopy(config)
    for f in dataclasses.fields(TransformerConfig):
        if f.name not in _FREE:
            config.model[f.name] = getattr(model_cfg, f.name)
    config.model.transforms = ""
    for key, value in train.items():
        config.train[key] = value
    config.train.init_from = ""
    config.train.lora_rank = 0
    return config


def check_out(out: str | Path) -> Path:
    """--out as an absolute Path, refused in one line when something is already there."""
    out = Path(out).absolute()
    if out.exists():
        raise ConfigError(f"--out {out} already exists; pick a new directory (nothing was written)")
    return out


def write_run(
    out: str | Path,
    source: SourceRun,
    config,
    params: dict,
    model_cfg: TransformerConfig,
    files: dict[str, bytes],
    record: dict,
) -> Path:
    """Write the new run `out` (which must not exist) atomically; returns its path.

    `files` are extra files by name (masks); `record` goes to compress.json with the source.
    """
    out = check_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tmp_config = copy.deepcopy(config)
        tmp_config.train.checkpoint_dir = ""  # the new run's checkpoints live inside it
        config_lib.save_config(tmp_config, tmp)
        for name in _COPIED:
            if (source.workdir / name).is_file():
                shutil.copy2(source.workdir / name, tmp / name)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        meta = {**state.checkpoint_meta(model_cfg, source.tokenizer_sha256), "step": source.step}
        ckpt = Checkpointer(tmp / "checkpoints", keep=1, async_save=False)
        try:
            step = np.int32(source.step)
            ckpt.save(source.step, {"params": params, "step": step}, meta)
        finally:
            ckpt.close()
        full = {"source": str(source.workdir), "source_step": source.step, **record}
        (tmp / "compress.json").write_text(json.dumps(full, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
