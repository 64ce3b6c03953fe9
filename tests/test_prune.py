"""Pruning (jaxlm/compress/prune.py): exact sparsity per matrix and the N:M pattern, masks kept
through a fine-tune, structured pruning that makes the model smaller without changing what
zero-weight heads and neurons computed, and pruned runs that every program loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_run, tiny_config, xla_flags

from jaxlm import config as config_lib
from jaxlm import finetune, sharding, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.compress import calibrate, prune, runs
from jaxlm.inference import LanguageModel, evaluate_run

ONE = jax.devices()[:1]
ROOT = Path(__file__).resolve().parents[1]


def matrix(name: str, x: np.ndarray) -> np.ndarray:
    """A kernel as [inputs, outputs]."""
    return x.reshape(int(np.prod(x.shape[: prune.num_inputs(name)])), -1)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An initialized LM run (synthetic data; GQA: 4 query heads on 2 KV heads)."""
    c = tiny_config()
    c.train.steps = 3
    return init_run(c, tmp_path_factory.mktemp("base") / "run", ONE)


@pytest.fixture(scope="module")
def source(base):
    return runs.SourceRun.open(base, devices=ONE)


@pytest.fixture(scope="module")
def norms(source):
    data = source.data()
    names = sorted(prune.targets(source.params))
    batches = source.calibration_batches(data, 2)
    return calibrate.input_norms(
        source.model, source.eval_sums(data), source.params, batches, names
    )


def test_targets_are_the_block_kernels(source):
    names = sorted(prune.targets(source.params))
    assert len(names) == 2 * 7  # per block: query, key, value, out, up, gate, down
    assert not any("embed" in n or "norm" in n for n in names)


def test_calibration_norms_are_the_inputs_l2_norms(source, norms):
    # The query's input is the attention norm's output: check one against a direct forward.
    assert norms["blocks/0/attn/out/kernel"].shape == (4, 8)
    assert norms["blocks/0/mlp/down/kernel"].shape == (64,)
    data = source.data()
    batch = source.calibration_batches(data, 2)

    @jax.jit
    def attn_input(params, b):
        model = source.model.merge(params)
        x = model.embed(b["inputs"])
        return model.blocks[0].attn_norm(x)

    x = np.concatenate([np.asarray(attn_input(source.params, b)) for b in batch])
    want = np.sqrt(np.sum(np.square(x.astype(np.float64)), axis=(0, 1)))
    np.testing.assert_allclose(norms["blocks/0/attn/query/kernel"], want, rtol=1e-4)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_exact_unstructured_sparsity_per_matrix(source, norms, method):
    masks = prune.make_masks(source.params, method, sparsity=0.5, norms=norms)
    assert set(prune.sparsity_of(masks).values()) == {0.5}
    if method == "wanda":  # per output: every output column keeps exactly half its inputs
        for name, m in masks.items():
            cols = matrix(name, m)
            assert np.all(cols.sum(0) == cols.shape[0] // 2), name
    # The scores order the weights: every pruned magnitude is at most every kept one.
    w = np.abs(np.asarray(prune.targets(source.params)["blocks/1/mlp/up/kernel"]))
    m = masks["blocks/1/mlp/up/kernel"]
    if method == "magnitude":
        assert w[~m].max() <= w[m].min()


def test_two_four_pattern(source, norms):
    masks = prune.make_masks(source.params, "wanda", pattern="2:4", norms=norms)
    for name, m in masks.items():
        mat = matrix(name, m)
        assert np.all(mat.reshape(-1, 4, mat.shape[-1]).sum(axis=1) == 2), name


def test_bad_requests_are_one_line_errors(tmp_path, base):
    bad = [
        (dict(sparsity=1.0), r"--sparsity 1.0: must be in \[0, 1\)"),
        (dict(sparsity=-0.1), r"--sparsity -0.1: must be in \[0, 1\)"),
        (dict(pattern="4:2"), "write N:M with 0 < N < M"),
        (dict(), "prune needs one kind"),
        (dict(sparsity=0.5, heads=0.25), "prune needs one kind"),
        (dict(method="random", sparsity=0.5), "--method 'random'"),
        (dict(heads=0.25), r"--heads 0.25 is 0.5 of the 2 KV groups .* multiple of 0.5"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            prune.prune_run(base, tmp_path / "out", prune.PruneRequest(**kwargs))
    assert not (tmp_path / "out").exists()


def test_masks_stay_exact_through_a_fine_tune(base, tmp_path):
    out = tmp_path / "pruned"
    record = prune.prune_run(
        base, out, prune.PruneRequest("wanda", pattern="2:4", calibration_batches=2), devices=ONE
    )
    assert set(record["sparsity"].values()) == {0.5}
    c = config_lib.load_run_config(out, [f"train.init_from={out}", "train.steps=4"])
    assert c.train.masks == str(out / prune.MASKS_FILE)
    train.train(c, tmp_path / "ft", ONE)
    masks = prune.load_file(str(out / prune.MASKS_FILE))
    s = train.setup(c, tmp_path / "ft", ONE, optimizer=False)
    start = runs.SourceRun.open(out, devices=ONE).params
    ckpt = Checkpointer(tmp_path / "ft" / "checkpoints")
    try:
        tuned = prune.flat(jax.device_get(s.model.restore(ckpt, 4, None)))
    finally:
        ckpt.close()
    start = prune.flat(jax.device_get(start))
    for name, m in masks.items():
        w = tuned[name]
        assert np.all(w[m == 0] == 0), name
        assert np.all(w[m == 1] != 0) and np.mean(w == 0) == 0.5, name
        assert not np.array_equal(w, start[name]), name  # the kept weights trained
        kept = matrix(name, w != 0)
        assert np.all(kept.reshape(-1, 4, kept.shape[-1]).sum(1) == 2), name


def _zero_some(params, cfg):
    """KV group 1 (query heads 2, 3) and the last quarter of neurons zeroed in every block."""
    g, f = cfg.num_heads // cfg.num_kv_heads, 3 * cfg.d_ff // 4

    def zero(path, x):
        name, x = sharding.path_name(path), np.array(x)
        if name.endswith(("attn/query/kernel", "attn/key/kernel", "attn/value/kernel")):
            n = g if "query" in name else 1
            x[:, n : 2 * n] = 0.0
        elif name.endswith("attn/out/kernel"):
            x[2:4] = 0.0
        elif name.endswith(("mlp/up/kernel", "mlp/gate/kernel")):
            x[:, f:] = 0.0
        elif name.endswith("mlp/down/kernel"):
            x[f:] = 0.0
        return x

    return jax.tree_util.tree_map_with_path(zero, jax.device_get(params))


def test_removing_zero_heads_and_neurons_keeps_the_logits(source):
    cfg = source.model.model_cfg
    params = _zero_some(source.params, cfg)
    small, small_cfg = prune.structured(params, cfg, heads=0.5, neurons=0.25)
    assert (small_cfg.num_heads, small_cfg.num_kv_heads, small_cfg.d_ff) == (2, 1, 48)
    assert small_cfg.head_dim == cfg.head_dim
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 16), 0, 64))
    small_state = source.model.build(small_cfg, source.model.mesh, source.model.rules)
    want = jax.jit(lambda p, t: source.model.merge(p)(t))(params, tokens)
    got = jax.jit(lambda p, t: small_state.merge(p)(t))(small, tokens)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-6


