"""The training step and `train(config, workdir)`: the whole run, resumable, with no flags here.

Resume contract: parameters, optimizer state and step come from the latest checkpoint; dropout
keys and the data order are pure functions of (seed, step), so a restarted run continues exactly
where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import config as config_lib
from jaxlm import evaluate, finetune, monitor, sharding, storage, tasks, transforms
from jaxlm.checkpoint import Checkpointer
from jaxlm.compress import distill, lora, prune
from jaxlm.data.feed import Prefetcher
from jaxlm.data.source import build_source
from jaxlm.data.types import DataSource
from jaxlm.eval_loop import make_eval_step, run_eval
from jaxlm.models.spec import TransformerConfig
from jaxlm.optim import make_optimizer
from jaxlm.preemption import Interrupted, StopSignal
from jaxlm.state import ModelState, init_params
from jaxlm.workdir_lock import WorkdirLock


class TrainingError(RuntimeError):
    """The run cannot continue (a NaN or Inf loss); the message names the fix."""


@dataclasses.dataclass
class Setup:
    """A run's model state (jaxlm/state.py), data, objective and, for training, its optimizer."""

    config: object
    model: ModelState
    batch_sharding: NamedSharding
    data: DataSource
    objective: tasks.Objective
    tx: optax.GradientTransformation | None = None  # None: built for evaluation only
    schedule: optax.Schedule | None = None
    state_shardings: dict | None = None  # params, opt_state and step (training only)
    frozen: object = None  # finetune.freeze_mask: a tree of bools like the params, or None
    teacher: distill.Teacher | None = None  # train.distill.teacher, restored on this mesh
    masks: dict | None = None  # train.masks: {kernel path: bool mask}, updates kept at zero
    lora: lora.LoraPlan | None = None  # train.lora_rank > 0: the state's params are adapters
    base: dict | None = None  # LoRA: the frozen base parameters (train.init_from)
    _merge: object = None  # LoRA: jit(lora.merge), built on first use

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.model.mesh

    @property
    def model_cfg(self) -> TransformerConfig:
        return self.model.model_cfg

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.model.graphdef

    def meta(self) -> dict:
        """What the parameters must agree with (the eval program restores only those)."""
        return self.model.meta(self.data.tokenizer_sha256)

    def state_meta(self) -> dict:
        """meta() + what the optimizer state must agree with, for saving and resuming."""
        # Freezing changes the optimizer state's layout, so a resume must keep it; named here
        # so that changing it gives a one-line error naming the key, not a shape mismatch.
        # (Patterns are compared as written, normalized for blanks: "^embed" and "embed" differ.)
        meta = {
            **self.meta(),
            "train.freeze": finetune.normalized_patterns(self.config.train.freeze),
        }
        if self.lora is not None:
            meta["train.lora"] = self.lora.meta(self.config.train.init_from)
        return meta

    @property
    def trained(self) -> dict:
        """Abstract parameters the optimizer updates: the model's, or LoRA's adapters."""
        return self.model.abstract if self.lora is None else self.lora.abstract

    def model_params(self, params: dict) -> dict:
        """The model's parameters for a train state's `params` (LoRA: merged into the base)."""
        if self.lora is None:
            return params
        if self._merge is None:  # compiled once per run
            plan = self.lora
            fn = lambda base, ad: lora.merge(base, ad, plan)
            self._merge = jax.jit(fn, out_shardings=self.model.shardings)
        return self._merge(self.base, params)


