"""Distillation (jaxlm/compress/distill.py): the KL term, its T^2 scale, the positions it counts,
the teacher's checks, resume and sharding, through the trainer's own step."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import init_run, tiny_config
from flax import nnx

from jaxlm import sharding, train
from jaxlm.checkpoint import Checkpointer
from jaxlm.compress import distill
from jaxlm.config import ConfigError
from jaxlm.data import feed

ONE = jax.devices()[:1]  # one device where sharding is not the point: less to compile


def make_run(config, workdir: Path, tokenizer_sha256: str | None = None) -> Path:
    return init_run(config, workdir, ONE, tokenizer_sha256)


def teacher_config(objective: str = "lm"):
    c = tiny_config(objective=objective)
    c.model.d_model, c.model.d_ff = 64, 128  # another shape than the student's
    c.train.seed = 7
    return c


def student_config(teacher: Path, objective: str = "lm", **distill_settings):
    c = tiny_config(objective=objective)
    c.train.distill.teacher = str(teacher)
    for k, v in distill_settings.items():
        c.train.distill[k] = v
    return c


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    return make_run(teacher_config(), tmp_path_factory.mktemp("teacher") / "run")


def sums_fn(s: train.Setup):
    """jit(params, batch, step) -> the distillation sums of the training step's loss."""

    @jax.jit
    def fn(params, teacher_params, batch, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(s.config.train.seed), 2), step)
        model = nnx.merge(s.graphdef, params)
        return s.objective.loss_sums(model, batch, key, teacher_params=teacher_params)

    return fn


def batch_of(s: train.Setup, step: int = 0) -> dict:
    return {k: np.asarray(v) for k, v in s.data.train_batch(step).items()}


@pytest.mark.parametrize("objective", ["lm", "mlm", "seq2seq"])
def test_kl_is_zero_when_the_student_is_the_teacher(objective, tmp_path):
    teacher = make_run(teacher_config(objective), tmp_path / "teacher")
    c = teacher_config(objective)
    c.train.distill.teacher = str(teacher)
    s = train.setup(c, tmp_path / "student", ONE)
    with sharding.use_rules(s.mesh, c.mesh.rules):
        sums = jax.device_get(sums_fn(s)(s.teacher.params, s.teacher.params, batch_of(s), 0))
    assert sums["tokens"] > 0
    # The same masked positions (mlm draws them from one key for both models) and logits.
    assert abs(sums["kl"]) / sums["tokens"] < 1e-7, sums["kl"]
    assert sums["nll"] == pytest.approx(0.5 * sums["student_nll"], rel=1e-5)


def test_temperature_squared_scaling_matches_a_hand_computation(lm_teacher, tmp_path):
    t, alpha = 3.0, 0.7
    s = train.setup(student_config(lm_teacher, temperature=t, alpha=alpha), tmp_path, ONE)
    params = train.create_state(s)["params"]
    batch = batch_of(s)
    with sharding.use_rules(s.mesh, s.config.mesh.rules):
        sums = jax.device_get(sums_fn(s)(params, s.teacher.params, batch, 0))
        student = np.asarray(_logits(s.model, params, batch), np.float64)
        teacher = np.asarray(_logits(s.teacher.model, s.teacher.params, batch), np.float64)
    mask = batch["loss_mask"]

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp_t, lp_s = log_softmax(teacher / t), log_softmax(student / t)
    kl = float((np.sum(np.exp(lp_t) * (lp_t - lp_s), -1) * mask).sum())
    own = -np.take_along_axis(log_softmax(student), batch["targets"][..., None], -1)[..., 0]
    nll = float((own * mask).sum())
    assert sums["kl"] == pytest.approx(kl, rel=1e-4)
    assert sums["nll"] == pytest.approx(alpha * t * t * kl + (1 - alpha) * nll, rel=1e-4)


def _logits(model_state, params, batch):
    def forward(params, batch):
        model = model_state.merge(params)
        kw = {"positions_BT": batch["positions"], "segment_ids_BT": batch["segment_ids"]}
        return model(batch["inputs"], **kw)

    return jax.jit(forward)(params, batch)