def test_structured_run_is_smaller_and_loads_everywhere(base, tmp_path):
    out = tmp_path / "small"
    record = prune.prune_run(
        base,
        out,
        prune.PruneRequest("wanda", heads=0.5, neurons=0.25, calibration_batches=2),
        devices=ONE,
    )
    assert record["model"] == {"num_heads": 2, "num_kv_heads": 1, "d_ff": 48}
    assert record["params_after"] < record["params_before"]
    saved = json.loads((out / "config.json").read_text())["model"]
    assert (saved["num_heads"], saved["num_kv_heads"], saved["d_ff"]) == (2, 1, 48)
    lm = LanguageModel.load(out, devices=ONE)
    ids = lm.generate_ids([[1, 2, 3]], lm.sampling_settings(max_new_tokens=4, temperature=0.0))
    assert len(ids[0]) == 4
    metrics = evaluate_run(out, max_batches=1, devices=ONE)
    assert np.isfinite(metrics["loss"])
    c = config_lib.load_run_config(out, [f"train.init_from={out}"])
    s = train.setup(c, tmp_path / "ft", ONE)
    fresh = train.create_state(s)["params"]
    loaded, report = finetune.load_pretrained(c.train.init_from, fresh, c.mesh.rules, None)
    assert report["new"] == [] and report["dropped"] == []


def test_a_failed_prune_leaves_no_directory(base, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.Checkpointer, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        prune.prune_run(base, tmp_path / "out", prune.PruneRequest("magnitude", 0.5), devices=ONE)
    assert os.listdir(tmp_path) == []


def test_cli_prunes_a_run_and_refuses_an_existing_out(base, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxlm.cli.compress", "prune", "--workdir", str(base)]
    out = tmp_path / "out"
    args = ["--out", str(out), "--method", "magnitude", "--sparsity", "0.5"]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["sparsity_min"] == line["sparsity_max"] == 0.5
    before = sorted(p.name for p in out.iterdir())
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # a usage error
    assert "exists; pick a new directory" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
