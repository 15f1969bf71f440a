"""Activation quantization kernel (Pallas, Triton backend): bf16/fp16/fp32 `[M, K]` -> NVFP4, one pass.

Per tile of `bm` rows x `bk` channels it loads x (through an optional channel gather), applies an
optional block Hadamard (a tensor-core product with the unnormalized +-1 matrix, then 1/sqrt(b), then
a rounding to x's dtype as `formats.hadamard.block_hadamard` does), and quantizes each block of 16
with the arithmetic of `formats.nvfp4.quantize` (same operations, same order, all in float32).

Outputs, by `out`:
- "packed": codes uint8 `[M, K/2]` and E4M3 scales `[M, K/16]` (the storage format Blackwell reads);
- "values": float16 `[M, K]` holding e2m1(code) * E4M3 scale, exact in fp16 (every such product has
  at most 6 significant bits and lies in [2^-7, 2688]); the Hopper matmul feeds these to the tensor
  cores as they are and applies the global scale in its epilogue.

The global scale comes in as a float32 vector, one entry per row (a per-tensor scale is broadcast):
a dynamic per-tensor or per-row scale is an amax reduction that XLA computes before the kernel.
The reference is `reference.quantize_act_ref`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from permuquant_jax.formats import nvfp4
from permuquant_jax.formats.hadamard import block_hadamard
from permuquant_jax.formats.nvfp4 import BLOCK_SIZE, F4_E2M1_MAX, F8E4M3_MAX, F8E4M3_MIN_NORMAL, NVFP4Tensor

OUT_MODES = ("packed", "values")
IMPLS = ("v1", "v2")


def _iota(n: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def e2m1_index(m: jax.Array) -> jax.Array:
    """Magnitude index 0..7 of |value| on the E2M1 grid, ties to even (formats.nvfp4.encode_e2m1)."""
    one = jnp.uint8(1)
    zero = jnp.uint8(0)
    idx = jnp.where(m > 0.25, one, zero)
    for t, strict in ((0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True)):
        idx = idx + jnp.where((m > t) if strict else (m >= t), one, zero)
    return idx


def e2m1_code_to_f16(code: jax.Array) -> jax.Array:
    """E2M1 code (uint8 0..15) -> its value times 2^-14 as float16, by bit placement (exact).

    The 3 magnitude bits land on the low two exponent bits and the top mantissa bit of fp16.
    """
    c = code.astype(jnp.uint16)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return jax.lax.bitcast_convert_type(bits, jnp.float16)


def _opaque(value: jax.Array, ref: jax.Array) -> jax.Array:
    """`value` behind a select XLA cannot fold (`ref` is never below -1 here): a rewrite barrier."""
    return jnp.where(ref < -1.0, ref, value)


def _div_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """IEEE float32 division (round to nearest), as XLA does: Triton's own `/` may be approximate."""
    a, b = jnp.broadcast_arrays(a, b)
    if interpret:
        # XLA rewrites a division by a constant or by a broadcast into a multiply by a reciprocal,
        # which rounds differently; operands behind selects keep it a true division.
        return _opaque(a, b) / _opaque(b, a)
    (q,) = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return q


