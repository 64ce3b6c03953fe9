"""Building blocks shared by every model family: dense layers, embeddings, norms, MLPs, RoPE.

Shape legend for names like `x_BTD`: B batch, T query length, S key length, D d_model,
N query heads, K key/value heads, H head dim, F MLP hidden width, V vocabulary.

Every parameter is an `nnx.Param` whose `axes` metadata names its logical axes
(`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`); jaxlm/sharding.py maps them to mesh axes.
Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.models import quant
from jaxlm.models.spec import MLP_GATED


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def make_param(
    rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float, dtype
) -> nnx.Param:
    """A normal(0, std) parameter (std 0: zeros; std < 0: ones) tagged with logical axes."""
    if std > 0:
        value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = jnp.ones(shape, dtype)
    return nnx.Param(value, axes=tuple(axes))


class DenseGeneral(nnx.Module):
    """y = einsum(x, W) (+ b) over explicit in/out shapes, e.g. D -> (N, H) for a query.

    `quant` int8/int4 stores W as integers plus `scale` (jaxlm/models/quant.py), dequantized
    before the einsum; `qat` rounds x and W through int8 in the forward pass (straight-through
    gradients) for quantization-aware training.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        std: float,
        use_bias: bool,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs,
        quant: str = "none",
        group_size: int = 0,
        qat: bool = False,
    ):
        self.n_in, self.n_out = len(in_shape), len(out_shape)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = dtype_of(dtype)
        self.quant, self.qat = quant, qat
        pdt = dtype_of(param_dtype)
        if quant == "none":
            self.kernel = make_param(rngs, (*in_shape, *out_shape), axes, std, pdt)
        else:
            self._init_quantized(axes, group_size)
        self.bias = make_param(rngs, out_shape, axes[self.n_in :], 0.0, pdt) if use_bias else None

    def _init_quantized(self, axes, group_size: int) -> None:
        # Zeros of the stored shapes: a quantized model is only ever restored, never trained.
        shape = quant.stored_shape(self.quant, self.in_shape, self.out_shape)
        dt = jnp.int8 if self.quant == "int8" else jnp.uint8
        # int4's packed input axis is no longer one logical axis: replicated over the mesh.
        k_axes = tuple(axes) if self.quant == "int8" else (None, *axes[self.n_in :])
        self.kernel = nnx.Param(jnp.zeros(shape, dt), axes=k_axes)
        g = quant.num_groups(math.prod(self.in_shape), group_size)
        s_shape = (g, *self.out_shape)
        self.scale = nnx.Param(jnp.ones(s_shape, jnp.float32), axes=(None, *axes[self.n_in :]))

    def weight(self):
        """The kernel as floats in its logical shape (dequantized when stored as integers)."""
        if self.quant == "none":
            return self.kernel[...]
        k, s = self.kernel[...], self.scale[...]
        return quant.dequantize_kernel(k, s, self.in_shape, self.out_shape, self.quant)

    def __call__(self, x):
        x, w = x.astype(self.dtype), self.weight().astype(self.dtype)
        if self.qat:  # per-token activation scales, per-output-channel weight scales
            x = quant.fake_quant(x, range(x.ndim - self.n_in, x.ndim))
            w = quant.fake_quant(w, range(self.n_in))
        # One plain 2-D matmul [M, I] @ [I, O]: XLA:CPU runs it (and its transposes in the
        # backward pass) as single GEMMs, where a batched multi-axis einsum cost ~9% of a step.
        lead = x.shape[: x.ndim - self.n_in]
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = x.reshape(-1, n_in) @ w.reshape(n_in, n_out)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def dense_options(cfg) -> dict:
    """DenseGeneral keywords every block matmul (attention, MLP) takes from a model config."""
    return dict(
        use_bias=cfg.use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        quant=cfg.quant,
        group_size=cfg.quant_group_size,
        qat=cfg.qat,
    )


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` reuses it as a tied output projection."""

    def __init__(self, num: int, dim: int, *, std: float, dtype: str, param_dtype: str, rngs):
        self.dtype = dtype_of(dtype)
        self.embedding = make_param(
            rngs, (num, dim), ("vocab", "embed"), std, dtype_of(param_dtype)
        )

    def __call__(self, ids_BT):
        return jnp.take(self.embedding[...], ids_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        return jnp.einsum("btd,vd->btv", x_BTD, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: str, param_dtype: str, rngs, **_):
        self.eps, self.dtype = eps, dtype_of(dtype)
        self.scale = make_param(rngs, (dim,), ("embed",), -1.0, dtype_of(param_dtype))

    def __call__(self, x):
        # Statistics in fp32 even under bf16 compute: the mean of squares loses precision in bf16.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, use_bias: bool, dtype: str, param_dtype: str, rngs):
        self.eps, self.dtype = eps, dtype_of(dtype)
        pdt = dtype_of(param_dtype)
        self.scale = make_param(rngs, (dim,), ("embed",), -1.0, pdt)
        self.bias = make_param(rngs, (dim,), ("embed",), 0.0, pdt) if use_bias else None

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, use_bias: bool, dtype, param_dtype, rngs):
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return LayerNorm(
        dim, eps=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


# The activation of each MLP kind in spec.MLP_GATED (which also says whether it is gated).
MLP_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nnx.Module):
    """D -> F -> D, one of spec.MLP_GATED's kinds: GELU (GPT-2, BERT), ReLU (T5), SwiGLU, GeGLU."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        common = dense_options(cfg)
        self.kind = cfg.mlp
        self.up = DenseGeneral((d,), (f,), ("embed", "mlp"), std=cfg.init_std, rngs=rngs, **common)
        if MLP_GATED[self.kind]:
            self.gate = DenseGeneral(
                (d,), (f,), ("embed", "mlp"), std=cfg.init_std, rngs=rngs, **common
            )
        self.down = DenseGeneral(
            (f,), (d,), ("mlp", "embed"), std=residual_std(cfg), rngs=rngs, **common
        )

    def __call__(self, x_BTD):
        act, gated = MLP_ACTIVATIONS[self.kind], MLP_GATED[self.kind]
        h_BTF = act(self.gate(x_BTD)) * self.up(x_BTD) if gated else act(self.up(x_BTD))
        h_BTF = sharding.constrain(h_BTF, ("batch", "length", "mlp"))
        return self.down(h_BTF)


def residual_std(cfg) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers)


def rope(x_BTNH, positions_BT, theta: float):
    """Rotary position embedding over the last axis (rotate-half layout), in fp32."""
    h = x_BTNH.shape[-1]
    freq = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * freq
    sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


@jax.custom_vjp
def fusion_barrier(x):
    """The identity, whose gradient XLA's CPU compiler cannot fuse through (see Stack.run)."""
    return x


def _barrier_bwd(_, g):
    # XLA:CPU expands optimization_barrier before fusing, so the barrier is a conditional, which
    # nothing fuses into. Both branches return g (g * 2 / 2 is exact short of overflow), and the
    # second runs only when the gradient is already NaN.
    keep = ~jnp.isnan(g.reshape(-1)[0])
    return (jax.lax.cond(keep, lambda g: g, lambda g: g * 2 / 2, g),)


fusion_barrier.defvjp(lambda x: (x, None), _barrier_bwd)


def dropout(x, rate: float, key: jax.Array | None):
    """Inverted dropout; a None key (evaluation) or rate 0 is the identity."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
