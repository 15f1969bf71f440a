"""NVFP4: E2M1 values in blocks of 16 with an E4M3 scale per block and an FP32 global scale.

Numerics follow torchao 0.18 (`torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize` with
`per_tensor_scale = per_tensor_amax_to_scale(amax)`) bit for bit, in this order, all in float32:

    s_g   = amax / 2688                                   (2688 = 6 * 448; or static / per row)
    s_b   = e4m3(clamp((amax_block / 6) / s_g, 2**-6, 448))   round to nearest even
    r     = (1 / s_g) / f32(s_b)                          a reciprocal, as torchao and its kernel do
    code  = e2m1(clamp(x * r, -6, 6))                     round to nearest even, sign kept (-0 -> 0x8)
    x_hat = e2m1_value(code) * (s_g * f32(s_b))

The block scale is clamped below to the smallest normal E4M3 (2**-6), never to zero, so a block
whose scale underflows against a large global scale still gets a finite scale, and an all-zero
block gets scale byte 0x08 and codes 0 (dequantizes to zeros, never NaN). One deviation from
torchao, only where torchao divides by zero or overflows to inf and returns NaN: a computed global
scale below 2**-120 (an all-zero tensor or row, or one with amax < 2688 * 2**-120, about 2e-33)
is replaced by 1.0, which quantizes that tensor or row to zeros.

Packed layout: `codes[..., i]` holds element 2i in bits 0-3 and element 2i+1 in bits 4-7; a code
is sign (bit 3) and a magnitude index (bits 0-2) into (0, 0.5, 1, 1.5, 2, 3, 4, 6).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from permuquant_jax.formats.common import (
    check_finite,
    check_float_input,
    check_group,
    is_concrete,
    true_divide,
    widen_exact,
)

F4_E2M1_MAX = 6.0
F8E4M3_MAX = 448.0
BLOCK_SIZE = 16
# Smallest normal E4M3 value: torchao clamps block scales to it (torch.finfo(float8_e4m3fn).tiny).
F8E4M3_MIN_NORMAL = 2.0**-6
# Below this a global scale would make (1 / s_g) / s_b overflow to inf (with s_b = 2**-6); such
# scales (all-zero tensors or rows included) are replaced by 1.0.
MIN_GLOBAL_SCALE = 2.0**-120

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Value of each 4-bit code 0..15; codes 8..15 are the negatives (8 is -0.0).
_E2M1_LUT = np.array(list(E2M1_MAGNITUDES) + [-m for m in E2M1_MAGNITUDES], dtype=np.float32)

GlobalScale = None | str | float | jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales", "global_scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class NVFP4Tensor:
    """An NVFP4-quantized array of logical shape `[..., K]`.

    codes: uint8 `[..., K/2]`, two E2M1 codes per byte (element 2i low nibble, 2i+1 high nibble).
    scales: float8_e4m3fn `[..., K/16]`, one per block of 16 along the last axis.
    global_scale: float32, shape `()` (per tensor) or `[..., 1]` (per row). (An NVFP4Tensor
    returned from `jax.vmap(quantize)` with a per-tensor scale has global_scale `[B]`: dequantize
    it under the same vmap.)
    """

    codes: jax.Array
    scales: jax.Array
    global_scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape `[..., K]`."""
        return (*self.codes.shape[:-1], 2 * self.codes.shape[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of codes, block scales and global scale."""
        return int(self.codes.size + self.scales.size + 4 * self.global_scale.size)


def encode_e2m1(v: jax.Array) -> jax.Array:
    """Round float32 values to the nearest E2M1 code (ties to even, saturating at +-6).

    Returns uint8 codes 0..15; the sign bit is kept, so negative values that round to zero give
    code 8 (-0), as torchao's `f32_to_f4_unpacked` does.
    """
    m = jnp.abs(v)
    # Round-half-to-even on the 8-point grid: a tie goes to the even magnitude index, so the
    # comparison at each midpoint alternates between > (tie rounds down) and >= (tie rounds up).
    idx = (
        (m > 0.25).astype(jnp.uint8) + (m >= 0.75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5) + (m > 5.0)
    ).astype(jnp.uint8)
    sign = jnp.signbit(v).astype(jnp.uint8) << 3
    return idx | sign


def decode_e2m1(c: jax.Array) -> jax.Array:
    """Float32 value of each 4-bit E2M1 code (uint8 0..15)."""
    return jnp.asarray(_E2M1_LUT)[c.astype(jnp.int32) & 15]


def pack_codes(c: jax.Array) -> jax.Array:
    """Pack uint8 codes `[..., K]` into bytes `[..., K/2]`: element 2i low nibble, 2i+1 high nibble."""
    if c.shape[-1] % 2:
        raise ValueError(f"pack_codes needs an even last axis, found {c.shape[-1]}")
    c = c.astype(jnp.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_codes(codes: jax.Array) -> jax.Array:
    """Unpack bytes `[..., K/2]` into uint8 codes `[..., K]` (inverse of `pack_codes`)."""
    codes = codes.astype(jnp.uint8)
    lo = codes & 15
    hi = codes >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def global_scale_from_amax(amax: jax.Array) -> jax.Array:
    """torchao's `per_tensor_amax_to_scale`: float32 amax / (448 * 6)."""
    return true_divide(jnp.asarray(amax, jnp.float32), F8E4M3_MAX * F4_E2M1_MAX)


def _resolve_global_scale(x32: jax.Array, global_scale: GlobalScale) -> jax.Array:
    if global_scale is None:
        gs = global_scale_from_amax(jnp.max(jnp.abs(x32)))
    elif isinstance(global_scale, str):
        if global_scale != "per_row":
            raise ValueError(
                f"global_scale must be None (per tensor, dynamic), 'per_row', or a float32 number/"
                f"array; found the string {global_scale!r}"
            )
        gs = global_scale_from_amax(jnp.max(jnp.abs(x32), axis=-1, keepdims=True))
    else:
        gs = jnp.asarray(global_scale, jnp.float32)
        row_shape = (*x32.shape[:-1], 1)
        if gs.ndim and (gs.shape[-1] != 1 or jnp.broadcast_shapes(gs.shape, row_shape) != row_shape):
            raise ValueError(
                f"a static global_scale must be a scalar or have shape [..., 1] broadcastable to "
                f"{row_shape}; found shape {gs.shape}"
            )
        if is_concrete(gs):
            g = np.asarray(gs)
            if not (np.isfinite(g).all() and (g >= MIN_GLOBAL_SCALE).all()):
                raise ValueError(
                    f"a static global_scale must be finite and >= 2**-120, found "
                    f"{g if g.size < 8 else g.min()}; compute it as amax / 2688 with global_scale_from_amax"
                )
        if gs.ndim:
            gs = jnp.broadcast_to(gs, row_shape)
    # torchao returns NaN here (0/0, or inf * 0 once (1/s_g)/s_b overflows); such scales only
    # arise for all-zero (or < 2e-33) tensors/rows: use 1.0, which quantizes them to zeros.
    # `gs < MIN` is False for NaN, so a NaN scale (NaN input) still propagates.
    return jnp.where(gs < MIN_GLOBAL_SCALE, jnp.float32(1.0), gs)


def quantize(x: jax.Array, global_scale: GlobalScale = None) -> NVFP4Tensor:
    """Quantize `x [..., K]` (K a multiple of 16) to NVFP4, bit-exact with torchao.

    global_scale: None = amax(|x|) / 2688 over the whole array, computed on the fly; "per_row" =
    one per row (shape `[..., 1]`: per token for activations, per output channel for weights);
    a float or float32 array (scalar or `[..., 1]`) = a calibrated static scale.

    Jittable and vmappable (pass a string global_scale as a static argument). Does not check for
    NaN/Inf: NaN in the input propagates (its block dequantizes to NaN, and with the dynamic
    global scale the whole tensor, or row, does); Inf gives NaN under a dynamic global scale and
    saturates to 6 * 448 * global_scale under a static one. Use `quantize_weight` for weights.
    """
    check_float_input(x, "nvfp4.quantize")
    check_group(x, BLOCK_SIZE, "nvfp4.quantize")
    x32 = widen_exact(x)
    gs = _resolve_global_scale(x32, global_scale)
    xb = x32.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    block_scale = true_divide(jnp.max(jnp.abs(xb), axis=-1), F4_E2M1_MAX)
    scales = jnp.clip(true_divide(block_scale, gs), F8E4M3_MIN_NORMAL, F8E4M3_MAX).astype(jnp.float8_e4m3fn)
    reciprocal = true_divide(true_divide(jnp.float32(1.0), gs), widen_exact(scales))
    scaled = jnp.clip(xb * reciprocal[..., None], -F4_E2M1_MAX, F4_E2M1_MAX)
    codes = pack_codes(encode_e2m1(scaled).reshape(x.shape))
    return NVFP4Tensor(codes=codes, scales=scales, global_scale=gs)


def quantize_weight(w: jax.Array, *, name: str, global_scale: GlobalScale = None) -> NVFP4Tensor:
    """Eagerly check a weight for NaN/Inf (ValueError naming `name`), then `quantize` it."""
    check_finite(w, name)
    check_float_input(w, name)
    check_group(w, BLOCK_SIZE, name)
    return quantize(w, global_scale)


def dequantize(q: NVFP4Tensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Values of `q` as `dtype`: code value * (global_scale * block_scale), in float32, then cast."""
    values = decode_e2m1(unpack_codes(q.codes))
    total = q.global_scale * widen_exact(q.scales)
    vb = values.reshape(*total.shape, BLOCK_SIZE) * total[..., None]
    return vb.reshape(values.shape).astype(dtype)


def fake_quant(x: jax.Array, global_scale: GlobalScale = None) -> jax.Array:
    """`dequantize(quantize(x, global_scale), x.dtype)` in one jittable function."""
    return dequantize(quantize(x, global_scale), x.dtype)


def to_scaled_matmul(q: NVFP4Tensor) -> tuple[jax.Array, jax.Array]:
    """Values and block scales in the form `jax.nn.scaled_matmul` takes.

    Returns `(values float4_e2m1fn [..., K], scales float8_e4m3fn [..., K/16])`; the global scale
    (`q.global_scale`) is not included: multiply the matmul output by it (or pass it to
    `jax.nn.get_scaled_dot_general_config("nvfp4", global_scale=...)`).
    """
    values = decode_e2m1(unpack_codes(q.codes)).astype(jnp.float4_e2m1fn)
    return values, q.scales


def from_scaled_matmul(values: jax.Array, scales: jax.Array, global_scale: jax.Array | float) -> NVFP4Tensor:
    """Inverse of `to_scaled_matmul`: `float4_e2m1fn [..., K]` values + E4M3 scales -> NVFP4Tensor."""
    if values.dtype != jnp.float4_e2m1fn or scales.dtype != jnp.float8_e4m3fn:
        raise TypeError(
            f"expected float4_e2m1fn values and float8_e4m3fn scales, found {values.dtype} and {scales.dtype}"
        )
    if values.shape[:-1] != scales.shape[:-1] or values.shape[-1] != BLOCK_SIZE * scales.shape[-1]:
        raise ValueError(
            f"values {values.shape} and scales {scales.shape} do not match: scales need shape [..., K/{BLOCK_SIZE}]"
        )
    codes = pack_codes(encode_e2m1(values.astype(jnp.float32)))
    return NVFP4Tensor(codes=codes, scales=scales, global_scale=jnp.asarray(global_scale, jnp.float32))
