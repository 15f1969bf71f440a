"""NVFP4 matrix-vector products for a few rows (the modulation linears at batch 1-4) as one XLA reduction.

`y [M, N] = (x * x_scale[:, None]) @ W^T + bias` with `x [M, K]` the activation quantizer's exact fp16
block values (W4A4) or a bf16/fp16 activation (W4A16), and prepacked canonical NVFP4 `W [N, K]`.
At M <= 4 the product is memory bound: the packed codes (half a byte per weight) and scales are the
bytes. Written as a decode + multiply + row sum, XLA fuses it into one reduction kernel that reads
the codes once and never writes a decoded weight:

    acc[m, n] = sum_g s[n, g] * sum_j (e2m1(lo[n, g, j]) * x[m, g, j, 0] + e2m1(hi[n, g, j]) * x[m, g, j, 1])

with e2m1 decoded by bit placement to fp16 (`e2m1 * 2^-14`, exact) then float32. Every product is exact
in float32 (<= 2 + 11 + 4 significant bits); the sums are float32 in XLA's order, so the result equals
`reference.nvfp4_matmul_ref` up to float32 summation order, like every other GEMM backend here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from permuquant_jax.formats.nvfp4 import BLOCK_SIZE
from permuquant_jax.kernels.nvfp4_matmul import PrepackedNVFP4


def _e2m1_f32(c: jax.Array) -> jax.Array:
    """E2M1 codes (uint8 0..15) -> value * 2^-14 as float32 (fp16 bit placement, exact)."""
    c = c.astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(((c & 7) << 9) | ((c & 8) << 12), jnp.float16).astype(jnp.float32)


def nvfp4_gemv(
    x: jax.Array,
    w: PrepackedNVFP4,
    x_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """`y [M, N]` for a few rows `x [M, K]` (see the module docstring); same arguments as
    `dispatch.dequant_dot`. Meant for M <= 4: every row re-reads the weights."""
    if w.layout != "canonical":
        raise ValueError(f"nvfp4_gemv takes canonical prepacked weights, found layout {w.layout!r}")
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has K = {k} channels but the weights expect K = {w.k}")
    np_, kp = w.codes.shape[0], 2 * w.codes.shape[1]
    if x.dtype not in (jnp.float16, jnp.bfloat16):
        x = x.astype(jnp.bfloat16)  # W4A16's compute dtype (reference.w4a16_compute_dtype)
    groups = kp // BLOCK_SIZE
    xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kp - k))).reshape(m, 1, groups, BLOCK_SIZE // 2, 2)
    codes = w.codes.reshape(1, np_, groups, BLOCK_SIZE // 2)
    s = jax.lax.bitcast_convert_type(w.scales, jnp.float8_e4m3fn).astype(jnp.float32).reshape(1, np_, groups, 1)
    t = (_e2m1_f32(codes & 15) * xf[..., 0] + _e2m1_f32(codes >> 4) * xf[..., 1]) * s
    acc = jnp.sum(t, axis=(-2, -1))[:, : w.n]  # [M, N]
    gx = jnp.ones((m,), jnp.float32) if x_scale is None else x_scale.astype(jnp.float32).reshape(m)
    y = acc * np.float32(2.0**14) * gx[:, None] * w.global_scale[None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
