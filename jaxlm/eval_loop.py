"""The eval loop shared by training and the eval program: a jitted eval step that adds each
validation batch's sums to the running ones, and `run_eval` over a data source's batches.

`s` is a `train.Setup` (or anything with its .graphdef, .objective, .model, .mesh,
.batch_sharding, .data and .config).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import distributed
from jaxlm.data.feed import to_device


@dataclasses.dataclass(frozen=True)
class EvalStep:
    """`step`: jit(params, batch, index, sums) -> sums + the batch's sums, `index` (the eval
    batch's) keying masking; `zeros(params, batch, index)`: the sums before the first batch.

    Each step adds to the sums of the one before, so every device runs the steps in one order:
    independent steps may run in any order (XLA:CPU does), and two processes meeting different
    steps' collectives wait for each other forever."""

    step: object
    zeros: object


def make_eval_step(s) -> EvalStep:
    graphdef, eval_sums = s.graphdef, s.objective.eval_sums
    base_key = jax.random.fold_in(jax.random.key(s.config.train.seed), 3)

    def batch_sums(params, batch, index):
        key = jax.random.fold_in(base_key, index)
        return eval_sums(nnx.merge(graphdef, params), batch, key)

    def eval_step(params, batch, index, sums):
        return jax.tree.map(jnp.add, sums, batch_sums(params, batch, index))

    replicated = NamedSharding(s.mesh, PartitionSpec())
    shapes = []  # of the sums, traced once

    def zeros(params, batch, index):
        if not shapes:
            shapes.append(jax.eval_shape(batch_sums, params, batch, index))
        zero = lambda x: np.zeros(x.shape, x.dtype)  # noqa: E731
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, replicated, lambda _: zero(x)),
            shapes[0],
        )

    step = jax.jit(
        eval_step,
        in_shardings=(s.model.shardings, s.batch_sharding, replicated, replicated),
        out_shardings=replicated,
    )
    return EvalStep(step, zeros)


def run_eval(
    s, eval_step: EvalStep, params, max_batches: int | None = None, label: str = "eval"
) -> dict:
    """Metrics over the validation batches (train.eval_steps of them unless max_batches).

    Every process runs the same batches in the same order (the data source's contract), one
    batch in flight; in a multi-process run each waits at most train.hang_timeout seconds.
    """
    n = s.config.train.eval_steps if max_batches is None else max_batches
    timeout = s.config.train.hang_timeout
    replicated = NamedSharding(s.mesh, PartitionSpec())
    batches = s.data.eval_batches(n)
    sums = None
    for i, batch in enumerate(batches):
        with distributed.deadline(f"{label} batch {i + 1} of {len(batches)}", timeout):
            index = jax.make_array_from_callback((), replicated, lambda _, i=i: np.int32(i))
            batch = to_device(batch, s.batch_sharding)
            if sums is None:
                sums = eval_step.zeros(params, batch, index)
            previous, sums = sums, eval_step.step(params, batch, index, sums)
            # Waiting for the batch before keeps a hang within the batch named above.
            jax.block_until_ready(previous)
    with distributed.deadline(f"{label}: the sums of {len(batches)} batches", timeout):
        sums = jax.device_get(sums)
    return s.objective.finish(sums)
