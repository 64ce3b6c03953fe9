"""The training loop: resume, signals, NaN stop, checkpoint checks, logging, accumulation."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import tiny_config
from multiprocess_helpers import losses

from jaxlm import train
from jaxlm.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "objective,family",
    [
        ("lm", "decoder"),
        ("mlm", "encoder"),
        ("span_corruption", "encoder_decoder"),
        ("seq2seq", "encoder_decoder"),
        ("seq2seq", "decoder"),  # a prefix LM
        ("classify", "encoder"),
        ("classify", "decoder"),
    ],
)
def test_resume_equals_uninterrupted(tmp_path, objective, family):
    """A run restarted from its step-3 checkpoint alone (what a crash or a preemption after
    step 3 leaves) ends as the uninterrupted run: parameters, optimizer state, data order and
    the dropout and masking keys all continue exactly."""
    c = tiny_config(objective=objective)
    c.model.family = family
    c.model.dropout = 0.1  # dropout (and mlm masking) keys must also continue exactly
    full = train.train(c, tmp_path / "full")  # saves at steps 3 and 6
    checkpoint = Path("checkpoints") / "3"
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "split" / checkpoint)
    rest = train.train(c, tmp_path / "split")
    assert rest["step"] == 6
    resumed = losses(tmp_path / "split")
    assert sorted(resumed) == [4, 6]  # logged from step 4 on: it did resume
    np.testing.assert_allclose(resumed[6], losses(tmp_path / "full")[6], rtol=1e-5)
    np.testing.assert_allclose(rest["eval/loss"], full["eval/loss"], rtol=1e-5)


def test_outputs_in_the_workdir(tmp_path, capsys):
    c = tiny_config()
    out = train.train(c, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [2, 4, 6]
    assert {"train/lr", "tokens_per_sec", "train/grad_norm"} <= set(records[0])
    assert any("eval/perplexity" in r for r in records)
    np.testing.assert_allclose(out["eval/perplexity"], np.exp(out["eval/loss"]), rtol=1e-6)
    assert any((tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 6
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
    # A changed config keeps the earlier one rather than overwriting it; train.stop_at stops
    # the run early with a checkpoint.
    c.train.steps, c.train.stop_at = 8, 7
    assert train.train(c, tmp_path) == {"step": 7, "stopped": True}
    out = capsys.readouterr().out
    assert "train.stop_at: saved checkpoint at step 7; run without train.stop_at to resume" in out
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6, 7]
    assert json.loads((tmp_path / "config.1.json").read_text())["train"]["steps"] == 6
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 8


def test_gradient_accumulation_matches_one_batch(tmp_path):
    c = tiny_config()
    c.mesh.tensor = 2  # data=4: each of the 2 microbatches (4 rows) still splits evenly
    c.train.steps = 3
    whole = train.train(c, tmp_path / "whole")
    c.optim.grad_accum_steps = 2
    micro = train.train(c, tmp_path / "micro")
    np.testing.assert_allclose(micro["eval/loss"], whole["eval/loss"], rtol=1e-5)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    c = tiny_config()
    c.optim.lr = 1e30
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0
    c.train.checkpoint_every = 1
    with pytest.raises(
        train.TrainingError,
        match=r"non-finite loss .* at step \d+; .* last good checkpoint \(step \d+\) is kept",
    ):
        train.train(c, tmp_path)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert kept and max(kept) < 6
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e30


def checkpoint_files(workdir: Path) -> dict:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted((workdir / "checkpoints").rglob("*"))
        if p.is_file()
    }


def test_checkpoint_from_another_model_is_refused_and_untouched(tmp_path):
    c = tiny_config()
    c.train.steps = 3
    train.train(c, tmp_path)
    before = checkpoint_files(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    c.model.d_model = 64
    c.train.steps = 6
    with pytest.raises(CheckpointError, match=r"model.d_model=32 \(config has 64\)"):
        train.train(c, tmp_path)
    c.model.d_model, c.mesh.data = 32, 3  # a mesh that does not fit: refused in setup
    with pytest.raises(ValueError, match="needs 3 devices but 8 are present"):
        train.train(c, tmp_path)
    assert checkpoint_files(tmp_path) == before
    # The run's config (what eval and generate read) is neither replaced nor renamed.
    assert (tmp_path / "config.json").read_text() == saved
    assert not list(tmp_path.glob("config.*.json"))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    c = tiny_config()
    c.train.steps = 3
    train.train(c, tmp_path)
    for p in (tmp_path / "checkpoints" / "3" / "params").rglob("*"):
        if p.is_file():
            p.write_bytes(b"garbage")
    # Without jaxlm's manifest (a checkpoint of an older jaxlm, or damage that keeps the sizes)
    # the damage shows only when Orbax reads it: still one line (with one: tests/test_faults.py).
    (tmp_path / "checkpoints" / "3" / "jaxlm_manifest.json").unlink()
    before = checkpoint_files(tmp_path)
    c.train.steps = 6
    with pytest.raises(CheckpointError, match="could not be read .* corrupt"):
        train.train(c, tmp_path)
    assert checkpoint_files(tmp_path) == before


def cli(*args, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "jaxlm.cli.train", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, **popen)


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = cli(
        "--config", "experiments/pylm_tiny.py", "--workdir", str(tmp_path),
        "--config.data.source=synthetic", "--config.model.vocab_size=64",
        "--config.train.steps=100000", "--config.train.log_every=1",
        "--config.model.num_layers=1", "--config.data.batch_size=8",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "saved checkpoint at step" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= saved[0] < 100000
    assert (tmp_path / "config.json").is_file()  # what jaxlm-eval and jaxlm-generate read


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.stpes=5", "unknown config key 'train.stpes'"),
        ("--config.train.steps=abc", "config key 'train.steps' expects int, got 'abc'"),
        ("--config.model.norm=batchnorm", "config key 'model.norm' is 'batchnorm'; choose one of"),
    ],
)
def test_cli_config_errors_are_one_line(tmp_path, override, message):
    proc = cli(
        "--config", "experiments/pylm_tiny.py", "--workdir", str(tmp_path), override,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2  # a usage error, as absl and argparse
    lines = [x for x in err.splitlines() if x.startswith("jaxlm-train: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "checkpoints").exists()


def test_trains_on_the_embedded_corpus(tmp_path):
    c = tiny_config(source="python_stdlib")
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.tokenizer_vocab_size = 512
    c.model.vocab_size = 0  # taken from the tokenizer
    c.train.steps = 2
    c.train.eval_steps = 2
    out = train.train(c, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    assert out["eval/bits_per_byte"] > 0 and set(out) >= {"baseline/zlib-9", "baseline/xz-9"}
    # bits per byte is the same NLL measured per byte instead of per token.
    ratio = out["eval/bits_per_byte"] / out["eval/loss"]
    np.testing.assert_allclose(ratio, out["eval/tokens"] / out["eval/bytes"] / np.log(2), rtol=1e-6)


def test_meta_fields_added_later_do_not_block_a_restore(tmp_path):
    from jaxlm.checkpoint import _compare_meta

    expect = {"model": {"d_model": 32, "family": "decoder"}, "tokenizer_sha256": None}
    _compare_meta({"model": {"d_model": 32}, "tokenizer_sha256": None}, expect, tmp_path)
    with pytest.raises(CheckpointError, match=r"model.d_model=64 \(config has 32\)"):
        _compare_meta({"model": {"d_model": 64}, "tokenizer_sha256": None}, expect, tmp_path)


def test_checkpoint_of_the_old_single_state_layout_is_named(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from jaxlm.checkpoint import Checkpointer

    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    old = ocp.CheckpointManager(tmp_path, item_names=tuple(handlers), item_handlers=handlers)
    args = {"state": ocp.args.StandardSave({"w": jnp.ones(2)}), "meta": ocp.args.JsonSave({})}
    old.save(1, args=ocp.args.Composite(**args))
    old.wait_until_finished()
    old.close()
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="written by jaxlm before 2026-11-23"):
        ckpt.restore_params(1, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    ckpt.close()


def test_a_single_process_save_compiles_nothing(tmp_path):
    """Arrays replicated over the 8 devices are written whole: Orbax's replica-parallel save
    would compile a jit(slice) per array shape and replica slice (56 in a small seq2seq run)."""
    import jax.numpy as jnp
    from jax import monitoring
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxlm.checkpoint import Checkpointer

    mesh = jax.make_mesh((8,), ("data",))
    replicated = NamedSharding(mesh, P())
    state = {
        "params": {f"w{n}": jax.device_put(jnp.arange(n * 8.0), replicated) for n in (3, 5, 7)},
        "step": jax.device_put(jnp.int32(4), replicated),
    }
    jax.block_until_ready(state)
    compiles = []

    def listen(event: str, secs: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        ckpt = Checkpointer(tmp_path, async_save=False)
        ckpt.save(4, state, {"step": 4})
        ckpt.wait()
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert compiles == []
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    restored = ckpt.restore(4, abstract)
    ckpt.close()
    for name, value in state["params"].items():
        np.testing.assert_array_equal(restored["params"][name], value)
