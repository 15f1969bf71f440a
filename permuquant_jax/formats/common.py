"""Helpers shared by the number formats: group checks, padding, input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
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


def true_divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
    """`a / b` in float32, correctly rounded (IEEE round to nearest even) on every backend.

    Compilers do not keep `a / b` exact: XLA rewrites a division by a broadcast (a scalar, a
    per-row or per-block scale) into a multiplication by the rounded reciprocal and (A / B) / C
    into A / (B * C), and GPUs divide with an approximate instruction; each is off by an ulp for
    some inputs, so backends, jit, vmap and eager would disagree with each other and with torchao.
    Here the quotient of two normal floats is computed from their integer mantissas by restoring
    long division (24 quotient bits, then round half to even on the remainder), which no compiler
    rewrites; zeros, subnormals, Inf, NaN and results outside the normal range fall back to `a / b`
    (there the callers clamp or propagate anyway). Broadcasts `a` and `b` to one shape.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return _divide_rn(*jnp.broadcast_arrays(a, b))


@jax.jit
def _divide_rn(a: jax.Array, b: jax.Array) -> jax.Array:
    ia = jax.lax.bitcast_convert_type(a, jnp.uint32)
    ib = jax.lax.bitcast_convert_type(b, jnp.uint32)
    sign = (ia ^ ib) & jnp.uint32(0x80000000)
    ea = ((ia >> 23) & 0xFF).astype(jnp.int32)
    eb = ((ib >> 23) & 0xFF).astype(jnp.int32)
    ma = (ia & 0x7FFFFF) | jnp.uint32(0x800000)
    mb = (ib & 0x7FFFFF) | jnp.uint32(0x800000)
    shift = ma < mb  # make the mantissa quotient lie in [1, 2)
    rem = jnp.where(shift, ma << 1, ma)

    def step(_: int, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        q, rem = carry
        bit = rem >= mb
        return (q << 1) | bit.astype(jnp.uint32), (rem - jnp.where(bit, mb, jnp.uint32(0))) << 1

    # A real loop, not 24 unrolled steps: unrolled, XLA's fusion can re-emit each step's operands
    # per use and compile times explode.
    q, rem = jax.lax.fori_loop(0, 24, step, (jnp.zeros_like(ma), rem))
    # rem is now twice the remainder: compare it with the divisor to round half to even
    q = q + ((rem > mb) | ((rem == mb) & ((q & 1) == 1))).astype(jnp.uint32)
    e = ea - eb + 127 - shift.astype(jnp.int32)
    carry = q >> 24  # the rounding carried into a 25th bit
    q = q >> carry
    e = e + carry.astype(jnp.int32)
    bits = sign | (e.astype(jnp.uint32) << 23) | (q & 0x7FFFFF)
    exact = jax.lax.bitcast_convert_type(bits, jnp.float32)
    normal_in = (ea > 0) & (ea < 255) & (eb > 0) & (eb < 255)
    return jnp.where(normal_in & (e >= 1) & (e <= 254), exact, a / b)


# float32 value of every float8_e4m3fn byte (NaN for 0x7F / 0xFF).
_E4M3_LUT = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def widen_exact(a: jax.Array) -> jax.Array:
    """`a` as float32, keeping the rounding of its narrower dtype even inside a fused jit.

    XLA (on GPUs: `xla_allow_excess_precision`, on by default) may delete a pair of converts
    f32 -> narrow -> f32 and so skip the rounding to the narrow type: a quantizer would then
    compute with unrounded block scales (or unrounded bf16 inputs). Widening through the bits
    (bfloat16, float16) or a lookup table (float8_e4m3fn) keeps it.
    """
    dt = jnp.dtype(a.dtype)
    if dt == jnp.float32:
        return a
    if dt == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32) << 16
        return jax.lax.bitcast_convert_type(bits, jnp.float32)
    if dt == jnp.float8_e4m3fn:
        return jnp.asarray(_E4M3_LUT)[jax.lax.bitcast_convert_type(a, jnp.uint8).astype(jnp.int32)]
    if dt == jnp.float16:
        h = jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
        sign, exp, man = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
        normal = jax.lax.bitcast_convert_type(sign | ((exp + 112) << 23) | (man << 13), jnp.float32)
        special = jax.lax.bitcast_convert_type(sign | jnp.uint32(0x7F800000) | (man << 13), jnp.float32)
        tiny = man.astype(jnp.float32) * jnp.float32(2.0**-24)  # zero and subnormals, exact
        tiny = jnp.where(sign != 0, -tiny, tiny)
        return jnp.where(exp == 0, tiny, jnp.where(exp == 31, special, normal))
    return a.astype(jnp.float32)


def is_concrete(x: object) -> bool:
    """True if `x` is a Python number or a non-traced array (its value can be inspected)."""
    return not isinstance(x, jax.core.Tracer)