def _round_e4m3(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Round float32 `s` in [2^-6, 448] (normal E4M3 range) to E4M3, ties to even, by integer ops.

    Returns (the rounded value as float32, its E4M3 byte as uint8); NaN gives NaN and byte 0x7F.
    A float8 convert is avoided on purpose: XLA on CPU (interpret mode) may convert through float16,
    which rounds twice.
    """
    b = jax.lax.bitcast_convert_type(s, jnp.uint32)
    b = (b + jnp.uint32(0x7FFFF) + ((b >> 20) & 1)) & jnp.uint32(0xFFF00000)
    nan = s != s
    s32 = jnp.where(nan, s, jax.lax.bitcast_convert_type(b, jnp.float32))
    byte = jnp.where(nan, jnp.uint32(0x7F), (b >> 20) - jnp.uint32(960)).astype(jnp.uint8)
    return s32, byte


def _block_scales(amax: jax.Array, gs: jax.Array, interpret: bool):
    """Per-block E4M3 scales from block amaxes `[bm, g]` and per-row global scales `gs [bm]`.

    Returns (scale f32, its E4M3 byte uint8, the reciprocal 1 / (g * s) as formats specifies it).
    """
    # Two roundings each, as formats.nvfp4 specifies: (amax / 6) / g and (1 / g) / s. The selects
    # (always the division) keep XLA, in interpret mode, from fusing (a / b) / c into a / (b * c),
    # which rounds differently; Triton does not reassociate.
    # (and the divisor 6 goes through one too: XLA turns a division by a constant into a multiply)
    six = _opaque(jnp.full_like(amax, F4_E2M1_MAX), amax)
    block_scale = _opaque(_div_rn(amax, six, interpret), amax)
    s = _div_rn(block_scale, gs[:, None], interpret)
    s32, s8 = _round_e4m3(jnp.clip(s, F8E4M3_MIN_NORMAL, F8E4M3_MAX))
    inv_g = _opaque(_div_rn(jnp.ones_like(gs), gs, interpret), gs)
    recip = _div_rn(inv_g[:, None], s32, interpret)
    return s32, s8, recip


def _quantize_tile(x32: jax.Array, gs: jax.Array, bm: int, bk: int, interpret: bool):
    """Quantize a float32 tile `[bm, bk]` with per-row global scales `gs [bm]`.

    Returns (magnitude index uint8 [bm, bk/16, 16], sign uint8 (0/1) same shape, scale f32 [bm, bk/16],
    scale E4M3 byte uint8 [bm, bk/16]).
    """
    g = bk // BLOCK_SIZE
    xb = x32.reshape(bm, g, BLOCK_SIZE)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    s32, s8, recip = _block_scales(amax, gs, interpret)
    scaled = jnp.clip(xb * recip[:, :, None], -F4_E2M1_MAX, F4_E2M1_MAX)
    idx = e2m1_index(jnp.abs(scaled))
    sign = (jax.lax.bitcast_convert_type(scaled, jnp.uint32) >> 31).astype(jnp.uint8)
    return idx, sign, s32, s8


def e2m1_round(a: jax.Array) -> jax.Array:
    """|value| in [0, 6] (float32) rounded to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to even code.

    One float add and subtract of a magic number per element: the grid spacing is 0.5 below 2, 1 below
    4 and 2 above, which is the float32 spacing of 2^22, 2^23 and 2^24, and round-to-nearest-even on
    the spacing is ties-to-even on the code index. Equals `e2m1_index` decoded (tested on all ties).
    """
    magic = jnp.where(a < 2.0, np.float32(2.0**22), jnp.where(a < 4.0, np.float32(2.0**23), np.float32(2.0**24)))
    return (a + magic) - magic


def e2m1_index_of_rounded(r: jax.Array) -> jax.Array:
    """Code index 0..7 (uint8) of a value `r` already on the E2M1 grid (`e2m1_round`)."""
    i = jnp.where(r < 2.0, r * 2.0, jnp.where(r < 4.0, r + 2.0, r * 0.5 + 4.0))
    return i.astype(jnp.int32).astype(jnp.uint8)


def _act_quant_kernel(*refs, m, k, bm, bk, has_gather, hadamard_block, out_mode, x_dtype, interpret):
    it = iter(refs)
    x_ref = next(it)
    idx_ref = next(it) if has_gather else None
    h_ref = next(it) if hadamard_block else None
    gs_ref = next(it)
    outs = list(it)
    i, j = pl.program_id(0), pl.program_id(1)
    r0, c0 = i * bm, j * bk
    rows = r0 + _iota(bm)
    cols = c0 + _iota(bk)
    rmask = rows < m
    cmask = cols < k
    mask = rmask[:, None] & cmask[None, :]
    if has_gather:
        src = plgpu.load(idx_ref.at[pl.ds(c0, bk)], mask=cmask, other=0)
        x = plgpu.load(x_ref.at[rows[:, None], src[None, :]], mask=mask, other=0)
    else:
        x = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(c0, bk)], mask=mask, other=0)
    if hadamard_block:
        hb = hadamard_block
        h = h_ref[...]
        xr = x.reshape(bm * (bk // hb), hb)
        if x_dtype == jnp.float32:
            y = jnp.dot(xr, h, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        else:
            y = jnp.dot(xr, h, preferred_element_type=jnp.float32)
        x = (y * np.float32(1.0 / math.sqrt(hb))).astype(x_dtype).reshape(bm, bk)
    x32 = x.astype(jnp.float32)
    gs = plgpu.load(gs_ref.at[pl.ds(r0, bm)], mask=rmask, other=1.0)
    idx, sign, s32, s8 = _quantize_tile(x32, gs, bm, bk, interpret)
    g = bk // BLOCK_SIZE
    if out_mode == "values":
        (v_ref,) = outs
        # fp16 bits of e2m1 * 2^-14 (exact), times s * 2^14 in float32 (exact), then fp16 (exact).
        val = e2m1_code_to_f16(idx | (sign << 3)).astype(jnp.float32) * (s32 * np.float32(2.0**14))[:, :, None]
        plgpu.store(v_ref.at[pl.ds(r0, bm), pl.ds(c0, bk)], val.reshape(bm, bk).astype(jnp.float16), mask=mask)
    else:
        codes_ref, scales_ref = outs
        code = (idx | (sign << 3)).reshape(bm, bk // 2, 2)
        shift = (4 * jax.lax.broadcasted_iota(jnp.int32, (1, 1, 2), 2)).astype(jnp.uint8)
        packed = jnp.sum((code << shift).astype(jnp.int32), axis=-1).astype(jnp.uint8)
        pcols = c0 // 2 + _iota(bk // 2)
        plgpu.store(
            codes_ref.at[pl.ds(r0, bm), pl.ds(c0 // 2, bk // 2)],
            packed,
            mask=rmask[:, None] & (pcols < k // 2)[None, :],
        )
        scols = c0 // BLOCK_SIZE + _iota(g)
        plgpu.store(
            scales_ref.at[pl.ds(r0, bm), pl.ds(c0 // BLOCK_SIZE, g)],
            s8,
            mask=rmask[:, None] & (scols < k // BLOCK_SIZE)[None, :],
        )


def _load(ref, mask, other):
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=other)


def _act_quant_kernel3(*refs, m, k, bm, bk, has_gather, hadamard_block, out_mode, x_dtype, interpret):
    """impl "v2": the tile as `[bm, bk/16, 16]` (blocks of 16 on the last axis, so the block amax and the
    scale broadcast need no reshape), E2M1 rounding by a magic-number add (`e2m1_round`), aligned loads."""
    it = iter(refs)
    x_ref = next(it)
    idx_ref = next(it) if has_gather else None
    h_ref = next(it) if hadamard_block else None
    gs_ref = next(it)
    outs = list(it)
    g = bk // BLOCK_SIZE
    kg = k // BLOCK_SIZE
    i, j = pl.program_id(0), pl.program_id(1)
    r0 = i * bm
    gc0 = pl.multiple_of(j * g, g)
    rows = r0 + _iota(bm)
    grp = gc0 + _iota(g)
    rmask = rows < m
    full = m % bm == 0 and kg % g == 0
    mask3 = None if full else (rmask[:, None, None] & (grp < kg)[None, :, None]) & jnp.ones((1, 1, BLOCK_SIZE), bool)
    if has_gather:
        smask = None if kg % g == 0 else jnp.broadcast_to((grp < kg)[:, None], (g, BLOCK_SIZE))
        src = _load(idx_ref.at[pl.ds(gc0, g), :], smask, 0)
        x = _load(x_ref.at[rows[:, None, None], src[None, :, :]], mask3, 0)
    else:
        x = _load(x_ref.at[pl.ds(r0, bm), pl.ds(gc0, g), :], mask3, 0)
    if hadamard_block:
        hb = hadamard_block
        xr = x.reshape(bm * (bk // hb), hb)
        h = h_ref[...]
        if x_dtype == jnp.float32:
            y = jnp.dot(xr, h, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        else:
            y = jnp.dot(xr, h, preferred_element_type=jnp.float32)
        x = (y * np.float32(1.0 / math.sqrt(hb))).astype(x_dtype).reshape(bm, g, BLOCK_SIZE)
    xb = x.astype(jnp.float32)
    gs = _load(gs_ref.at[pl.ds(r0, bm)], None if m % bm == 0 else rmask, 1.0)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    s32, s8, recip = _block_scales(amax, gs, interpret)
    scaled = jnp.clip(xb * recip[:, :, None], -F4_E2M1_MAX, F4_E2M1_MAX)
    r = e2m1_round(jnp.abs(scaled))
    sbit = jax.lax.bitcast_convert_type(scaled, jnp.uint32) & jnp.uint32(0x80000000)
    if out_mode == "values":
        (v_ref,) = outs
        rs = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(r, jnp.uint32) | sbit, jnp.float32)
        val = (rs * s32[:, :, None]).astype(jnp.float16)  # exact: <= 6 significant bits, in [2^-7, 2688]
        plgpu.store(v_ref.at[pl.ds(r0, bm), pl.ds(gc0, g), :], val, mask=mask3)
    else:
        codes_ref, scales_ref = outs
        code = e2m1_index_of_rounded(r) | (sbit >> 28).astype(jnp.uint8)
        pairs = code.reshape(bm, g, BLOCK_SIZE // 2, 2)
        shift = (4 * jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 2), 3)).astype(jnp.uint8)
        packed = jnp.sum((pairs << shift).astype(jnp.int32), axis=-1).astype(jnp.uint8)
        pmask = None if full else (rmask[:, None, None] & (grp < kg)[None, :, None]) & jnp.ones((1, 1, 8), bool)
        plgpu.store(codes_ref.at[pl.ds(r0, bm), pl.ds(gc0, g), :], packed, mask=pmask)
        smask = None if full else rmask[:, None] & (grp < kg)[None, :]
        plgpu.store(scales_ref.at[pl.ds(r0, bm), pl.ds(gc0, g)], s8, mask=smask)


def resolve_act_global_scale(x_t: jax.Array, global_scale: nvfp4.GlobalScale) -> jax.Array:
    """Per-row float32 global scales `[M]` for the transformed activation `x_t [M, K]`.

    Same rules as `formats.nvfp4.quantize`: None = amax / 2688 over the whole array, "per_row" = per
    row, else a static scalar or `[M, 1]` array; a zero scale becomes 1.0.
    """
    gs = nvfp4._resolve_global_scale(x_t.astype(jnp.float32), global_scale)
    return jnp.broadcast_to(gs.reshape(-1) if gs.ndim else gs, (x_t.shape[0],)).astype(jnp.float32)


@functools.partial(
    jax.jit,
    static_argnames=("hadamard_block", "out", "block_m", "block_k", "num_warps", "num_stages", "impl", "interpret"),
)
def act_quant(
    x: jax.Array,
    gs_rows: jax.Array,
    gather: jax.Array | None = None,
    *,
    hadamard_block: int | None = None,
    out: str = "packed",
    block_m: int = 16,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 1,
    impl: str = "v2",
    interpret: bool = False,
):
    """Run the kernel on `x [M, K]` with per-row global scales `gs_rows [M]` (float32).

    `impl` "v2" (3-D tiles, magic-number rounding) or "v1" (the former 2-D kernel); same bits.

    Returns `(codes uint8 [M, K/2], scales float8_e4m3fn [M, K/16])` for out="packed", or
    `values float16 [M, K]` for out="values".
    """
    if out not in OUT_MODES:
        raise ValueError(f"out must be one of {OUT_MODES}, found {out!r}")
    m, k = x.shape
    if k % BLOCK_SIZE:
        raise ValueError(f"K = {k} must be a multiple of {BLOCK_SIZE}; pad with formats.common.pad_to_group")
    bk = block_k
    if hadamard_block:
        if k % hadamard_block or bk % hadamard_block:
            raise ValueError(f"hadamard_block {hadamard_block} must divide K = {k} and the tile width block_k = {bk}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, found {impl!r}")
    v2 = impl == "v2"
    if gather is not None and gather.shape != (k,):
        raise ValueError(f"gather must have shape ({k},) (one source channel per channel), found {gather.shape}")
    if v2:  # blocks of 16 on their own axis (free reshapes of contiguous arrays)
        args = [x if gather is not None else x.reshape(m, k // BLOCK_SIZE, BLOCK_SIZE)]
        if gather is not None:
            args.append(gather.astype(jnp.int32).reshape(k // BLOCK_SIZE, BLOCK_SIZE))
    else:
        args = [x] + ([gather.astype(jnp.int32)] if gather is not None else [])
    if hadamard_block:
        hpm = _sylvester_pm1(hadamard_block)
        hdt = jnp.float32 if x.dtype == jnp.float32 else x.dtype
        args.append(jnp.asarray(hpm, hdt))
    args.append(gs_rows.astype(jnp.float32))
    kg = k // BLOCK_SIZE
    if out == "values":
        out_shape = jax.ShapeDtypeStruct((m, kg, BLOCK_SIZE) if v2 else (m, k), jnp.float16)
    else:
        out_shape = (
            jax.ShapeDtypeStruct((m, kg, BLOCK_SIZE // 2) if v2 else (m, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((m, kg), jnp.uint8),
        )
    kernel = functools.partial(
        _act_quant_kernel3 if v2 else _act_quant_kernel,
        m=m,
        k=k,
        bm=block_m,
        bk=bk,
        has_gather=gather is not None,
        hadamard_block=hadamard_block,
        out_mode=out,
        x_dtype=x.dtype,
        interpret=interpret,
    )
    res = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(m, block_m), pl.cdiv(k, bk)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="nvfp4_act_quant",
    )(*args)
    if out == "values":
        return res.reshape(m, k)
    codes, scales = res
    return codes.reshape(m, k // 2), jax.lax.bitcast_convert_type(scales, jnp.float8_e4m3fn)


def _sylvester_pm1(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def quantize_act(
    x: jax.Array,
    *,
    gather: jax.Array | None = None,
    hadamard_block: int | None = None,
    global_scale: nvfp4.GlobalScale = None,
    interpret: bool = False,
    **config,
) -> NVFP4Tensor:
    """Quantize activations `x [M, K]` to an `NVFP4Tensor` with the kernel (packed output).

    Same result as `reference.quantize_act_ref`, bit for bit without a Hadamard (with one, up to the
    float32 summation order of the rotation). `config`: block_m, block_k, num_warps, num_stages.
    """
    gs = act_global_scale_rows(x, gather=gather, hadamard_block=hadamard_block, global_scale=global_scale)
    codes, scales = act_quant(x, gs, gather, hadamard_block=hadamard_block, out="packed", interpret=interpret, **config)
    g = gs[:, None] if _is_row_scale(global_scale) else gs[0]
    return NVFP4Tensor(codes=codes, scales=scales, global_scale=g)


def _is_row_scale(global_scale: nvfp4.GlobalScale) -> bool:
    if isinstance(global_scale, str):
        return True
    return global_scale is not None and jnp.ndim(global_scale) > 0


def act_global_scale_rows(
    x: jax.Array,
    *,
    gather: jax.Array | None = None,
    hadamard_block: int | None = None,
    global_scale: nvfp4.GlobalScale = None,
) -> jax.Array:
    """Per-row global scales `[M]` of the transformed activation.

    A static scale needs no pass over x. A dynamic one is an amax of the transformed x computed by
    XLA (the gather does not change an amax, so it is skipped; a Hadamard does, so it is applied).
    """
    if global_scale is None or isinstance(global_scale, str):
        xt = x
        if hadamard_block:
            if gather is not None:
                xt = jnp.take(x, gather, axis=-1)
            xt = block_hadamard(xt, hadamard_block)
        return resolve_act_global_scale(xt, global_scale)
    return resolve_act_global_scale(x[:, :1], global_scale)
