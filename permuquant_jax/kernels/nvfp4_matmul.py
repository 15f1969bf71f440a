"""NVFP4 block-scaled matmul kernel (Pallas, Triton backend) for Hopper: `y = x W^T`.

W is NVFP4 (E2M1 codes, E4M3 scales per 16, FP32 global scale) in a *prepacked* layout; x is either
the exact fp16 block values from the activation quantization kernel (W4A4) or a bf16/fp16 activation
(W4A16). Hopper has no FP4 tensor cores, so the kernel decodes weights in registers, exactly:

    fp16 bits of code c: ((c & 7) << 9) | ((c & 8) << 12)      = e2m1(c) * 2^-14   (bit placement)
    fp16 bits of scale byte b: (b & 0x7f) << 7, times 2^15      = s * 2^7           (exact, normal)
    product in fp16                                             = e2m1(c) * s * 2^-7 (exact: <= 6
                                                                  significant bits, in [2^-17, 21])

and multiplies on the tensor cores with fp32 accumulation; the epilogue multiplies by
2^7 * g_x[m] * g_w[n], adds the bias and casts. The decoded weight tile is the *first* dot operand
("swap AB": each program computes out^T = W x^T for a tile of output channels x tokens), which keeps
it in registers on Hopper (wgmma with A from registers) instead of a round trip through shared memory.

Prepacked weights (lossless, `prepack` / `unprepack`), N and K zero-padded to multiples of 128
(padding decodes to zeros), scales as raw E4M3 bytes `[Np, Kp/16]`, the global scale a per-row float32
vector `[N]`. Two code layouts:
- "canonical" (default): the canonical bytes; the kernel decodes both nibbles and interleaves them back
  (`tt.join`) for one K = 128 dot per step. XLA's decode (`dispatch.dequant_dot`) reads it as is.
- "chunk128": in each chunk of 128 channels, byte j holds channel 128c + j (low nibble) and
  128c + 64 + j (high nibble): two contiguous 64-channel halves, two K = 64 dots, no interleave
  (slightly faster at M >= 4096, and the layout of the CUDA-core "gemv" kernel).
The reference is `reference.nvfp4_matmul_ref`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from permuquant_jax.formats.nvfp4 import BLOCK_SIZE, NVFP4Tensor

CHUNK = 128  # channels per prepacked chunk = the kernel's K step
HALF = CHUNK // 2
_GROUPS_PER_HALF = HALF // BLOCK_SIZE


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "global_scale"],
    meta_fields=["n", "k", "layout"],
)
@dataclasses.dataclass(frozen=True)
class PrepackedNVFP4:
    """NVFP4 weights `[n, k]` in the matmul kernel's layout (see the module docstring).

    codes: uint8 `[Np, Kp/2]` (chunked nibble order); scales: uint8 `[Np, Kp/16]` (E4M3 bytes);
    global_scale: float32 `[n]`; `n`, `k`: the logical shape.
    """

    codes: jax.Array
    scales: jax.Array
    global_scale: jax.Array
    n: int
    k: int
    layout: str = "canonical"

    @property
    def shape(self) -> tuple[int, int]:
        """Logical shape `(N, K)`."""
        return (self.n, self.k)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


LAYOUTS = ("chunk128", "canonical")


def prepack(w: NVFP4Tensor, layout: str = "canonical") -> PrepackedNVFP4:
    """Canonical NVFP4 weights `[N, K]` -> the kernel's prepacked layout (lossless; jittable).

    layout "chunk128": nibbles reordered per 128-channel chunk (see the module docstring);
    "canonical": the canonical byte order, only padded (the kernel interleaves after decoding).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, found {layout!r}")
    if w.codes.ndim != 2:
        raise ValueError(f"prepack takes 2-D weights [N, K/2] codes, found codes of shape {w.codes.shape}")
    n, k = w.shape
    np_, kp = _round_up(n, CHUNK), _round_up(k, CHUNK)
    codes = jnp.pad(w.codes, ((0, np_ - n), (0, (kp - k) // 2)))
    lo = codes & 15
    hi = codes >> 4
    c = jnp.stack([lo, hi], axis=-1).reshape(np_, kp // CHUNK, 2, HALF)  # [.., chunk, half, j]
    packed = (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(np_, kp // 2) if layout == "chunk128" else codes
    scales = jnp.pad(jax.lax.bitcast_convert_type(w.scales, jnp.uint8), ((0, np_ - n), (0, (kp - k) // BLOCK_SIZE)))
    g = jnp.asarray(w.global_scale, jnp.float32)
    g = jnp.broadcast_to(g.reshape(-1) if g.ndim else g, (n,))
    return PrepackedNVFP4(codes=packed, scales=scales, global_scale=g, n=n, k=k, layout=layout)


def unprepack(p: PrepackedNVFP4) -> NVFP4Tensor:
    """Inverse of `prepack`: back to canonical NVFP4 `[N, K]` with a per-row global scale `[N, 1]`."""
    np_, kp2 = p.codes.shape
    kp = 2 * kp2
    if p.layout == "canonical":
        codes = p.codes[: p.n, : p.k // 2]
    else:
        c = p.codes.reshape(np_, kp // CHUNK, HALF)
        full = jnp.concatenate([c & 15, c >> 4], axis=-1).reshape(np_, kp)[: p.n, : p.k]
        codes = full[:, 0::2] | (full[:, 1::2] << 4)
    scales = jax.lax.bitcast_convert_type(p.scales[: p.n, : p.k // BLOCK_SIZE], jnp.float8_e4m3fn)
    return NVFP4Tensor(codes=codes, scales=scales, global_scale=p.global_scale[:, None])


def _iota(n: int) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _decode_half(nib: jax.Array, s16: jax.Array, bn: int) -> jax.Array:
    """Nibbles uint8 `[bn, 64]` and scales fp16 (s * 2^7) `[bn, 4]` -> fp16 weights * 2^-7 `[bn, 64]`."""
    c = nib.astype(jnp.uint16)
    v = jax.lax.bitcast_convert_type(((c & 7) << 9) | ((c & 8) << 12), jnp.float16)
    v = v.reshape(bn, _GROUPS_PER_HALF, BLOCK_SIZE) * s16[:, :, None]
    return v.reshape(bn, HALF)


def _decode_asm(shift_mag: int, shift_sign: int) -> str:
    """PTX: 4 bytes in $2 -> 4 fp16 in $0, $1 (bytes 0,1 and 2,3 spread over 16-bit lanes by prmt)."""
    lines = ["{", ".reg .b32 t, a, b;"]
    for out, sel in (("$0", "0x4140"), ("$1", "0x4342")):
        lines += [
            f"prmt.b32 t, $2, 0, {sel};",
            f"shl.b32 a, t, {shift_mag};",
            "and.b32 a, a, 0x0E000E00;",
            f"shl.b32 b, t, {shift_sign};",
            "and.b32 b, b, 0x80008000;",
            f"or.b32 {out}, a, b;",
        ]
    return "\n".join(lines + ["}"])


# Low nibble: magnitude bits 0-2 -> fp16 bits 9-11, sign bit 3 -> 15; high nibble: bits 4-6, 7.
_DECODE_LO_ASM = _decode_asm(9, 12)
_DECODE_HI_ASM = _decode_asm(5, 8)


def _decode_bytes(byte: jax.Array, use_asm: bool) -> tuple[jax.Array, jax.Array]:
    """Bytes uint8 `[r, c]` -> (low-nibble values, high-nibble values), fp16 e2m1 * 2^-14, exact.

    With `use_asm`, 4 bytes at a time in 32-bit registers (two values per instruction); else one
    element at a time (what interpret mode runs; same bits).
    """
    if use_asm:
        out = jax.ShapeDtypeStruct(byte.shape, jnp.float16)
        (lo,) = plgpu.elementwise_inline_asm(
            _DECODE_LO_ASM, args=[byte], constraints="=r,=r,r", pack=4, result_shape_dtypes=[out]
        )
        (hi,) = plgpu.elementwise_inline_asm(
            _DECODE_HI_ASM, args=[byte], constraints="=r,=r,r", pack=4, result_shape_dtypes=[out]
        )
        return lo, hi
    c = byte.astype(jnp.uint16)
    lo = jax.lax.bitcast_convert_type(((c & 7) << 9) | ((c & 8) << 12), jnp.float16)
    hi = jax.lax.bitcast_convert_type(((c & 0x70) << 5) | ((c & 0x80) << 8), jnp.float16)
    return lo, hi


def _offsets(step: jax.Array, index: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(channel, code byte, scale group) offsets of K step `step`.

    index "mul" (default): products of the step with constants, with `pl.multiple_of` hints, so Triton
    can prove 16-byte alignment and issue vectorized async copies; "div": the former `kc // 2`,
    `kc // 16` of a traced index (floor division defeats the alignment analysis: byte loads). Same values.
    """
    if index == "div":
        kc = step * CHUNK
        return kc, kc // 2, kc // BLOCK_SIZE
    gs = CHUNK // BLOCK_SIZE
    return pl.multiple_of(step * CHUNK, CHUNK), pl.multiple_of(step * HALF, HALF), pl.multiple_of(step * gs, gs)


def _load_x(x_ref, m0, bm: int, c0, width: int, mmask, m: int, k: int, index: str) -> jax.Array:
    """The x tile `[bm, width]` at rows m0.., channels c0..; zeros outside `[m, k]`.

    With index "mul", masks only what can be out of range (none when bm divides M and 128 divides K),
    so a full tile is a plain vectorized load.
    """
    ref = x_ref.at[pl.ds(m0, bm), pl.ds(c0, width)]
    kmask = (c0 + _iota(width)) < k
    if index == "div":
        return plgpu.load(ref, mask=mmask[:, None] & kmask[None, :], other=0)
    if m % bm == 0 and k % CHUNK == 0:
        return plgpu.load(ref)
    if k % CHUNK == 0:
        return plgpu.load(ref, mask=jnp.broadcast_to(mmask[:, None], (bm, width)), other=0)
    return plgpu.load(ref, mask=mmask[:, None] & kmask[None, :], other=0)


def _load_scales(scales_ref, n0: int, g0: int, bn: int, ng: int = _GROUPS_PER_HALF) -> jax.Array:
    """E4M3 scale bytes `[bn, ng]` -> fp16 s * 2^7 (bit placement gives s * 2^-8, exact, subnormals too)."""
    sb = plgpu.load(scales_ref.at[pl.ds(n0, bn), pl.ds(g0, ng)])
    s16 = jax.lax.bitcast_convert_type((sb & 0x7F).astype(jnp.uint16) << 7, jnp.float16)
    return s16 * jnp.float16(2.0**15)


def _scale_f16(sb: jax.Array) -> jax.Array:
    """E4M3 scale bytes (any shape) -> fp16 s * 2^7, exact."""
    s16 = jax.lax.bitcast_convert_type((sb & 0x7F).astype(jnp.uint16) << 7, jnp.float16)
    return s16 * jnp.float16(2.0**15)


def _matmul_kernel(
    x_ref,
    codes_ref,
    scales_ref,
    gx_ref,
    gw_ref,
    bias_ref,
    o_ref,
    *,
    m,
    n,
    k,
    bn,
    bm,
    k_steps,
    split_k,
    x_dtype,
    out_dtype,
    layout,
    decode,
    index,
    interpret,
):
    pn, pm = pl.program_id(0), pl.program_id(1)
    ps = pl.program_id(2) if split_k > 1 else 0
    n0, m0 = pn * bn, pm * bm
    rows_m = m0 + _iota(bm)
    mmask = rows_m < m
    step0 = ps * k_steps
    dot_dtype = jnp.float16 if x_dtype == jnp.float16 else jnp.bfloat16

    def body(t, acc):
        kc, kb, g0 = _offsets(step0 + t, index)
        byte = plgpu.load(codes_ref.at[pl.ds(n0, bn), pl.ds(kb, HALF)])
        s_lo = _load_scales(scales_ref, n0, g0, bn)
        s_hi = _load_scales(scales_ref, n0, g0 + _GROUPS_PER_HALF, bn)
        xlo = _load_x(x_ref, m0, bm, kc, HALF, mmask, m, k, index)
        xhi = _load_x(x_ref, m0, bm, kc + HALF, HALF, mmask, m, k, index)
        lo, hi = _decode_bytes(byte, use_asm=decode.startswith("asm") and not interpret)
        if decode in ("jnp", "asm"):  # scales broadcast over groups of 16 through a reshape
            lo = (lo.reshape(bn, _GROUPS_PER_HALF, BLOCK_SIZE) * s_lo[:, :, None]).reshape(bn, HALF)
            hi = (hi.reshape(bn, _GROUPS_PER_HALF, BLOCK_SIZE) * s_hi[:, :, None]).reshape(bn, HALF)
        elif decode in ("gather", "asm_gather"):  # scale bytes loaded per element (L1 hits), no reshape
            gidx = g0 + _iota(HALF) // BLOCK_SIZE
            rows_n = n0 + _iota(bn)
            sb_lo = plgpu.load(scales_ref.at[rows_n[:, None], gidx[None, :]])
            sb_hi = plgpu.load(scales_ref.at[rows_n[:, None], gidx[None, :] + _GROUPS_PER_HALF])
            lo = lo * _scale_f16(sb_lo)
            hi = hi * _scale_f16(sb_hi)
        wlo = lo.astype(dot_dtype)
        whi = hi.astype(dot_dtype)
        acc += jnp.dot(wlo, xlo.astype(dot_dtype).T, preferred_element_type=jnp.float32)
        acc += jnp.dot(whi, xhi.astype(dot_dtype).T, preferred_element_type=jnp.float32)
        return acc

    def body_join(t, acc):
        # canonical bytes: decode both nibbles, scale per group, interleave back (tt.join), one dot.
        kc, kb, g0 = _offsets(step0 + t, index)
        byte = plgpu.load(codes_ref.at[pl.ds(n0, bn), pl.ds(kb, HALF)])
        s16 = _load_scales(scales_ref, n0, g0, bn, 2 * _GROUPS_PER_HALF)
        lo, hi = _decode_bytes(byte, use_asm=(decode == "asm") and not interpret)
        if decode != "noscale":
            lo = (lo.reshape(bn, 2 * _GROUPS_PER_HALF, BLOCK_SIZE // 2) * s16[:, :, None]).reshape(bn, HALF)
            hi = (hi.reshape(bn, 2 * _GROUPS_PER_HALF, BLOCK_SIZE // 2) * s16[:, :, None]).reshape(bn, HALF)
        w = jnp.stack([lo, hi], axis=-1).reshape(bn, CHUNK).astype(dot_dtype)
        xt = _load_x(x_ref, m0, bm, kc, CHUNK, mmask, m, k, index)
        acc += jnp.dot(w, xt.astype(dot_dtype).T, preferred_element_type=jnp.float32)
        return acc

    loop_body = body_join if layout == "canonical" else body
    acc = jax.lax.fori_loop(0, k_steps, loop_body, jnp.zeros((bn, bm), jnp.float32))
    cols_n = n0 + _iota(bn)
    nmask = cols_n < n
    omask = mmask[:, None] & nmask[None, :]
    if split_k > 1:
        plgpu.store(o_ref.at[ps, pl.ds(m0, bm), pl.ds(n0, bn)], acc.T, mask=omask)
        return
    gw = plgpu.load(gw_ref.at[pl.ds(n0, bn)], mask=nmask, other=0.0)
    gx = plgpu.load(gx_ref.at[pl.ds(m0, bm)], mask=mmask, other=0.0)
    b = plgpu.load(bias_ref.at[pl.ds(n0, bn)], mask=nmask, other=0.0)
    y = acc * (gw * np.float32(2.0**7))[:, None] * gx[None, :] + b[:, None]
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], y.T.astype(out_dtype), mask=omask)


def _gemv_kernel(
    x_ref,
    codes_ref,
    scales_ref,
    gx_ref,
    gw_ref,
    bias_ref,
    o_ref,
    *,
    m,
    n,
    k,
    bn,
    k_steps,
    split_k,
    out_dtype,
    decode,
    index,
    interpret,
):
    """Few rows (M <= 8): no tensor cores; memory bound on the weight bytes.

    index "mul": decode once per step, scale in fp16 (exact), fp32 multiply-add into a per-element
    accumulator `[bn, 64]` per row; one cross-lane reduction per output after the loop.
    index "div" (former version, kept to compare): group sums and a cross-lane reduction every step.
    """
    pn = pl.program_id(0)
    ps = pl.program_id(1) if split_k > 1 else 0
    n0 = pn * bn
    g = _GROUPS_PER_HALF
    use_asm = decode.startswith("asm") and not interpret
    full_k = k % CHUNK == 0 and index != "div"

    def xrow(r, c0):
        ref = x_ref.at[pl.ds(r, 1), pl.ds(c0, HALF)]
        if full_k:
            return plgpu.load(ref).astype(jnp.float32)
        return plgpu.load(ref, mask=((c0 + _iota(HALF)) < k)[None, :], other=0).astype(jnp.float32)

    def body_div(t, accs):
        kc, kb, g0 = _offsets(ps * k_steps + t, "div")
        byte = plgpu.load(codes_ref.at[pl.ds(n0, bn), pl.ds(kb, HALF)])
        lo, hi = _decode_bytes(byte, use_asm=use_asm)
        lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
        s_lo = _load_scales(scales_ref, n0, g0, bn).astype(jnp.float32)
        s_hi = _load_scales(scales_ref, n0, g0 + g, bn).astype(jnp.float32)
        out = []
        for r in range(m):
            xl, xh = xrow(r, kc), xrow(r, kc + HALF)
            pl_ = jnp.sum((lo * xl).reshape(bn, g, BLOCK_SIZE), axis=-1) * s_lo
            ph_ = jnp.sum((hi * xh).reshape(bn, g, BLOCK_SIZE), axis=-1) * s_hi
            out.append(accs[r] + pl_ + ph_)
        return tuple(out)

    def body_mul(t, accs):
        kc, kb, g0 = _offsets(ps * k_steps + t, index)
        byte = plgpu.load(codes_ref.at[pl.ds(n0, bn), pl.ds(kb, HALF)])
        lo, hi = _decode_bytes(byte, use_asm=use_asm)
        s_lo = _load_scales(scales_ref, n0, g0, bn)
        s_hi = _load_scales(scales_ref, n0, g0 + g, bn)
        wlo = (lo.reshape(bn, g, BLOCK_SIZE) * s_lo[:, :, None]).reshape(bn, HALF).astype(jnp.float32)
        whi = (hi.reshape(bn, g, BLOCK_SIZE) * s_hi[:, :, None]).reshape(bn, HALF).astype(jnp.float32)
        return tuple(accs[r] + wlo * xrow(r, kc) + whi * xrow(r, kc + HALF) for r in range(m))

    if index == "div":
        init = tuple(jnp.zeros((bn, g), jnp.float32) for _ in range(m))
        accs = jax.lax.fori_loop(0, k_steps, body_div, init)
    else:
        init = tuple(jnp.zeros((bn, HALF), jnp.float32) for _ in range(m))
        accs = jax.lax.fori_loop(0, k_steps, body_mul, init)
    cols_n = n0 + _iota(bn)
    nmask = cols_n < n
    if split_k > 1:
        for r in range(m):
            plgpu.store(
                o_ref.at[ps, pl.ds(r, 1), pl.ds(n0, bn)], jnp.sum(accs[r], axis=-1)[None, :], mask=nmask[None, :]
            )
        return
    gw = plgpu.load(gw_ref.at[pl.ds(n0, bn)], mask=nmask, other=0.0) * np.float32(2.0**7)
    b = plgpu.load(bias_ref.at[pl.ds(n0, bn)], mask=nmask, other=0.0)
    for r in range(m):
        gx = plgpu.load(gx_ref.at[pl.ds(r, 1)])
        y = jnp.sum(accs[r], axis=-1) * gw * gx + b
        plgpu.store(o_ref.at[pl.ds(r, 1), pl.ds(n0, bn)], y.astype(out_dtype)[None, :], mask=nmask[None, :])


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile and launch parameters of the matmul kernel (tuning tables hold these)."""

    block_n: int = 128
    block_m: int = 128
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1
    # weight decode: "jnp" | "asm" (packed inline-PTX nibble decode) | "gather" / "asm_gather" (scales
    # loaded per element instead of broadcast by a reshape) | "noscale" (wrong numbers: timing only)
    decode: str = "jnp"
    # "mma": tensor cores, tiles block_n x block_m; "gemv": CUDA cores, for M <= 8 (block_m unused)
    kind: str = "mma"
    # K-step offsets: "mul" (aligned, vectorized loads) | "div" (the former floor division; to compare)
    index: str = "mul"


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def nvfp4_matmul(
    x: jax.Array,
    w: PrepackedNVFP4,
    x_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    config: MatmulConfig = MatmulConfig(),
    out_dtype: jnp.dtype = jnp.bfloat16,
    interpret: bool = False,
) -> jax.Array:
    """`y [M, N] = (x * x_scale[:, None]) @ W^T + bias` with prepacked NVFP4 `W [N, K]`.

    `x [M, K]`: fp16 block values from `act_quant(out="values")` with their per-row global scales
    `x_scale [M]` (W4A4), or a bf16/fp16 activation with `x_scale=None` (W4A16; fp32 is rounded to
    bf16 first).
    """
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has K = {k} channels but the weights expect K = {w.k}")
    if x.dtype not in (jnp.float16, jnp.bfloat16):
        x = x.astype(jnp.bfloat16)
    n = w.n
    kp = 2 * w.codes.shape[1]
    steps = kp // CHUNK
    cfg = config
    split = cfg.split_k if steps % cfg.split_k == 0 else 1
    gx = jnp.ones((m,), jnp.float32) if x_scale is None else x_scale.astype(jnp.float32).reshape(m)
    b = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32).reshape(n)
    gemv = cfg.kind == "gemv"
    if gemv and (m > 8 or w.layout != "chunk128"):
        raise ValueError(f"the gemv kernel takes M <= 8 rows and chunk128 weights; found M = {m}, {w.layout}")
    if gemv:
        grid = (pl.cdiv(n, cfg.block_n),) + ((split,) if split > 1 else ())
    else:
        grid = (pl.cdiv(n, cfg.block_n), pl.cdiv(m, cfg.block_m)) + ((split,) if split > 1 else ())
    out_shape = (
        jax.ShapeDtypeStruct((split, m, n), jnp.float32) if split > 1 else jax.ShapeDtypeStruct((m, n), out_dtype)
    )
    if gemv:
        kernel = functools.partial(
            _gemv_kernel,
            m=m,
            n=n,
            k=k,
            bn=cfg.block_n,
            k_steps=steps // split,
            split_k=split,
            out_dtype=out_dtype,
            decode=cfg.decode,
            index=cfg.index,
            interpret=interpret,
        )
    else:
        kernel = functools.partial(
            _matmul_kernel,
            m=m,
            n=n,
            k=k,
            bn=cfg.block_n,
            bm=cfg.block_m,
            k_steps=steps // split,
            split_k=split,
            x_dtype=x.dtype,
            out_dtype=out_dtype,
            layout=w.layout,
            decode=cfg.decode,
            index=cfg.index,
            interpret=interpret,
        )
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="nvfp4_matmul",
    )(x, w.codes, w.scales, gx, w.global_scale, b)
    if split > 1:
        acc = jnp.sum(y, axis=0)
        y = (acc * (w.global_scale * np.float32(2.0**7))[None, :] * gx[:, None] + b[None, :]).astype(out_dtype)
    return y
