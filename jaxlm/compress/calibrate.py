"""Input statistics of the block kernels over calibration batches (Wanda's activation norms).

A forward pass of the objective's eval step, with every target DenseGeneral replaced (inside the
traced function only) by a wrapper that adds up the squares of its input per input feature. One
jitted function per batch shape; the sums add over batches and the norms are their square roots.
Positions are all counted, padding included: packed LM rows have next to none.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class _Recorder:
    """Stands in for a DenseGeneral: records sum(x^2) over its non-input axes, then calls it."""

    def __init__(self, layer, name: str, sink: dict):
        self.layer, self.name, self.sink = layer, name, sink

    def __call__(self, x):
        n_in = self.layer.n_in
        sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(x.ndim - n_in)))
        self.sink[self.name] = self.sink.get(self.name, 0.0) + sq
        return self.layer(x)


def _module(root, parts):
    for part in parts:
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _wrap(model, names, sink: dict) -> None:
    for name in names:
        parts = name.split("/")[:-1]  # the layer of ".../query/kernel"
        parent = _module(model, parts[:-1])
        setattr(parent, parts[-1], _Recorder(getattr(parent, parts[-1]), name, sink))


def input_norms(
    model_state, eval_sums, params, batches: Iterable[dict], names, seed: int = 0
) -> dict:
    """{kernel path in `names`: L2 norm of each input feature over the batches' tokens} as
    numpy arrays of the kernel's input shape. `eval_sums` is the objective's (tasks.Objective).
    """
    graphdef = model_state.graphdef

    @jax.jit
    def squares(params, batch, index):
        model = nnx.merge(graphdef, params)
        sink: dict = {}
        _wrap(model, names, sink)
        eval_sums(model, batch, jax.random.fold_in(jax.random.key(seed), index))
        return sink

    total = None
    with model_state.rules_context():
        for i, batch in enumerate(batches):
            sq = squares(params, batch, i)
            total = sq if total is None else jax.tree.map(jnp.add, total, sq)
    if total is None:
        raise ValueError("no calibration batches: pass --calibration_batches of at least 1")
    missing = sorted(set(names) - set(total))
    if missing:
        raise RuntimeError(f"calibration saw no input for {missing[:3]}; is it used?")
    return {n: np.sqrt(np.asarray(jax.device_get(v), np.float64)) for n, v in total.items()}
