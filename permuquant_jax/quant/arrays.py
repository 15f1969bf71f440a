"""Array helpers shared by folding and the quantized linear: reorder or scale one range of an axis,
with one compiled program per array shape (indices are built on the host)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def permute_axis(a: jnp.ndarray, perm: np.ndarray, axis: int, start: int, size: int) -> jnp.ndarray:
    """a with the range [start, start+size) of `axis` reordered by perm `[*stack, size]` (per stack entry)."""
    a = jnp.asarray(a)
    axis = axis % a.ndim
    perm = np.asarray(perm)
    stack, dim = perm.shape[:-1], a.shape[axis]
    # The whole index of the axis is built on the host, so one compiled gather serves every range
    # (start, size) of an array shape (one per range made dozens of small compilations).
    idx = np.array(np.broadcast_to(np.arange(dim, dtype=np.int32), (*stack, dim)))
    idx[..., start : start + size] = start + perm
    shape = [1] * a.ndim
    shape[: len(stack)] = stack
    shape[axis] = dim
    return _gather_axis(a, jax.device_put(idx.reshape(shape)), axis)


@functools.partial(jax.jit, static_argnums=2)
def _gather_axis(a, idx, axis):
    return jnp.take_along_axis(a, jnp.broadcast_to(idx, (*a.shape[:axis], idx.shape[axis], *a.shape[axis + 1 :])),
                               axis=axis)


def scale_axis(a: jnp.ndarray, s: np.ndarray, axis: int, start: int, size: int, op: str) -> jnp.ndarray:
    """a with the range [start, start+size) of `axis` multiplied (op "mul") or divided by s `[*stack, size]`."""
    return _scale_axis_jit(jnp.asarray(a), jnp.asarray(s, jnp.float32), axis % jnp.ndim(a), start, size, op)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _scale_axis_jit(a, s, axis, start, size, op):
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, start + size)
    v = jnp.asarray(s, jnp.float32)
    shape = [1] * a.ndim
    shape[: v.ndim - 1] = v.shape[:-1]
    shape[axis] = size
    v = v.reshape(shape)
    part = a[tuple(idx)].astype(jnp.float32)
    part = part * v if op == "mul" else part / v
    return a.at[tuple(idx)].set(part.astype(a.dtype))


def one_hot_rows(b: jnp.ndarray, start: int, size: int) -> jnp.ndarray:
    """Ones on the last-axis range [start, start+size) of b's shape, zeros elsewhere."""
    m = np.zeros(b.shape[-1], jnp.dtype(b.dtype))
    m[start : start + size] = 1
    return jax.device_put(np.array(np.broadcast_to(m, b.shape)))


# the names used before this module existed
_permute_axis = permute_axis
_scale_axis = scale_axis
_one_hot_rows = one_hot_rows
