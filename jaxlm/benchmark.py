"""Training-step throughput on synthetic data: compile, warm up, time, report one dict.

Timing uses chunks of steps dispatched back to back (no host sync inside a chunk), so the figure
is what the training loop can reach; the median over chunks resists one-off stalls.
`memory_report` instead compiles the step without running it and reports memory per device,
for the local devices or for a TPU topology this machine does not have.
"""

from __future__ import annotations

import math
import statistics
import time

import flax
import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import evaluate, sharding, train
from jaxlm.data import feed
from jaxlm.data.builtin import synthetic
from jaxlm.data.types import DataSource
from jaxlm.decode_settings import SamplingSettings
from jaxlm.generate import make_generate
from jaxlm.state import ModelState


def device_peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def synthetic_source(config) -> DataSource:
    """Synthetic batches of the config's objective and shapes: no TensorFlow, no text, no
    host-side input cost in the figures."""
    return synthetic.build(config_lib.data_spec(config))


def benchmark(config, steps: int = 20, warmup: int = 3, chunks: int = 4) -> dict:
    """Time `steps` train steps of `config` on synthetic batches already on device."""
    t_start = time.perf_counter()
    s = train.setup(config, None, data=synthetic_source(config))
    step_fn = train.make_train_step(s)
    batches = [feed.to_device(s.data.train_batch(i), s.batch_sharding) for i in range(2)]
    with sharding.use_rules(s.mesh, config.mesh.rules):
        state = train.create_state(s)
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batches[0])
        first_loss = float(metrics["loss"])
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            state, metrics = step_fn(state, batches[i % 2])
        jax.block_until_ready(metrics)
        per_chunk = max(steps // chunks, 1)
        chunk_ms = []
        for _ in range(chunks):
            t0 = time.perf_counter()
            for i in range(per_chunk):
                state, metrics = step_fn(state, batches[i % 2])
            jax.block_until_ready(metrics)
            chunk_ms.append(1e3 * (time.perf_counter() - t0) / per_chunk)
    step_ms = statistics.median(chunk_ms)
    row = config_lib.row_len(config)
    tok_s = config.data.batch_size * row / (step_ms / 1e3)
    flops = evaluate.flops_per_token(s.model_cfg, row)
    peak = evaluate.peak_tflops(jax.devices()[0].device_kind, config.train.peak_tflops)
    tflops_per_device = tok_s * flops / 1e12 / s.mesh.size
    return {
        "device": jax.devices()[0].device_kind,
        "num_devices": s.mesh.size,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "params": s.model_cfg.num_params(),
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "median_step_ms": round(step_ms, 3),
        "tokens_per_sec": round(tok_s, 1),
        "model_tflops_per_device": round(tflops_per_device, 2),
        "peak_tflops": peak,
        "mfu": None if peak is None else round(tflops_per_device / peak, 4),
        "peak_memory_gib": device_peak_memory_gib(),
        "init_s": round(init_s, 2),  # setup + sharded state creation (init compile included)
        "compile_s": round(compile_s, 2),  # first train step: compilation + one step
        "loss_first": first_loss,
        "loss_last": float(metrics["loss"]),
    }


def decode_benchmark(
    config, batch_size: int, prompt_len: int = 16, new_tokens: int = 128, repeats: int = 3
) -> dict:
    """Tokens/s of the generation loop (prefill + KV-cache decode) with random parameters.

    Every row generates exactly `new_tokens` (no EOS); the figure counts generated tokens over
    the wall time of whole generate calls, prefill included, median over `repeats`.
    """
    if prompt_len + new_tokens > (row := config_lib.row_len(config)):
        raise ValueError(
            f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds the {row} tokens the "
            "model was trained on; lower them or raise --config.data.seq_len"
        )
    # The model state alone: no data, no optimizer. Any batch size on any mesh: the batch axis
    # is replicated, as LanguageModel decodes.
    model_cfg = config_lib.model_config(config, config_lib.synthetic_vocab_size(config))
    mesh = sharding.mesh_from_config(config.mesh)
    s = ModelState.build(model_cfg, mesh, sharding.replicated_batch_rules(config.mesh.rules))
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0)
    generate = make_generate(s.graphdef, settings)
    prompts = jax.random.randint(
        jax.random.key(0), (batch_size, prompt_len), 0, model_cfg.vocab_size, dtype="int32"
    )
    lengths = jax.numpy.full((batch_size,), prompt_len, "int32")
    params = s.init(config.train.seed)
    with s.rules_context():
        t0 = time.perf_counter()
        jax.block_until_ready(generate(params, prompts, lengths, jax.random.key(1)))
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(generate(params, prompts, lengths, jax.random.key(2 + i)))
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {
        "mode": "decode",
        "device": jax.devices()[0].device_kind,
        "num_devices": s.mesh.size,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "params": s.model_cfg.num_params(),
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "median_generate_s": round(seconds, 6),
        "tokens_per_sec": round(batch_size * new_tokens / seconds, 1),
        "ms_per_step": round(1e3 * seconds / new_tokens, 3),
        "peak_memory_gib": device_peak_memory_gib(),
        "compile_s": round(compile_s, 2),
    }


