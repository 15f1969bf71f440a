"""NVFP4 weight decode to exact fp16/bf16 block values, one pass (Pallas, Triton backend), and its XLA twin.

For large M the fastest W4A4/W4A16 path on Hopper without a new GEMM is: decode W once per call to
16-bit block values (e2m1(code) * E4M3 scale, exact in fp16 and bf16: at most 6 significant bits in
[2^-10, 2688]), then one cuBLAS GEMM with fp32 accumulation, then the global scales in an epilogue
(`dispatch.dequant_dot`). The decode is memory bound: it reads 0.5625 bytes and writes 2 bytes per
weight, so its floor is ~2.56 bytes per weight over the HBM bandwidth.

- `decode_weight_pallas`: a Pallas kernel over tiles `[block_n, block_k]` of prepacked canonical
  weights: aligned vector loads of code bytes and scale bytes, decode by bit placement, the scale
  multiply in fp16 (exact), the two nibbles interleaved back, one store.
- `decode_weight_bits`: the same bit placement as one XLA elementwise fusion (no lookup table).
Both equal `reference.block_values(unprepack(w))` bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from permuquant_jax.formats.nvfp4 import BLOCK_SIZE
from permuquant_jax.kernels.nvfp4_matmul import PrepackedNVFP4, _decode_bytes, _iota, _scale_f16

OUT_DTYPES = (jnp.float16, jnp.bfloat16)


def _check(w: PrepackedNVFP4, dtype) -> jnp.dtype:
    if not isinstance(w, PrepackedNVFP4):
        raise TypeError(f"w must be a PrepackedNVFP4 (kernels.prepack_weight), found {type(w).__name__}")
    if w.layout != "canonical":
        raise ValueError(f"the decode takes canonical prepacked weights, found layout {w.layout!r}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float16 or bfloat16, found {dtype}")
    return dtype


def decode_weight_bits(w: PrepackedNVFP4, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """Block values `[N, K]` of prepacked canonical weights, by XLA integer bit placement (exact)."""
    dtype = _check(w, dtype)
    c = w.codes[: w.n, : w.k // 2].astype(jnp.uint16)
    lo = jax.lax.bitcast_convert_type(((c & 7) << 9) | ((c & 8) << 12), jnp.float16)
    hi = jax.lax.bitcast_convert_type(((c & 0x70) << 5) | ((c & 0x80) << 8), jnp.float16)
    s16 = _scale_f16(w.scales[: w.n, : w.k // BLOCK_SIZE])  # s * 2^7
    v = jnp.stack([lo, hi], axis=-1).reshape(w.n, w.k // BLOCK_SIZE, BLOCK_SIZE)
    v = (v * s16[:, :, None]) * jnp.float16(2.0**7)  # e2m1 * 2^-14 * s * 2^7 * 2^7: exact at each step
    return v.reshape(w.n, w.k).astype(dtype)


def _decode_kernel(codes_ref, scales_ref, o_ref, *, n, k, kp, bn, bk, decode, interpret):
    i, j = pl.program_id(0), pl.program_id(1)
    n0 = i * bn
    c0 = pl.multiple_of(j * bk, bk)
    b0 = pl.multiple_of(j * (bk // 2), bk // 2)
    g0 = pl.multiple_of(j * (bk // BLOCK_SIZE), bk // BLOCK_SIZE)
    cref = codes_ref.at[pl.ds(n0, bn), pl.ds(b0, bk // 2)]
    sref = scales_ref.at[pl.ds(n0, bn), pl.ds(g0, bk // BLOCK_SIZE)]
    if kp % bk:  # the last tile runs past the padded K: mask its loads (padding decodes to zeros)
        cm = jnp.broadcast_to(((b0 + _iota(bk // 2)) < kp // 2)[None, :], (bn, bk // 2))
        sm = jnp.broadcast_to(((g0 + _iota(bk // BLOCK_SIZE)) < kp // BLOCK_SIZE)[None, :], (bn, bk // BLOCK_SIZE))
        byte = plgpu.load(cref, mask=cm, other=0)
        sb = plgpu.load(sref, mask=sm, other=0)
    else:
        byte = plgpu.load(cref)
        sb = plgpu.load(sref)
    lo, hi = _decode_bytes(byte, use_asm=decode == "asm" and not interpret)
    s16 = _scale_f16(sb)
    g = bk // BLOCK_SIZE
    lo = (lo.reshape(bn, g, BLOCK_SIZE // 2) * s16[:, :, None]).reshape(bn, bk // 2)
    hi = (hi.reshape(bn, g, BLOCK_SIZE // 2) * s16[:, :, None]).reshape(bn, bk // 2)
    v = jnp.stack([lo, hi], axis=-1).reshape(bn, bk) * jnp.float16(2.0**7)
    oref = o_ref.at[pl.ds(n0, bn), pl.ds(c0, bk)]
    if n % bn or k % bk:
        mask = ((n0 + _iota(bn)) < n)[:, None] & ((c0 + _iota(bk)) < k)[None, :]
        plgpu.store(oref, v.astype(o_ref.dtype), mask=mask)
    else:
        plgpu.store(oref, v.astype(o_ref.dtype))


def _load(ref, mask):
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def _decode_kernel3(codes_ref, scales_ref, o_ref, *, n, k, kp, bn, bk, decode, interpret):
    """impl "v2": tiles `[bn, bk/16, 8]` bytes -> `[bn, bk/16, 16]` values (groups of 16 on their own
    axis: the scale broadcast is a free expand, the nibble interleave a join on the minor axis)."""
    g = bk // BLOCK_SIZE
    i, j = pl.program_id(0), pl.program_id(1)
    n0 = i * bn
    g0 = pl.multiple_of(j * g, g)
    grp = g0 + _iota(g)
    lmask = None if (kp // BLOCK_SIZE) % g == 0 else grp < kp // BLOCK_SIZE
    byte = _load(
        codes_ref.at[pl.ds(n0, bn), pl.ds(g0, g), :],
        None if lmask is None else jnp.broadcast_to(lmask[None, :, None], (bn, g, BLOCK_SIZE // 2)),
    )
    sb = _load(scales_ref.at[pl.ds(n0, bn), pl.ds(g0, g)], None if lmask is None else jnp.broadcast_to(lmask, (bn, g)))
    lo, hi = _decode_bytes(byte, use_asm=decode == "asm" and not interpret)
    s16 = _scale_f16(sb)[:, :, None]
    v = jnp.stack([lo * s16, hi * s16], axis=-1).reshape(bn, g, BLOCK_SIZE) * jnp.float16(2.0**7)
    oref = o_ref.at[pl.ds(n0, bn), pl.ds(g0, g), :]
    if n % bn or (k // BLOCK_SIZE) % g:
        mask = ((n0 + _iota(bn)) < n)[:, None, None] & (grp < k // BLOCK_SIZE)[None, :, None]
        plgpu.store(oref, v.astype(o_ref.dtype), mask=jnp.broadcast_to(mask, (bn, g, BLOCK_SIZE)))
    else:
        plgpu.store(oref, v.astype(o_ref.dtype))


@functools.partial(
    jax.jit, static_argnames=("dtype", "block_n", "block_k", "num_warps", "num_stages", "decode", "impl", "interpret")
)
def decode_weight_pallas(
    w: PrepackedNVFP4,
    dtype: jnp.dtype = jnp.bfloat16,
    *,
    block_n: int = 32,
    block_k: int = 512,
    num_warps: int = 4,
    num_stages: int = 1,
    decode: str = "asm",
    impl: str = "v2",
    interpret: bool = False,
) -> jax.Array:
    """Block values `[N, K]` (fp16 or bf16, exact) of prepacked canonical weights, by the Pallas kernel.

    `block_k` is a power of two >= 32 channels; `decode` "asm" (packed inline-PTX nibble decode) or
    "jnp"; interpret mode always decodes with jnp (same bits). `impl` "v2" (3-D tiles) or "v1" (2-D
    tiles, scales broadcast through reshapes); same bits.
    """
    dtype = _check(w, dtype)
    if 128 % block_n:
        raise ValueError(f"block_n must divide 128 (the row padding of prepacked weights), found {block_n}")
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 32, found {block_k}")
    if impl not in ("v1", "v2"):
        raise ValueError(f"impl must be 'v1' or 'v2', found {impl!r}")
    np_, kp2 = w.codes.shape
    v2 = impl == "v2"
    kernel = functools.partial(
        _decode_kernel3 if v2 else _decode_kernel,
        n=w.n,
        k=w.k,
        kp=2 * kp2,
        bn=block_n,
        bk=block_k,
        decode=decode,
        interpret=interpret,
    )
    kg = w.k // BLOCK_SIZE
    codes = w.codes.reshape(np_, kp2 // 8, 8) if v2 else w.codes
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((w.n, kg, BLOCK_SIZE) if v2 else (w.n, w.k), dtype),
        grid=(pl.cdiv(w.n, block_n), pl.cdiv(w.k, block_k)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="nvfp4_decode",
    )(codes, w.scales)
    return out.reshape(w.n, w.k)


def decoded_bytes(n: int, k: int, dtype=jnp.bfloat16) -> int:
    """Bytes the decode must move: packed codes + scale bytes read, 16-bit values written."""
    return n * k // 2 + n * k // BLOCK_SIZE + n * k * np.dtype(dtype).itemsize
