"""Objectives in the trainer: masked-LM training, sharding, and config errors for bad pairings."""

import jax
import numpy as np
import pytest
from conftest import losses_after, tiny_config

from jaxlm import config as config_lib
from jaxlm import train
from jaxlm.config import ConfigError


def mlm_config():
    """tiny_config's masked LM on a 16-id chain: 15% of 256 tokens a step learn it quickly."""
    c = tiny_config(objective="mlm")
    c.model.vocab_size = 16
    c.data.batch_size = 16
    c.train.steps = 60
    return c


@pytest.fixture(scope="module")
def mlm_one_device(tmp_path_factory) -> list[float]:
    return losses_after(mlm_config(), jax.devices()[:1], tmp_path_factory.mktemp("mlm"), steps=60)


def test_mlm_loss_falls(mlm_one_device):
    assert np.mean(mlm_one_device[-10:]) < np.mean(mlm_one_device[:10]) - 0.25


def test_mlm_sharded_equals_one_device(mlm_one_device, tmp_path):
    c = mlm_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    np.testing.assert_allclose(
        losses_after(c, None, tmp_path, steps=4), mlm_one_device[:4], rtol=1e-5
    )


def test_synthetic_mlm_reserves_the_mask_id(tmp_path):
    s = train.setup(tiny_config(objective="mlm"), tmp_path)
    assert s.model_cfg.family == "encoder" and s.data.mask_id == 63
    tokens = np.concatenate([s.data.train_batch(i)["inputs"] for i in range(4)])
    assert tokens.max() < 63  # the data never holds <mask>


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"task.objective": "mlm"}, "task.objective=mlm trains model.family=encoder, not decoder"),
        ({"model.family": "encoder"}, "--config.task.objective=mlm"),
        ({"model.family": "encoder_decoder"}, "--config.task.objective=span_corruption"),
        (
            {"task.objective": "classify", "model.family": "encoder"},
            "needs model.num_classes >= 2",
        ),
        (
            {
                "task.objective": "seq2seq",
                "model.family": "encoder_decoder",
                "data.source": "jsonl:pairs.jsonl",
            },
            "set --config.data.input_key",
        ),
        (
            {
                "task.objective": "span_corruption",
                "model.family": "encoder_decoder",
                "data.source": "python_stdlib",
            },
            "set --config.data.tokenizer_sentinels=100",
        ),
        (
            {"task.objective": "mlm", "model.family": "encoder", "data.source": "python_stdlib"},
            "set --config.data.tokenizer_mask=True",
        ),
        (
            {"task.objective": "mlm", "model.family": "encoder", "task.mask_frac": 0.95},
            r"task.mask_frac=0.95 \+ task.random_frac=0.1 exceeds 1",
        ),
        ({"model.positions": "relative", "model.relative_buckets": 2}, "use at least 4 buckets"),
    ],
)
def test_bad_pairings_are_one_line_errors(changes, message):
    c = tiny_config()
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in changes.items()])
    with pytest.raises(ConfigError, match=message) as e:
        config_lib.validate(c)
        config_lib.model_config(c, 64)
    assert "\n" not in str(e.value)


def test_eval_decode_is_for_seq2seq_only():
    c = tiny_config(objective="classify")
    c.train.eval_decode = 8
    with pytest.raises(ConfigError, match="train.eval_decode=8 decodes seq2seq outputs"):
        config_lib.validate(c)
    c.train.eval_decode = -1
    with pytest.raises(ConfigError, match="train.eval_decode must be >= 0"):
        config_lib.validate(c)
