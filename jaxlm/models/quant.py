"""Integer weights for DenseGeneral: symmetric int8 and grouped int4 kernels, and QAT fake-quant.

A quantized kernel [in..., out...] is stored as integers plus fp32 scales [G, out...]: the
flattened input axis I = prod(in) is cut into G groups of I / G rows, each with its own scale
per output (G = 1: one scale per output channel). int8 kernels keep the kernel's shape (int8);
int4 ones are packed two to a byte along the flattened input axis, [I / 2, out...] uint8, so
they take half an int8 kernel's bytes on disk and in memory. The forward pass dequantizes to the
compute dtype just before the einsum (weight-only quantization). jaxlm/compress/quantize.py
turns a float run into such a run; the numerics live here, beside the layer that uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

QMAX = {"int8": 127, "int4": 7}


def num_groups(in_size: int, group_size: int) -> int:
    """Groups along the flattened input axis (group_size 0: one group, per-channel scales)."""
    return 1 if group_size <= 0 else in_size // group_size


def stored_shape(kind: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> tuple:
    """The integer kernel's stored shape."""
    if kind == "int4":
        return (math.prod(in_shape) // 2, *out_shape)
    return (*in_shape, *out_shape)


def check_kernel(kind: str, in_shape: Sequence[int], group_size: int, where: str) -> None:
    """A one-line ValueError naming model.quant_group_size when the groups do not fit."""
    size = math.prod(in_shape)
    if group_size < 0 or (group_size and size % group_size):
        raise ValueError(
            f"model.quant_group_size={group_size} does not divide the input size {size} of "
            f"{where}; pick a divisor of every matmul's input (or 0: one scale per output)"
        )
    if kind == "int4" and (size % 2 or (group_size and group_size % 2)):
        raise ValueError(
            f"model.quant=int4 packs two values a byte: {where} has an odd input size {size} "
            f"or group size {group_size}; use an even model.quant_group_size or int8"
        )


def quantize_kernel(w, n_in: int, kind: str, group_size: int):
    """(integer kernel as stored, fp32 scales [G, out...]) of a float kernel [in..., out...]."""
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    size, qmax = math.prod(in_shape), QMAX[kind]
    g = num_groups(size, group_size)
    w_GIO = w.astype(jnp.float32).reshape(g, size // g, *out_shape)
    absmax = jnp.max(jnp.abs(w_GIO), axis=1)
    # An all-zero group keeps scale 1 (its values quantize to 0) instead of dividing by zero.
    scale = jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float32)
    q_GIO = jnp.clip(jnp.round(w_GIO / scale[:, None]), -qmax, qmax).astype(jnp.int8)
    q = q_GIO.reshape(*in_shape, *out_shape)
    if kind == "int4":
        q = pack_int4(q.reshape(size, *out_shape))
    return q, scale


def dequantize_kernel(q, scale, in_shape: Sequence[int], out_shape: Sequence[int], kind: str):
    """The fp32 kernel [in..., out...] an integer kernel and its scales stand for."""
    size = math.prod(in_shape)
    if kind == "int4":
        q = unpack_int4(q)
    g = scale.shape[0]
    w_GIO = q.reshape(g, size // g, *out_shape).astype(jnp.float32) * scale[:, None]
    return w_GIO.reshape(*in_shape, *out_shape)


def pack_int4(q):
    """int8 values in [-8, 7], [I, ...] with I even -> uint8 [I / 2, ...] (low nibble first)."""
    u = q.astype(jnp.uint8) & 0xF
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(p):
    """The inverse of pack_int4: uint8 [I / 2, ...] -> int8 [I, ...]."""
    lo, hi = (p & 0xF).astype(jnp.int8), (p >> 4).astype(jnp.int8)
    lo, hi = jnp.where(lo > 7, lo - 16, lo), jnp.where(hi > 7, hi - 16, hi)
    return jnp.stack([lo, hi], axis=1).reshape(-1, *p.shape[1:])


def fake_quant(x, axes: Sequence[int]):
    """int8 round trip of `x` with one absmax scale per slice over `axes`, and a straight-through
    gradient (the identity), as quantization-aware training uses it."""
    x32 = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x32), axis=tuple(axes), keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(x32 / scale), -127, 127) * scale
    return (x32 + jax.lax.stop_gradient(q - x32)).astype(x.dtype)
