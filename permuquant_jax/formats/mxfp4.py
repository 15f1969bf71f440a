"""MXFP4 (OCP Microscaling): E2M1 values in blocks of 32 with a power-of-two E8M0 scale per block.

Numerics follow torchao 0.18 `torchao.prototype.mx_formats.mx_tensor.to_mx` with the default
FLOOR scale rule, in float32:

    e     = floor(log2(amax_block)) - 2          (2 = exponent of E2M1's largest power of two, 4)
    byte  = clamp(e, -127, 128) + 127            (E8M0 biased exponent; 255 = NaN for a NaN block)
    code  = e2m1(x / max(2**(byte - 127), 2**-126))   round to nearest even, saturating at +-6
    x_hat = e2m1_value(code) * 2**(byte - 127)

`floor` lets amax / scale reach up to 8 > 6: the largest values of a block saturate to 6 (as the
OCP spec and torchao do). No global scale. Same packed layout as NVFP4 (element 2i low nibble).
Blocks with amax < 2**-124 (all-zero blocks included) get byte 0 (2**-127); torchao divides by
2**-126 there and so do we, so such tiny blocks are not round-trip exact (all-zero blocks are).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from permuquant_jax.formats.common import check_float_input, check_group, widen_exact
from permuquant_jax.formats.nvfp4 import decode_e2m1, encode_e2m1, pack_codes, unpack_codes

BLOCK_SIZE = 32
F4_E2M1_MAX_POW2 = 2
E8M0_BIAS = 127
E8M0_NAN = 255
F32_MIN_NORMAL = 2.0**-126


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class MXFP4Tensor:
    """An MXFP4-quantized array of logical shape `[..., K]`.

    codes: uint8 `[..., K/2]` (element 2i low nibble, 2i+1 high nibble), scales: float8_e8m0fnu
    `[..., K/32]` (its byte is the biased exponent).
    """

    codes: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape `[..., K]`."""
        return (*self.codes.shape[:-1], 2 * self.codes.shape[-1])


def quantize(x: jax.Array) -> MXFP4Tensor:
    """Quantize `x [..., K]` (K a multiple of 32) to MXFP4, bit-exact with torchao's FLOOR rule.

    Jittable and vmappable. NaN in a block propagates: its scale byte is 255 (NaN).
    """
    check_float_input(x, "mxfp4.quantize")
    check_group(x, BLOCK_SIZE, "mxfp4.quantize")
    x32 = widen_exact(x)
    xb = x32.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    exponent = ((jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF) - 127
    unbiased = jnp.clip(exponent - F4_E2M1_MAX_POW2, -E8M0_BIAS, E8M0_BIAS + 1)
    biased = jnp.where(jnp.isnan(amax), E8M0_NAN, unbiased + E8M0_BIAS).astype(jnp.uint8)
    # Scale used to divide: 2**(biased - 127) built from its bits, floored to the smallest
    # normal float32 (byte 0 would be a subnormal), as torchao does.
    scale32 = jax.lax.bitcast_convert_type(biased.astype(jnp.int32) << 23, jnp.float32)
    scale32 = jnp.maximum(scale32, F32_MIN_NORMAL)
    codes = pack_codes(encode_e2m1(xb / scale32[..., None]).reshape(x.shape))
    scales = jax.lax.bitcast_convert_type(biased, jnp.float8_e8m0fnu)
    return MXFP4Tensor(codes=codes, scales=scales)


def dequantize(q: MXFP4Tensor, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Values of `q` as `dtype`: code value * 2**(byte - 127) (byte 255 gives NaN)."""
    values = decode_e2m1(unpack_codes(q.codes))
    scale = q.scales.astype(jnp.float32)
    vb = values.reshape(*scale.shape, BLOCK_SIZE) * scale[..., None]
    return vb.reshape(values.shape).astype(dtype)


def fake_quant(x: jax.Array) -> jax.Array:
    """`dequantize(quantize(x), x.dtype)` in one jittable function."""
    return dequantize(quantize(x), x.dtype)


def scale_bytes(q: MXFP4Tensor) -> jax.Array:
    """The E8M0 scales as uint8 biased exponents."""
    return jax.lax.bitcast_convert_type(q.scales, jnp.uint8)
