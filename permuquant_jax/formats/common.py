"""Helpers shared by the number formats: group checks, padding, input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_group(x: jax.Array, group: int, what: str = "input") -> None:
    """Raise ValueError unless the last axis of `x` is a whole number of groups of `group`.

    `what` names the tensor in the message (e.g. a parameter path).
    """
    if x.ndim == 0:
        raise ValueError(f"{what}: expected an array with at least one axis, found a scalar")
    k = x.shape[-1]
    if k == 0 or k % group:
        raise ValueError(
            f"{what}: last axis has {k} elements, which is not a multiple of the group size {group}; "
            f"pad it with permuquant_jax.formats.common.pad_to_group(x, {group}) "
            f"(zeros quantize to zero) or use a group that divides {k}"
        )


def pad_to_group(x: jax.Array, group: int) -> jax.Array:
    """Zero-pad the last axis of `x` up to the next multiple of `group` (no copy if already one).

    Zeros quantize to zero in every format here, so the padded columns contribute nothing to a
    matmul; slice them off after dequantizing with `y[..., :k]`.
    """
    if group <= 0:
        raise ValueError(f"group must be a positive integer, found {group}")
    k = x.shape[-1]
    pad = (-k) % group
    if pad == 0:
        return x
    widths = [(0, 0)] * (x.ndim - 1) + [(0, pad)]
    return jnp.pad(x, widths)


def check_float_input(x: jax.Array, what: str = "input") -> None:
    """Raise TypeError unless `x` is float32, bfloat16 or float16."""
    if x.dtype not in FLOAT_INPUT_DTYPES:
        raise TypeError(
            f"{what}: expected float32, bfloat16 or float16 values, found dtype {x.dtype}; "
            "cast it with x.astype(jnp.float32)"
        )


def check_finite(x: jax.Array, name: str) -> None:
    """Eager check that `x` holds no NaN or Inf; raise ValueError naming the tensor if it does.

    Not jittable by design: weights are checked once, at quantization time.
    """
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name}: the NaN/Inf check of a weight runs eagerly; call quantize_weight outside jit "
            "(or call quantize, which does not check, inside jit)"
        )
    a = np.asarray(jnp.asarray(x, jnp.float32))
    bad = ~np.isfinite(a)
    if bad.any():
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"weight {name!r} (shape {a.shape}) holds {n_nan} NaN and {n_inf} Inf values "
            f"(first at index {first}); they cannot be quantized: fix the checkpoint or keep "
            "this tensor out of the quantization plan"
        )


@jax.custom_batching.custom_vmap
def _ieee_divide(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.optimization_barrier(a / jax.lax.optimization_barrier(b))


@_ieee_divide.def_vmap
def _ieee_divide_vmap(axis_size: int, in_batched: list[bool], a: jax.Array, b: jax.Array):
    # vmap would broadcast an unbatched operand inside the division, where XLA can rewrite it
    # again: give both operands the batch axis before the barriers.
    a = a if in_batched[0] else jnp.broadcast_to(a, (axis_size, *a.shape))
    b = b if in_batched[1] else jnp.broadcast_to(b, (axis_size, *b.shape))
    return _ieee_divide(a, b), True


def true_divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """`a / b` with IEEE (correctly rounded) division, also under jit and vmap.

    XLA's algebraic simplifier rewrites a division by a broadcast (a scalar, a constant, a per-row
    or per-block scale) into a multiplication by the rounded reciprocal, and (A / B) / C into
    A / (B * C); both are off by an ulp for some inputs, so jit, vmap and eager would disagree
    with each other and with torchao. Both operands are broadcast to one shape (with the batch
    axis under vmap) and the divisor and quotient pass through optimization barriers, which keeps
    every division a true one in the written order (at the cost of materializing them).
    """
    a = jnp.asarray(a)
    shape = jnp.broadcast_shapes(a.shape, jnp.shape(b))
    a = jnp.broadcast_to(a, shape)
    b = jnp.broadcast_to(jnp.asarray(b, a.dtype), shape)
    return _ieee_divide(a, b)


def is_concrete(x: object) -> bool:
    """True if `x` is a Python number or a non-traced array (its value can be inspected)."""
    return not isinstance(x, jax.core.Tracer)