def memory_report(config, devices=None) -> dict:
    """Per-device memory of `config`'s train step, from compilation alone: nothing is allocated.

    The step is lowered against abstract state and batch (shapes, dtypes, shardings) and compiled
    for `devices` (default: all local devices; TPU topology devices work too, see
    `tpu_topology_devices`). State bytes come from the shardings; the rest is XLA's own analysis.
    """
    s = train.setup(config, None, devices, data=synthetic_source(config))
    state = train.abstract_state(s)
    # This process's rows (host numpy): only their dtypes and the global shape are used.
    rows = s.data.train_batch(0)
    batch = {}
    for k in rows:
        x = np.asarray(rows[k])
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        batch[k] = jax.ShapeDtypeStruct(shape, x.dtype, sharding=s.batch_sharding)
    t0 = time.perf_counter()
    with sharding.use_rules(s.mesh, config.mesh.rules):
        compiled = train.make_train_step(s).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    xla = {
        name: getattr(stats, f"{name}_size_in_bytes", None)
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }
    known = None not in (xla["argument"], xla["output"], xla["alias"], xla["temp"])
    params_b, opt_b = (bytes_per_device(state[k]) for k in ("params", "opt_state"))
    return {
        "mode": "memory",
        "device": s.mesh.devices.flat[0].device_kind,
        "num_devices": s.mesh.size,
        "mesh": dict(s.mesh.shape),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "params": s.model_cfg.num_params(),
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "remat": config.model.remat,
        "param_bytes_per_device": params_b,
        "opt_state_bytes_per_device": opt_b,
        "state_bytes_per_device": params_b + opt_b + bytes_per_device(state["step"]),
        **{f"{name}_bytes": value for name, value in xla.items()},
        # What XLA needs at the step's peak: inputs, outputs not written in place, scratch.
        "total_bytes_estimate": (
            xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] if known else None
        ),
        "compile_s": round(compile_s, 2),
    }


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def tpu_topology_devices(name: str, slices: int = 1) -> list:
    """Compile-only devices of a TPU topology ('v4:2x2x4' is a v4-32, 'v5e:4x4' a v5e-16).

    Needs the libtpu package (`pip install libtpu`), but no TPU: XLA's TPU compiler runs here.
    """
    from jax.experimental import topologies

    kwargs: dict = {"num_slices": slices} if slices > 1 else {}
    if name.split(":")[0] in ("v4", "v5", "v5p"):
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as JAX runs these chips
    try:
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise RuntimeError(
                "--topology needs libtpu, which is not installed; pip install libtpu (the "
                "version jax[tpu] pins), or set TPU_LIBRARY_PATH to a libtpu.so"
            ) from None
        raise RuntimeError(
            f"TPU topology {name!r}: {str(e).splitlines()[0]}; write GEN:AxBxC, e.g. v4:2x2x4 "
            "(v4-32) or v5e:4x4 (v5e-16)"
        ) from None
