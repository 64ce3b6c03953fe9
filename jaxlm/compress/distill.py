"""Knowledge distillation: a trained teacher run's token distributions train a student.

Shape legend: B batch, T length, D d_model (student's or teacher's), V vocabulary.

loss = alpha * T^2 * KL(teacher || student, both at temperature T) + (1 - alpha) * the student's
own objective, summed over the positions that objective counts (lm: real targets; mlm: the
masked positions, drawn with the same key for both models; seq2seq: real target tokens), so
padding and fill rows never count. T^2 keeps the soft-target gradients on the scale of the
hard ones as T grows (Hinton et al. 2015).

The teacher (`train.distill.teacher` = WORKDIR[:STEP], any shape, the same tokenizer) is
restored through `state.ModelState` onto the student's mesh and rules and passed through its
run's model.transforms; its parameters enter the jitted train step as a frozen input (no
gradient, no optimizer state, never saved) and its forward pass runs inside that step.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import evaluate, objectives, state, tasks
from jaxlm.checkpoint import CheckpointError
from jaxlm.config import OBJECTIVE_FAMILY, ConfigError
from jaxlm.data.types import DataSource

KEY = "train.distill.teacher"


def kl_sum(teacher_logits_BTV, student_logits_BTV, mask_BT, temperature: float) -> jax.Array:
    """sum over mask_BT of KL(softmax(teacher / T) || softmax(student / T)), in fp32."""
    t = jnp.float32(temperature)
    logp_t = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / t, axis=-1)
    logp_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / t, axis=-1)
    kl_BT = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return jnp.sum(kl_BT * mask_BT.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A restored teacher: its model state (the student's mesh), parameters and objective."""

    model: state.ModelState
    params: dict
    objective: tasks.Objective
    workdir: str
    step: int


def settings(config) -> tuple[float, float]:
    """(temperature, alpha), checked: a one-line ConfigError naming the key."""
    d = config.train.distill
    if not d.temperature > 0:
        raise ConfigError(f"train.distill.temperature must be > 0, got {d.temperature}")
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"train.distill.alpha must be in [0, 1], got {d.alpha}")
    return float(d.temperature), float(d.alpha)


def _teacher_run(config) -> tuple[str, int | None]:
    text = config.train.distill.teacher
    try:
        workdir, step = config_lib.parse_init_from(text)
    except ConfigError as e:
        raise ConfigError(str(e).replace("train.init_from", KEY)) from None
    if not (Path(workdir) / "config.json").is_file():
        raise ConfigError(
            f"{KEY}={text}: {workdir}/config.json not found; point it at the --workdir of a "
            "trained run"
        )
    return workdir, step


def load_teacher(config, data: DataSource, mesh) -> Teacher:
    """The teacher run of `config` restored onto `mesh` (the student's rules), checked: the
    same tokenizer and vocabulary, a family the student's objective trains."""
    settings(config)
    objective = config.task.objective
    if objective == "classify":
        raise ConfigError(
            f"{KEY}: distillation compares token distributions; task.objective=classify has "
            "none (use lm, mlm or seq2seq)"
        )
    workdir, step = _teacher_run(config)
    key = f"{KEY}={config.train.distill.teacher}"
    tconfig = config_lib.for_platform(config_lib.load_run_config(workdir), _platform(mesh))
    if tconfig.model.family not in OBJECTIVE_FAMILY[objective]:
        raise ConfigError(
            f"{key}: the teacher is a model.family={tconfig.model.family} model, which does "
            f"not train task.objective={objective}; use a teacher of family "
            f"{' or '.join(OBJECTIVE_FAMILY[objective])}"
        )
    ours = data.tokenizer_sha256

    def same_tokenizer(meta: dict) -> None:
        theirs = meta.get("tokenizer_sha256")
        if theirs != ours:
            raise ConfigError(
                f"{key}: the teacher used tokenizer sha256 {str(theirs)[:12]}, the student "
                f"{str(ours)[:12]}; distillation compares token distributions, so set "
                f"data.tokenizer to the teacher's ({workdir}/tokenizer.model)"
            )

    try:
        run = state.open_run(workdir, tconfig, step, mesh, ours, check_meta=same_tokenizer)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None
    params, model, step = run.params, run.model, run.step
    if model.model_cfg.vocab_size != data.vocab_size:
        raise ConfigError(
            f"{key}: the teacher's vocabulary has {model.model_cfg.vocab_size} ids, the "
            f"student's {data.vocab_size}; set model.vocab_size to the teacher's"
        )
    # The student's task settings (masking rates, packing, chunking) with the teacher's model.
    as_teacher = copy.deepcopy(config)
    as_teacher.model = tconfig.model
    return Teacher(model, params, tasks.make_objective(as_teacher, data), workdir, step)


def _platform(mesh) -> str:
    return mesh.devices.flat[0].platform


def objective(
    student: tasks.Objective, teacher: Teacher, temperature: float, alpha: float, chunk: int
) -> tasks.Objective:
    """The student's objective with the distillation loss for training; its evaluation (the
    student's own metrics) is unchanged. loss_sums takes the teacher's parameters by keyword."""
    graphdef = teacher.model.graphdef
    weight_kl = alpha * temperature * temperature

    def loss_sums(model, batch, key, teacher_params):
        h_s, targets_BT, mask_BT = student.token_hidden(model, batch, key, True)
        tmodel = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
        h_t = jax.lax.stop_gradient(teacher.objective.token_hidden(tmodel, batch, key, False)[0])
        d_s = h_s.shape[-1]

        # One array for both hidden states, so evaluate.projected_sums chunks both projections
        # alike ([B, T, V] logits of either model never exist whole with task.logits_chunk).
        def project(h_BTD):
            return model.logits(h_BTD[..., :d_s]), tmodel.logits(h_BTD[..., d_s:])

        def sums_fn(logits, targets, mask):
            s_logits, t_logits = logits
            own = objectives.token_sums(s_logits, targets, mask)
            kl = kl_sum(t_logits, s_logits, mask, temperature)
            nll = weight_kl * kl + (1.0 - alpha) * own["nll"]
            return {"nll": nll, "tokens": own["tokens"], "kl": kl, "student_nll": own["nll"]}

        both = jnp.concatenate([h_s, h_t.astype(h_s.dtype)], axis=-1)
        return evaluate.projected_sums(sums_fn, project, both, targets_BT, mask_BT, chunk)

    return dataclasses.replace(student, name=f"{student.name}+distill", loss_sums=loss_sums)