def init_state(model_cfg: TransformerConfig, tx, seed: int, plan=None) -> dict:
    """Fresh train state; run under jit with out_shardings so it is born sharded."""
    params = init_params(model_cfg, seed) if plan is None else lora.init_adapters(plan, seed)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def setup(
    config,
    workdir: str | Path | None,
    devices=None,
    optimizer: bool = True,
    data: DataSource | None = None,
) -> Setup:
    """The run's mesh, data, objective and model state, plus its optimizer unless `optimizer`
    is False (the eval program builds none). `data` replaces the configured data (the
    benchmarks' synthetic batches of the same shapes)."""
    # The mesh and platform checks first: a refused launch must not build caches or train a
    # tokenizer (and pin it to the workdir) before it fails.
    mesh = sharding.mesh_from_config(config.mesh, devices)
    sharding.check_batch(config.data.batch_size, mesh, config.optim.grad_accum_steps)
    platform = mesh.devices.flat[0].platform
    if config.model.attention_impl == "cudnn" and platform != "gpu":
        raise config_lib.ConfigError(
            f"model.attention_impl=cudnn needs an NVIDIA GPU but the devices are {platform}; "
            "add --config.model.attention_impl=xla"
        )
    transforms.check(config_lib.transform_names(config))  # a typo fails at launch, not at eval
    if data is None:
        data = build_source(config_lib.data_spec(config), workdir)
    model = ModelState.build(
        config_lib.model_config(config, data.vocab_size), mesh, config.mesh.rules
    )
    s = Setup(
        config, model, sharding.batch_sharding(mesh), data, tasks.make_objective(config, data)
    )
    if not optimizer:
        return s
    if model.model_cfg.quant != "none":
        raise config_lib.ConfigError(
            f"model.quant={model.model_cfg.quant}: a quantized run is for jaxlm-eval and "
            "jaxlm-generate; train (or fine-tune with train.init_from) the float run it came from"
        )
    if config.train.lora_rank > 0:
        if config.train.masks:
            raise config_lib.ConfigError(
                "train.masks with train.lora_rank > 0: masks fix the base's weights, which LoRA "
                "never updates; fine-tune the pruned run without LoRA, or merge the adapters first"
            )
        s.lora = lora.make_plan(config.train, model)
        # The frozen base, on every start and resume: an input of the step, like a teacher.
        s.base = lora.load_base(config.train.init_from, model, data.tokenizer_sha256)
    else:
        s.frozen = finetune.freeze_mask(model.abstract, config.train.freeze)
    if config.train.distill.teacher:
        s.teacher = distill.load_teacher(config, data, mesh)
        s.objective = distill.objective(
            s.objective, s.teacher, *distill.settings(config), config.task.logits_chunk
        )
    if config.train.masks:
        s.masks = prune.load_masks(config.train.masks, model)
    s.tx, s.schedule = make_optimizer(config.optim, config.train.steps, s.trained, s.frozen)
    trained = model.shardings if s.lora is None else s.lora.shardings
    s.state_shardings = {
        "params": trained,
        "opt_state": sharding.state_shardings(_opt_shapes(s), trained, mesh),
        "step": NamedSharding(mesh, PartitionSpec()),
    }
    return s


def _opt_shapes(s: Setup):
    """The optimizer state's shapes, from the model state's abstract parameters (the model is
    not traced again)."""
    return jax.eval_shape(s.tx.init, s.trained)


def create_state(s: Setup) -> dict:
    fn = lambda: init_state(s.model_cfg, s.tx, s.config.train.seed, s.lora)
    with sharding.use_rules(s.mesh, s.config.mesh.rules):
        return jax.jit(fn, out_shardings=s.state_shardings)()


def abstract_state(s: Setup) -> dict:
    """ShapeDtypeStructs with the target shardings, for checkpoint restore."""
    shapes = {
        "params": s.trained,
        "opt_state": _opt_shapes(s),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, s.state_shardings
    )


