"""Pure-JAX references with the exact semantics of the Pallas kernels (used by tests and CPU runs).

Activation path (W4A4), for `x [M, K]`:

    x'   = x[:, gather]                          (optional channel gather)
    x''  = block_hadamard(x', b)                 (optional, formats.hadamard; returns x.dtype)
    xq   = nvfp4.quantize(x'', act_global_scale) (formats.nvfp4: bit-exact with torchao)

Matmul, for `xq` (or a bf16/fp16 `x` in W4A16) and weights `wq` (NVFP4, `[N, K]`):

    acc[m, n] = sum_k  (e2m1(xq) * s_x)[m, k] * (e2m1(wq) * s_w)[n, k]     in float32
    y         = acc * (g_x[m] * g_w[n]) + bias[n],  then cast to the output dtype

Every product in `acc` is exact (an E2M1 value times an E4M3 scale has at most 6 significant bits),
so this equals `dequantize(xq) @ dequantize(wq).T` up to float32 rounding; the kernels differ from
it only in the order of the float32 summation. For W4A16 the activation operand is `x` itself,
rounded to its compute dtype (bf16 and fp16 stay; float32 is rounded to bf16, as the kernel does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from permuquant_jax.formats import hadamard, nvfp4
from permuquant_jax.formats.nvfp4 import NVFP4Tensor

GlobalScale = nvfp4.GlobalScale


def transform_act(x: jax.Array, *, gather: jax.Array | None = None, hadamard_block: int | None = None):
    """The pre-quantization transform of the activation path: channel gather, then block Hadamard."""
    if gather is not None:
        x = jnp.take(x, gather, axis=-1)
    if hadamard_block is not None:
        x = hadamard.block_hadamard(x, hadamard_block)
    return x


def quantize_act_ref(
    x: jax.Array,
    *,
    gather: jax.Array | None = None,
    hadamard_block: int | None = None,
    global_scale: GlobalScale = None,
) -> NVFP4Tensor:
    """Reference of the activation quantization kernel: gather -> block Hadamard -> NVFP4 quantize."""
    return nvfp4.quantize(transform_act(x, gather=gather, hadamard_block=hadamard_block), global_scale)


def block_values(q: NVFP4Tensor) -> jax.Array:
    """E2M1 value times E4M3 block scale, without the global scale (exact in float32 and float16)."""
    values = nvfp4.decode_e2m1(nvfp4.unpack_codes(q.codes))
    s = q.scales.astype(jnp.float32)
    vb = values.reshape(*s.shape, nvfp4.BLOCK_SIZE) * s[..., None]
    return vb.reshape(values.shape)


def row_global_scale(q: NVFP4Tensor, rows: int) -> jax.Array:
    """The global scale of `q` as a float32 vector with one entry per row (`[rows]`)."""
    g = jnp.asarray(q.global_scale, jnp.float32)
    return jnp.broadcast_to(g.reshape(-1) if g.ndim else g, (rows,))


def w4a16_compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype a W4A16 activation is fed to the tensor cores in: fp16 stays, others become bf16."""
    return jnp.dtype(jnp.float16) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(jnp.bfloat16)


def nvfp4_matmul_ref(
    x: jax.Array | NVFP4Tensor,
    w: NVFP4Tensor,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Reference of the matmul kernel: `y = x W^T` with NVFP4 `w [N, K]`.

    `x` is an `NVFP4Tensor [M, K]` (W4A4) or a float array `[M, K]` (W4A16, rounded to its compute
    dtype). Accumulates in float32 at full precision, then applies the global scales and the bias.
    """
    n = w.shape[0]
    wv = block_values(w)
    gw = row_global_scale(w, n)
    if isinstance(x, NVFP4Tensor):
        m = x.shape[0]
        xv = block_values(x)
        gx = row_global_scale(x, m)
    else:
        m = x.shape[0]
        xv = x.astype(w4a16_compute_dtype(x.dtype)).astype(jnp.float32)
        gx = jnp.ones((m,), jnp.float32)
    # The barrier keeps XLA from fusing the decode graphs into the product: on the CPU a dot with
    # M = 1 becomes multiply+reduce, and fusing both decodes into it (and that into every consumer of
    # y) made compile times explode (40+ s for one scanned modulation linear).
    xv, wv = jax.lax.optimization_barrier((xv, wv))
    acc = jnp.dot(xv, wv.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    y = acc * (gx[:, None] * gw[None, :])
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return jax.lax.optimization_barrier(y).astype(out_dtype)


def nvfp4_linear_ref(
    x: jax.Array,
    w: NVFP4Tensor,
    bias: jax.Array | None = None,
    *,
    act_global_scale: GlobalScale = None,
    gather: jax.Array | None = None,
    hadamard_block: int | None = None,
    w4a16: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
    """Reference of `dispatch.nvfp4_linear` for `x [..., K]` (see the module docstring)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w4a16:
        xin = transform_act(x2, gather=gather, hadamard_block=hadamard_block)
    else:
        xin = quantize_act_ref(x2, gather=gather, hadamard_block=hadamard_block, global_scale=act_global_scale)
    y = nvfp4_matmul_ref(xin, w, bias, out_dtype=out_dtype)
    return y.reshape(*lead, w.shape[0])
