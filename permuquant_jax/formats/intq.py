"""Symmetric INTn per group (n = 2..8, group 16/32/64/128) with a float32 or bfloat16 scale per group.

    qmax  = 2**(n-1) - 1
    s     = cast(amax_group / qmax, scale_dtype)          (float32 math, then rounded to the scale dtype)
    q     = clip(round_half_even(x / f32(s)), -qmax, qmax)   stored as int8
    x_hat = q * f32(s)

The grid is symmetric ([-qmax, qmax]; -2**(n-1) is not used), so quantization is sign-symmetric;
INT2 is therefore ternary {-1, 0, 1}. An all-zero group gets s = 0 and dequantizes to zeros.
Division by the stored (rounded) scale keeps quantize/dequantize consistent: a tensor already on
the grid of its own scales round-trips exactly. Codes are kept unpacked (one int8 per element);
the bits per weight in the registry count n bits plus the scale.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from permuquant_jax.formats.common import check_float_input, check_group, true_divide, widen_exact

GROUP_SIZES = (16, 32, 64, 128)
BITS = tuple(range(2, 9))
SCALE_DTYPES = (jnp.float32, jnp.bfloat16)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["bits", "group"])
@dataclasses.dataclass(frozen=True)
class IntQTensor:
    """A symmetric INTn per-group quantized array: int8 `values [..., K]`, `scales [..., K/group]`."""

    values: jax.Array
    scales: jax.Array
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


def qmax(bits: int) -> int:
    """Largest code magnitude of symmetric INT`bits`: 2**(bits-1) - 1."""
    return 2 ** (bits - 1) - 1


def _check_args(bits: int, group: int, scale_dtype: jnp.dtype) -> None:
    if bits not in BITS:
        raise ValueError(f"INT bits must be one of {BITS}, found {bits!r}")
    if group not in GROUP_SIZES:
        raise ValueError(f"INT group size must be one of {GROUP_SIZES}, found {group!r}")
    if jnp.dtype(scale_dtype) not in [jnp.dtype(d) for d in SCALE_DTYPES]:
        raise ValueError(f"INT scale dtype must be float32 or bfloat16, found {scale_dtype!r}")


def quantize(x: jax.Array, bits: int = 4, group: int = 64, scale_dtype: jnp.dtype = jnp.bfloat16) -> IntQTensor:
    """Quantize `x [..., K]` (K a multiple of `group`) to symmetric INT`bits` per group of `group`.

    Jittable (bits, group, scale_dtype static) and vmappable. NaN in a group propagates (its
    scale is NaN, so the whole group dequantizes to NaN).
    """
    _check_args(bits, group, scale_dtype)
    check_float_input(x, "intq.quantize")
    check_group(x, group, "intq.quantize")
    m = qmax(bits)
    xb = widen_exact(x).reshape(*x.shape[:-1], x.shape[-1] // group, group)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    scales = true_divide(amax, m).astype(scale_dtype)
    s32 = widen_exact(scales)
    safe = jnp.where(s32 == 0, jnp.float32(1.0), s32)
    q = jnp.clip(jnp.round(true_divide(xb, safe[..., None])), -m, m)
    q = jnp.where(jnp.isnan(q), 0.0, q)  # int8 of NaN is undefined; the NaN scale carries it
    return IntQTensor(values=q.astype(jnp.int8).reshape(x.shape), scales=scales, bits=bits, group=group)


def dequantize(q: IntQTensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Values of `q` as `dtype`: int code * float32(scale), then cast."""
    s32 = widen_exact(q.scales)
    vb = q.values.astype(jnp.float32).reshape(*s32.shape, q.group) * s32[..., None]
    return vb.reshape(q.values.shape).astype(dtype)


def fake_quant(x: jax.Array, bits: int = 4, group: int = 64, scale_dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """`dequantize(quantize(x, ...), x.dtype)` in one jittable function."""
    return dequantize(quantize(x, bits, group, scale_dtype), x.dtype)