def _microbatches(batch: dict, n: int, batch_sh: NamedSharding) -> dict:
    """[B, ...] -> [n, B/n, ...] taking rows n apart, so each device keeps its own rows."""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, *batch_sh.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(batch_sh.mesh, spec))

    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted step with the run's frozen inputs bound (a distillation teacher's parameters,
    sparsity masks: arguments, not constants baked into the program): (state, batch)."""

    jitted: object
    inputs: dict

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.inputs)

    def lower(self, state, batch):
        return self.jitted.lower(state, batch, self.inputs)


def make_train_step(s: Setup) -> TrainStep:
    """jit(train_step) with explicit in/out shardings and the state donated."""
    graphdef, tx, n_micro = s.graphdef, s.tx, s.config.optim.grad_accum_steps
    schedule = s.schedule
    base_key = jax.random.fold_in(jax.random.key(s.config.train.seed), 2)
    loss_sums = s.objective.loss_sums
    inputs, input_shardings = {}, {}
    if s.teacher is not None:  # the teacher's parameters reach the loss as a keyword
        inputs["teacher"], input_shardings["teacher"] = s.teacher.params, s.teacher.model.shardings
    if s.masks is not None:
        inputs["masks"] = s.masks
        input_shardings["masks"] = {n: m.sharding for n, m in s.masks.items()}

    if s.base is not None:  # LoRA: the frozen base the adapters are merged into
        inputs["base"], input_shardings["base"] = s.base, s.model.shardings
    plan = s.lora

    def summed_loss(params, mb, key, inputs):
        # LoRA: the step's params are the adapters, merged into the frozen base here, so the
        # gradient reaches the adapters alone.
        full = params if plan is None else lora.merge(inputs["base"], params, plan)
        extra = {"teacher_params": inputs["teacher"]} if "teacher" in inputs else {}
        sums = loss_sums(nnx.merge(graphdef, full), mb, key, **extra)
        return sums["nll"], sums

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def train_step(state, batch, inputs):
        params = state["params"]
        # Dropout and masking keys are a function of (seed, step): resume continues exactly.
        key = jax.random.fold_in(base_key, state["step"])
        if n_micro == 1:
            (_, sums), grads = grad_fn(params, batch, key, inputs)
        else:

            def accumulate(carry, xs):
                mb, i = xs
                (_, sums_i), g_i = grad_fn(params, mb, jax.random.fold_in(key, i), inputs)
                return jax.tree.map(jnp.add, carry, (sums_i, g_i)), None

            mbs = _microbatches(batch, n_micro, s.batch_sharding)
            first = jax.tree.map(lambda x: x[0], mbs)
            sums_shape = jax.eval_shape(summed_loss, params, first, key, inputs)[1]
            zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (sums_shape, params))
            (sums, grads), _ = jax.lax.scan(accumulate, zero, (mbs, jnp.arange(n_micro)))
        # Sums over the whole batch, then one division: microbatching does not change the mean.
        tokens = jnp.maximum(sums["tokens"], 1.0)
        grads = jax.tree.map(lambda g: g / tokens, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        updates = prune.apply_masks(updates, inputs.get("masks"))  # pruned weights stay zero
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": sums["nll"] / tokens,
            "grad_norm": optax.global_norm(finetune.trained_only(grads, s.frozen)),  # as clipped
            "tokens": tokens,
            # In the step: evaluated on the host, the schedule is a few eager dispatches a log.
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    replicated = NamedSharding(s.mesh, PartitionSpec())
    jitted = jax.jit(
        train_step,
        # One sharding for every batch array (a pytree prefix): rows split over the batch axes.
        in_shardings=(s.state_shardings, s.batch_sharding, input_shardings),
        out_shardings=(s.state_shardings, replicated),
        donate_argnums=(0,),
    )
    return TrainStep(jitted, inputs)


def train(config, workdir: str | Path, devices=None) -> dict:
    """Train (or resume) the configured model in `workdir`; returns the final metrics."""
    if storage.is_remote(workdir):  # Path() would make gs://B/run the local ./gs:/B/run
        raise config_lib.ConfigError(
            f"--workdir {workdir} is remote, but the workdir (lock, config, metrics, "
            "TensorBoard) must be local: use a local --workdir and "
            f"--config.train.checkpoint_dir={str(workdir).rstrip('/')}/checkpoints"
        )
    workdir = Path(workdir)
    # The lock first (one trainer per workdir, refused before any work), and the signal
    # handlers for the whole run: a Ctrl-C during setup or the first compile exits at once.
    lock = WorkdirLock(workdir, enabled=jax.process_index() == 0, agree=jax.process_count() > 1)
    with lock, StopSignal() as stop:
        s = setup(config, workdir, devices)
        directory = config_lib.checkpoint_dir(config, workdir)
        ckpt = Checkpointer(directory, keep=config.train.keep_checkpoints)
        try:
            result = _Loop(s, ckpt, workdir, stop).run()
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                ckpt.close()
            raise
        ckpt.close()
        return result


def restore_or_init(s: Setup, ckpt: Checkpointer) -> dict:
    latest = ckpt.latest_complete_step()
    if s.lora is not None:
        monitor.console(
            f"LoRA: {s.lora.num_trainable()} trainable parameters in adapters of rank "
            f"{s.lora.rank} on {len(s.lora.targets)} kernels of {s.config.train.init_from}"
        )
    if latest is None:
        state = create_state(s)
        if s.config.train.init_from and s.lora is None:  # fresh only: a resume has its own
            state["params"], report = finetune.load_pretrained(
                s.config.train.init_from,
                state["params"],
                s.config.mesh.rules,
                s.data.tokenizer_sha256,
            )
            monitor.console(finetune.summary_line(report))
        state["params"] = prune.apply_masks(state["params"], s.masks)
        return state
    monitor.console(f"resuming from checkpoint at step {latest} in {ckpt.directory}")
    return ckpt.restore(latest, abstract_state(s), expect_meta=s.state_meta())


class _Loop:
    """The hot loop: dispatch ahead, read metrics one step late, save and evaluate on schedule."""

    def __init__(self, s: Setup, ckpt: Checkpointer, workdir: Path, stop: StopSignal):
        self.s, self.ckpt, self.cfg, self.workdir = s, ckpt, s.config.train, workdir
        self.stop = stop
        self.writer = monitor.MetricsWriter(workdir)
        row = config_lib.row_len(s.config)
        self.tokens_per_step = s.config.data.batch_size * row
        peak = evaluate.peak_tflops(jax.devices()[0].device_kind, self.cfg.peak_tflops)
        flops = evaluate.flops_per_token(s.model_cfg, row)
        self.peak_flops = None if peak is None else peak * 1e12 * s.mesh.size
        self.flops_per_token = flops
        self.train_step = make_train_step(s)
        self.eval_step = make_eval_step(s)
        self.clock = (time.perf_counter(), 0)  # (time, step) at the start of the log window

    def run(self) -> dict:
        s, cfg = self.s, self.cfg
        with sharding.use_rules(s.mesh, s.config.mesh.rules):
            state = restore_or_init(s, self.ckpt)
            # Only now: a launch refused by the checks above must not replace the config of
            # the checkpoints already in the workdir (eval and generate read it).
            if jax.process_index() == 0:
                config_lib.save_config(s.config, self.workdir)
                if s.data.description is not None:
                    text = json.dumps(s.data.description, indent=2) + "\n"
                    (self.workdir / "data.json").write_text(text)
            start = int(jax.device_get(state["step"]))
            self.writer.resume(start, eval_again=start >= cfg.steps)  # each step logged once
            if s.data.baselines:
                monitor.console(
                    "compressors on the validation text: "
                    + ", ".join(f"{k} {v:.4f} bits/byte" for k, v in s.data.baselines.items())
                )
            stop = self.stop
            state, step = self._steps(state, start, stop)
            done = step >= cfg.steps
            final = self._evaluate(step, s.model_params(state["params"])) if done else None
            if final is None:  # a signal (also during the final eval), or train.stop_at
                self._save(step, state)
                self.ckpt.wait()
                why = f"received signal {stop.received}" if stop.received else "train.stop_at"
                again = "the same command" if stop.received else "without train.stop_at"
                monitor.console(f"{why}: saved checkpoint at step {step}; run {again} to resume")
                return {"step": step, "stopped": True}
            self._save(step, state)
        self.writer.close()
        return self._summary(step, final)

    def _steps(self, state, start: int, stop: StopSignal):
        s, cfg = self.s, self.cfg
        prefetch = Prefetcher(
            s.data.train_batch, s.batch_sharding, start, cfg.steps, s.config.data.prefetch
        )
        pending, step = None, start
        end = min(cfg.stop_at, cfg.steps) if cfg.stop_at > 0 else cfg.steps
        self.clock, self.first_step = (time.perf_counter(), start), start + 1
        try:
            while step < end and not stop.should_stop(step):
                state, metrics = self.train_step(state, prefetch.next())
                stop.started()  # compiled and dispatched: a signal now saves this step
                step += 1
                if pending is not None:
                    self._finish(*pending)  # the previous step's metrics, read one step late
                pending = (step, metrics)
                evaluating = cfg.eval_every > 0 and step % cfg.eval_every == 0
                saving = step % cfg.checkpoint_every == 0
                if evaluating or saving or step == end or stop.received is not None:
                    self._finish(*pending)
                    pending = None
                if evaluating and step < cfg.steps:
                    self._evaluate(step, s.model_params(state["params"]))
                if saving and step < cfg.steps:
                    self._save(step, state)
                if evaluating or saving:
                    self.clock = (time.perf_counter(), step)  # keep eval/save out of tokens/s
            if pending is not None:  # a stop signal ended the loop: check the step before saving
                self._finish(*pending)
        finally:
            prefetch.close()
        return state, step

    def _finish(self, step: int, metrics) -> None:
        """Check a step's loss (NaN stops the run) and log it when due."""
        m = jax.device_get(metrics)
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(gnorm)):
            raise TrainingError(
                f"non-finite loss {loss} or grad norm {gnorm} at step {step}; training stopped, "
                f"the last good checkpoint (step {self.ckpt.latest_step()}) is kept: lower "
                "optim.lr, raise optim.warmup_steps or set optim.clip_norm, then re-run to resume"
            )
        due = step % self.cfg.log_every == 0 or step == self.cfg.steps
        t0, step0 = self.clock
        now = time.perf_counter()
        if not due:
            if step == self.first_step:
                self.clock = (now, step)  # keep compilation out of tokens/s
            return
        tok_s = (step - step0) * self.tokens_per_step / max(now - t0, 1e-9)
        record = {
            "train/loss": loss,
            "train/grad_norm": gnorm,
            "train/lr": float(m["lr"]),
            "tokens_per_sec": tok_s,
        }
        if self.peak_flops:
            record["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        eta = (self.cfg.steps - step) * (now - t0) / max(step - step0, 1)
        monitor.console(monitor.progress_line(step, self.cfg.steps, record, eta))
        self.writer.write(step, record)
        self.clock = (now, step)

    def _evaluate(self, step: int, params) -> dict | None:
        """The eval metrics, or None when a stop signal came first (the eval is abandoned)."""
        if self.stop.received is not None:
            return None
        try:
            with self.stop.interruptible():
                metrics = run_eval(self.s, self.eval_step, params, label=f"eval at step {step}")
                if self.cfg.eval_decode > 0:
                    metrics.update(self._decode_metrics(params))
        except Interrupted as e:
            monitor.console(f"received signal {e.args[0]}: evaluation at step {step} abandoned")
            return None
        monitor.console(monitor.eval_line(step, metrics))
        self.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def _decode_metrics(self, params) -> dict:
        from jaxlm import seq2seq_eval  # sacrebleu is imported only by runs that decode

        gen = seq2seq_eval.evaluate_generation(
            self.s, params, num_examples=self.cfg.eval_decode, num_batches=self.cfg.eval_steps
        )
        return {k: gen[k] for k in ("bleu", "chrf", "exact_match", "decoded_examples")}

    def _save(self, step: int, state) -> None:
        self.ckpt.save(step, state, {**self.s.state_meta(), "step": step})

    def _summary(self, step: int, final: dict) -> dict:
        out = {"step": step, **{f"eval/{k}": v for k, v in final.items()}}
        baselines = self.s.data.baselines or {}
        if "bits_per_byte" in final:
            line = f"final validation bits/byte {final['bits_per_byte']:.4f}"
            line += "".join(f" | {k} {v:.4f}" for k, v in baselines.items())
            monitor.console(line)
        out.update({f"baseline/{k}": v for k, v in baselines.items()})
        return out
