"""Config overrides and validation, the optimizer schedule and mask, the metrics library."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as config_lib
from jaxlm import evaluate, optim, train
from jaxlm.state import abstract_model


def test_overrides_are_typed():
    c = config_lib.base_config()
    config_lib.apply_overrides(
        c,
        [
            "--config.train.steps=7",
            "optim.lr=3e-4",
            "model.tie_embeddings=false",
            "data.source=synthetic",
        ],
    )
    assert (c.train.steps, c.optim.lr, c.model.tie_embeddings, c.data.source) == (
        7,
        3e-4,
        False,
        "synthetic",
    )
    config_lib.apply_overrides(c, ["mesh.rules=(('batch', 'data'),)"])
    assert c.mesh.rules == (("batch", "data"),)


@pytest.mark.parametrize(
    "item,message",
    [
        ("train.stpes=5", "unknown config key 'train.stpes': train has no 'stpes'"),
        ("nothing.x=1", "the top level has no 'nothing'"),
        ("train.steps=1.5", "expects int, got '1.5'"),
        ("model.tie_embeddings=maybe", "expects bool"),
        ("train=3", "is a group"),
        ("train.steps", "has no '='"),
    ],
)
def test_override_errors(item, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.apply_overrides(config_lib.base_config(), [item])


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model.attention_impl", "flash", "choose one of"),
        ("data.batch_size", 0, "must be > 0"),
        ("model.num_kv_heads", 3, "not a multiple"),
        ("model.dropout", 1.5, r"in \[0, 1\]"),
    ],
)
def test_validation(key, value, message):
    c = config_lib.base_config()
    group, leaf = key.split(".")
    c[group][leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_experiment_file_loads_and_validates():
    c = config_lib.load_config("experiments/pylm_tiny.py", ["train.steps=3"])
    assert c.train.steps == 3
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load_config("experiments/nope.py")


def test_schedule_warmup_then_cosine():
    c = config_lib.base_config().optim
    c.lr, c.warmup_steps, c.min_lr_ratio = 1.0, 10, 0.1
    sched = optim.learning_rate_schedule(c, 110)
    assert float(sched(0)) == 0.0
    assert math.isclose(float(sched(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(sched(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(sched(60)), 0.55, rel_tol=1e-4)
    assert math.isclose(float(sched(110)), 0.1, rel_tol=1e-4)
    c.schedule = "linear"
    assert math.isclose(float(optim.learning_rate_schedule(c, 110)(60)), 0.55, rel_tol=1e-4)


def test_weight_decay_mask(tmp_path):
    c = tiny_config()
    config_lib.gpt2_style(c.model)
    s = train.setup(c, tmp_path)
    _, params, _ = abstract_model(s.model_cfg)
    mask = optim.weight_decay_mask(params, c.optim)
    assert mask["blocks"][0]["attn"]["query"]["kernel"] is True
    assert mask["blocks"][0]["attn"]["query"]["bias"] is False
    assert mask["blocks"][0]["attn_norm"]["scale"] is False
    assert mask["embed"]["embedding"] is False and mask["pos_embed"] is False
    c.optim.decay_embeddings = True
    assert optim.weight_decay_mask(params, c.optim)["embed"]["embedding"] is True


def test_lm_metrics_match_a_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    nbytes = np.array([[3, 1, 2, 0, 0], [1, 1, 1, 4, 2]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    got = evaluate.token_nll(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(got, nll, rtol=1e-5)
    sums = {"nll": (nll * mask).sum(), "tokens": mask.sum(), "bytes": nbytes.sum()}
    m = evaluate.finish_lm(sums)
    loss = (nll * mask).sum() / 8
    assert math.isclose(m["loss"], loss, rel_tol=1e-6)
    assert math.isclose(m["perplexity"], math.exp(loss), rel_tol=1e-6)
    assert math.isclose(m["bits_per_byte"], (nll * mask).sum() / math.log(2) / 15, rel_tol=1e-6)


def test_flops_and_peak():
    c = tiny_config()
    cfg = config_lib.model_config(c, 64)
    assert (
        evaluate.flops_per_token(cfg, 16) == 6 * cfg.num_params(embeddings=False) + 12 * 2 * 32 * 16
    )
    assert evaluate.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert evaluate.peak_tflops("cpu") is None
    assert evaluate.peak_tflops("cpu", 5.0) == 5.0