def test_padding_and_fill_rows_do_not_change_the_loss(lm_teacher, tmp_path):
    s = train.setup(student_config(lm_teacher), tmp_path, ONE)
    params = train.create_state(s)["params"]
    rng = np.random.default_rng(0)

    def with_garbage(batch):
        b = {k: v.copy() for k, v in batch.items()}
        b["loss_mask"][-2:] = 0  # fill rows
        b["segment_ids"][0, -5:] = 0  # padding at the end of a real row
        b["loss_mask"][0, -5:] = 0
        for key in ("inputs", "targets"):
            b[key][-2:] = rng.integers(0, 63, b[key][-2:].shape)
            b[key][0, -5:] = rng.integers(0, 63, 5)
        return b

    fn, batch = sums_fn(s), batch_of(s)
    with sharding.use_rules(s.mesh, s.config.mesh.rules):
        a = jax.device_get(fn(params, s.teacher.params, with_garbage(batch), 0))
        b = jax.device_get(fn(params, s.teacher.params, with_garbage(batch), 0))
        full = jax.device_get(fn(params, s.teacher.params, batch, 0))
    assert a["tokens"] == full["tokens"] - 2 * 16 - 5
    for key in ("nll", "kl", "student_nll"):
        assert a[key] == b[key], key
    assert a["kl"] != full["kl"]  # the garbage rows would count if they were not masked


def test_teacher_is_frozen_and_the_step_trains_the_student(lm_teacher, tmp_path):
    s = train.setup(student_config(lm_teacher), tmp_path, ONE)
    state = train.create_state(s)
    before = jax.device_get(s.teacher.params)
    step = train.make_train_step(s)
    assert set(step.inputs) == {"teacher"}
    # The optimizer holds the student's parameters only: the same count as without a teacher.
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert 0 <= n_opt - 2 * n_params < 4  # Adam's two moments and its step counts
    with sharding.use_rules(s.mesh, s.config.mesh.rules):
        state, metrics = step(state, feed.to_device(s.data.train_batch(0), s.batch_sharding))
    assert np.isfinite(float(metrics["loss"]))
    after = jax.device_get(s.teacher.params)
    assert all(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


def test_resume_is_exact(lm_teacher, tmp_path):
    c = student_config(lm_teacher)
    c.train.steps = 4
    c.train.checkpoint_every = 2
    train.train(c, tmp_path / "whole", ONE)
    c.train.stop_at = 2
    train.train(c, tmp_path / "resumed", ONE)
    c.train.stop_at = 0
    train.train(c, tmp_path / "resumed", ONE)
    got = [_params(tmp_path / run, c) for run in ("whole", "resumed")]
    for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
        np.testing.assert_array_equal(x, y)


def _params(workdir: Path, config) -> dict:
    s = train.setup(config, workdir, ONE, optimizer=False)
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return jax.device_get(s.model.restore(ckpt, 4, None))
    finally:
        ckpt.close()


def test_sharded_equals_one_device(lm_teacher, tmp_path):
    def losses(c, devices):
        s = train.setup(c, tmp_path, devices)
        state, step = train.create_state(s), train.make_train_step(s)
        out = []
        with sharding.use_rules(s.mesh, c.mesh.rules):
            for i in range(2):
                state, m = step(state, feed.to_device(s.data.train_batch(i), s.batch_sharding))
                out.append(float(m["loss"]))
        return out

    c = student_config(lm_teacher)
    one = losses(c, jax.devices()[:1])
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    np.testing.assert_allclose(losses(c, None), one, rtol=2e-5)


def test_another_tokenizer_and_bad_settings_are_one_line_errors(tmp_path):
    sha = "f" * 64
    teacher = make_run(teacher_config(), tmp_path / "teacher", tokenizer_sha256=sha)
    with pytest.raises(ConfigError, match=r"train.distill.teacher=.*tokenizer sha256 ffffff"):
        train.setup(student_config(teacher), tmp_path / "s")
    with pytest.raises(ConfigError, match=r"train.distill.alpha must be in \[0, 1\], got 1.5"):
        distill.settings(student_config(teacher, alpha=1.5))
    with pytest.raises(ConfigError, match="train.distill.teacher=.*config.json not found"):
        train.setup(student_config(tmp_path / "none"), tmp_path / "s")
    wrong_family = make_run(tiny_config(objective="mlm"), tmp_path / "mlm")
    with pytest.raises(ConfigError, match="model.family=encoder model, which does not train"):
        train.setup(student_config(wrong_family), tmp_path / "s")


def test_kl_sum_is_zero_for_equal_logits_and_positive_otherwise():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    mask = jnp.ones((2, 3))
    assert float(distill.kl_sum(x, x, mask, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill.kl_sum(x, -x, mask, 2.0)) > 0
