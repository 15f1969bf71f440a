"""NVFP4 block-scaled matmul for Hopper (sm_90) on Pallas' Mosaic GPU backend: `y = x W^T`.

Same function as `nvfp4_matmul.nvfp4_matmul` (the Triton kernel) and `dispatch.dequant_dot`: W is NVFP4
(E2M1 codes, E4M3 scales per 16 input channels, an FP32 global scale per output channel), x is either
the exact fp16 block values of the activation quantizer with their per-row global scales (W4A4) or a
bf16/fp16 activation (W4A16). Products are exact in 16 bits, accumulation is fp32 on the tensor cores.

Structure ("swap AB": each CTA computes a tile of out^T = W x^T, so the decoded weights are the wgmma
register operand A and the activation tile is operand B in shared memory):
- warpgroup 2 (producer, few registers): TMA copies of the int4 code tile `[128, bk]`, its scales and
  the activation tile `[bm, bk]` into a `stages`-deep ring of shared-memory buffers, one mbarrier per
  buffer; it waits for the consumers to free a buffer before refilling it.
- warpgroups 0 and 1 (consumers): each owns 64 output channels. Per K step: load its codes into
  registers (Mosaic's 4-bit upcast layout, relaid to the wgmma A layout by register shuffles), decode
  them by bit placement (inline PTX: one `prmt`, two shifts and masks per pair), multiply each 16-wide
  group by its scale in packed fp16, issue the wgmma and wait for it; one warpgroup's decode overlaps
  the other's wgmma (decoding the next tile while the own wgmma runs gave wrong results: see
  `MosaicConfig.pipeline`).
- epilogue: `acc * 2^7 * g_x[m] * g_w[n] + bias[n]`, cast, written transposed into shared memory and
  stored with TMA.

Decode (exact): fp16 bits `((c & 7) << 9) | ((c & 8) << 12)` are `e2m1(c) * 2^-14`; the scale byte `b`
gives fp16 bits `(b & 0x7f) << 7` = `s * 2^-8`, times 2^15 = `s * 2^7` (normal, <= 57344); their product
`e2m1(c) * s * 2^-7` has <= 6 significant bits in [2^-17, 21]: exact in fp16 (and in bf16, which the
W4A16 path with bf16 x converts it to). The epilogue multiplies by 2^7 (exact).

Operands in the kernel's layout (`MosaicWeights`, built by `to_mosaic` from `PrepackedNVFP4`): codes as
int4 `[Np, Kp]`, scales as uint32 `[Kp/64, Np]` (4 consecutive 16-groups of one row per word, the first
in the low byte), the global scale as float32 `[Np]`.
Mosaic GPU has no interpret mode on the CPU: CI tests the layout conversions and the wrapper's shape
logic (tests/test_kernels.py); tests/gpu/check_mosaic.py checks the kernel on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from permuquant_jax.kernels.nvfp4_matmul import PrepackedNVFP4

N_TILE = 128  # output channels per CTA (64 per consumer warpgroup)
WG_N = 64
K_WORD = 64  # input channels per uint32 scale word
CHUNK_K = 128  # K padding of prepacked weights (nvfp4_matmul.CHUNK)
NIBBLE_ORDERS = ("low_first", "high_first")
PIPELINES = ("serial", "ahead", "fenced", "pipelined")
DEFAULT_SMS = 132  # H100 / H200 SXM; used when the device does not say (lowering on a CPU)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tiles of the Mosaic GPU kernel: `block_m` tokens per CTA (the wgmma N, <= 256), `block_k`
    input channels per pipeline step (64 or 128), `stages` buffers in the ring."""

    block_m: int = 256
    block_k: int = 64
    stages: int = 4
    consumer_registers: int = 232
    producer_registers: int = 40
    # "ptx": inline prmt; "arith": the same bits with plain integer ops; "none": a diagnostic that skips
    # the decode arithmetic and the scales (wrong numbers; times the kernel's skeleton)
    decode: str = "ptx"
    # "serial": decode, wgmma, wait, per step (the two consumer warpgroups overlap each other);
    # "ahead": decode the next tile while the wgmma runs (wrong results on the H200, 2026-12-01: the
    # register A operand of an in-flight wgmma is not protected from reuse; kept for diagnosis);
    # "fenced": "ahead" with the A registers kept live past the wgmma wait by an optimization
    # barrier (the fix for "ahead"; lowered on the CPU, not yet run on a GPU)
    pipeline: str = "serial"
    # "pipelined": one wgmma always in flight per warpgroup: decode tile k+1 into a second set of A
    # registers while wgmma k runs, issue wgmma k+1, then `wgmma_wait(1)` (k done) before set k is
    # released (a side-effecting use keeps it live until then; the loop is unrolled by two so no set is
    # copied while a wgmma reads it)
    # persistent: a grid of `grid_ctas` CTAs (default: the device's SM count) loops over the output
    # tiles; the producer fills the next tile's buffers while the consumers run the epilogue
    persistent: bool = False
    grid_ctas: int | None = None
    # W4A16 with bf16 x: decode straight to bf16 (bit placement + a bf16 scale multiply) instead of fp16
    # then a conversion
    bf16_decode: bool = False

    def __post_init__(self):
        if self.block_m not in (64, 128, 192, 256):
            raise ValueError(f"block_m must be 64, 128, 192 or 256 (the wgmma N), found {self.block_m}")
        if self.block_k not in (64, 128):
            raise ValueError(f"block_k must be 64 or 128, found {self.block_k}")
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2 (a ring of buffers), found {self.stages}")
        if self.decode not in ("ptx", "arith", "none"):
            raise ValueError(f"decode must be 'ptx', 'arith' or 'none' (diagnostic), found {self.decode!r}")
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, found {self.pipeline!r}")
        if self.grid_ctas is not None and self.grid_ctas < 1:
            raise ValueError(f"grid_ctas must be >= 1 (or None: the SM count), found {self.grid_ctas}")

    @property
    def tag(self) -> str:
        """A short name of the config (the kernel's name, so compiler logs can be told apart)."""
        d = ("" if self.decode == "ptx" else f"_{self.decode}") + ("_b16" if self.bf16_decode else "")
        return f"{self.pipeline}_{'p' if self.persistent else 'g'}_bm{self.block_m}_bk{self.block_k}_s{self.stages}{d}"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales", "global_scale"],
    meta_fields=["n", "k"],
)
@dataclasses.dataclass(frozen=True)
class MosaicWeights:
    """NVFP4 weights `[n, k]` in the Mosaic kernel's layout (see the module docstring).

    codes: int4 `[Np, Kp]`; scales: uint32 `[Kp/64, Np]`; global_scale: float32 `[Np]` (zero-padded);
    `n`, `k`: the logical shape.
    """

    codes: jax.Array
    scales: jax.Array
    global_scale: jax.Array
    n: int
    k: int


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def pack_scale_words(scales_u8: jax.Array) -> jax.Array:
    """E4M3 scale bytes `[*, Np, Kp/16]` -> uint32 words `[*, Kp/64, Np]`: word `[i, n]` holds the scales of
    groups 4i..4i+3 of row n, group 4i in the low byte. Kp/16 must be a multiple of 4; leading axes
    (stacked layers) are kept."""
    *lead, np_, g = scales_u8.shape
    if g % 4:
        raise ValueError(f"pack_scale_words needs a multiple of 4 scale groups per row, found {g}")
    b = scales_u8.astype(jnp.uint32).reshape(*lead, np_, g // 4, 4)
    words = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return jnp.swapaxes(words, -1, -2)


def unpack_scale_words(words: jax.Array) -> jax.Array:
    """Inverse of `pack_scale_words`: uint32 `[*, Kp/64, Np]` -> uint8 `[*, Np, Kp/16]`."""
    w = jnp.swapaxes(words, -1, -2)
    parts = [((w >> (8 * i)) & 0xFF).astype(jnp.uint8) for i in range(4)]
    return jnp.stack(parts, axis=-1).reshape(*w.shape[:-1], 4 * w.shape[-1])


def stored_scale_words(scales: jax.Array) -> jax.Array:
    """The Mosaic kernel's scale operand from canonical block scales `[*, N, K/16]` (float8_e4m3fn or
    their uint8 bytes): N padded to a multiple of 128 and K to a multiple of 128 (as `prepack` pads),
    packed by `pack_scale_words` -> uint32 `[*, Kp/64, Np]`. Computed once per weight (at load, see
    `QuantLinear.prepare_device_layout`) instead of per call; lossless (`unpack_scale_words`)."""
    if scales.dtype != jnp.uint8:
        scales = lax.bitcast_convert_type(scales, jnp.uint8)
    *lead, n, g = scales.shape
    np_, gp = _round_up(n, N_TILE), _round_up(g, CHUNK_K // 16)
    pad = [(0, 0)] * len(lead) + [(0, np_ - n), (0, gp - g)]
    return pack_scale_words(jnp.pad(scales, pad))


def codes_to_int4(codes_u8: jax.Array, nibble_order: str = "low_first") -> jax.Array:
    """Packed code bytes `[Np, Kp/2]` (element 2i in the low nibble) -> int4 `[Np, Kp]` holding the
    same 4-bit patterns (E2M1 codes read as two's complement int4: only bit patterns matter).

    nibble_order "high_first" swaps the nibbles first (for a device whose int4 packing puts element 0
    in the high nibble; tests/gpu/check_mosaic.py finds out which one the kernel needs).
    """
    if nibble_order not in NIBBLE_ORDERS:
        raise ValueError(f"nibble_order must be one of {NIBBLE_ORDERS}, found {nibble_order!r}")
    c = codes_u8.astype(jnp.uint8)
    if nibble_order == "high_first":
        c = (c >> 4) | (c << 4)
    pairs = lax.bitcast_convert_type(c, jnp.int4)  # [..., 2]: [..., 0] = low nibble
    return pairs.reshape(c.shape[0], 2 * c.shape[1])


def int4_to_codes(codes_i4: jax.Array) -> jax.Array:
    """Inverse of `codes_to_int4(..., "low_first")`: int4 `[Np, Kp]` -> bytes `[Np, Kp/2]`."""
    np_, kp = codes_i4.shape
    return lax.bitcast_convert_type(codes_i4.reshape(np_, kp // 2, 2), jnp.uint8)


def to_mosaic(
    w: PrepackedNVFP4, nibble_order: str = "low_first", scale_words: jax.Array | None = None
) -> MosaicWeights:
    """Prepacked NVFP4 weights (canonical layout) -> the Mosaic kernel's layout (lossless; jittable).

    N is padded to a multiple of 128, K to a multiple of 64 (both already are for `prepack` output).
    `scale_words`: the weight's `stored_scale_words`, computed once ahead of time; then only the
    codes are reinterpreted here (an int4 view of the same bytes) and no scale transpose runs per call.
    """
    if w.layout != "canonical":
        raise ValueError(f"to_mosaic takes canonical-layout weights, found layout {w.layout!r}; prepack(w) first")
    np0, kp0 = w.codes.shape[0], 2 * w.codes.shape[1]
    np_, kp = _round_up(np0, N_TILE), _round_up(kp0, K_WORD)
    codes = w.codes if (np_, kp) == (np0, kp0) else jnp.pad(w.codes, ((0, np_ - np0), (0, (kp - kp0) // 2)))
    if scale_words is None:
        scales = jnp.pad(w.scales, ((0, np_ - np0), (0, (kp - kp0) // 16)))
        scale_words = pack_scale_words(scales)
    elif scale_words.shape != (kp // K_WORD, np_) or scale_words.dtype != jnp.uint32:
        raise ValueError(
            f"scale_words must be uint32 [{kp // K_WORD}, {np_}] for weights of padded shape [{np_}, {kp}], found "
            f"{scale_words.dtype} {list(scale_words.shape)}; build them with stored_scale_words(scales)"
        )
    gw = jnp.pad(w.global_scale.astype(jnp.float32), (0, np_ - w.n))
    return MosaicWeights(
        codes=codes_to_int4(codes, nibble_order), scales=scale_words, global_scale=gw, n=w.n, k=w.k
    )


def plan(m: int, k: int, w: MosaicWeights, config: MosaicConfig, sms: int | None = None) -> dict[str, int]:
    """Padded sizes and grid of one call (pure; tested on the CPU). `sms`: the device's SM count
    (persistent configs launch `config.grid_ctas or sms` CTAs, at most one per tile)."""
    np_, kp = w.codes.shape
    if k != w.k:
        raise ValueError(f"x has K = {k} channels but the weights expect K = {w.k}")
    mp = _round_up(max(m, 1), config.block_m)
    bk = config.block_k if kp % config.block_k == 0 else K_WORD
    m_tiles, n_tiles, k_iters = mp // config.block_m, np_ // N_TILE, kp // bk
    tiles = m_tiles * n_tiles
    grid = tiles
    if config.persistent:
        grid = min(tiles, config.grid_ctas or sms or DEFAULT_SMS)
    return {
        "mp": mp, "np": np_, "kp": kp, "bk": bk, "m_tiles": m_tiles, "n_tiles": n_tiles, "k_iters": k_iters,
        "tiles": tiles, "grid": grid, "tiles_per_cta": -(-tiles // grid),
    }


# ---------------------------------------------------------------------------------------------------
# The kernel. Imports of the Mosaic GPU modules stay inside functions: the package must import on
# machines whose jaxlib lacks them.


def _mgpu():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def _load(ref, layout):
    """`plgpu.load(ref, layout=...)` across JAX 0.10 (index required) and 0.11 (index deprecated)."""
    plgpu = _mgpu()
    idx = inspect.signature(plgpu.load).parameters.get("idx")
    if idx is not None and idx.default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _decode_fn(shape: tuple[int, int], impl: str = "ptx", dtype=jnp.float16):
    """inline_mgpu function: (int4 codes `[64, bk]` in the wgmma A layout, fp16 `s * 2^7` per 16-group as
    `bk/16` row vectors) -> fp16 `e2m1(c) * s * 2^-7` in the wgmma A layout.

    Codes by bit placement (fp16 bits `((c & 7) << 9) | ((c & 8) << 12)` = `e2m1(c) * 2^-14`, inline PTX:
    one `prmt` gathers a byte's two nibbles into the two fp16 halves of a register), then one packed fp16
    multiply by the group's scale (register slices of 16 columns, no data movement).

    dtype bf16 (the "ptx" decode only): bf16 bits `((c & 7) << 6) | ((c & 8) << 12)` = `e2m1(c) * 2^-126`
    (code 1 is a bf16 subnormal) times bf16 `s * 2^119`: the same product `e2m1(c) * s * 2^-7`, exact and
    normal in bf16, with no fp16 -> bf16 conversion.
    """
    plgpu = _mgpu()
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    groups = shape[1] // 16
    row = plgpu.Layout.WGMMA.reduce(1)

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, *([row] * groups)),
        return_type=plgpu.ShapeDtypeStruct(shape, dtype, layout=plgpu.Layout.WGMMA),
    )
    def decode(_, codes, *scales):
        i8 = ir.IntegerType.get_signless(8)
        i32 = ir.IntegerType.get_signless(32)
        bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
        f16x2 = ir.VectorType.get((2,), ir.BF16Type.get() if bf16 else ir.F16Type.get())
        place = ("shr.b32 dq_a, dq_p, 2;", "0x01C001C0") if bf16 else ("shl.b32 dq_a, dq_p, 1;", "0x0E000E00")
        shifted: dict[int, tuple] = {}
        regs = np.empty(codes.registers.shape, dtype=object)
        for idx, reg in np.ndenumerate(codes.registers):
            src, byte = None, 0
            owner = getattr(reg.owner, "opview", None)
            if isinstance(owner, vector.ExtractStridedSliceOp):
                if mgpu_utils.bitwidth(owner.source.type) == 32 and owner.strides[0].value == 1:
                    src, byte = mgpu_utils.bitcast(owner.source, i32), owner.offsets[0].value // 2
            if src is None:
                src = arith.extui(i32, mgpu_utils.bitcast(reg, i8))
            key = id(src)
            if key not in shifted:
                shifted[key] = (src, arith.shrui(src, arith.constant(i32, 4)))
            x, x4 = shifted[key]
            if impl == "arith":
                regs[idx] = mgpu_utils.bitcast(_place_arith(arith, i32, x, byte), f16x2)
                continue
            sel = (byte << 4) | ((4 + byte) << 12)
            if impl == "none":  # diagnostic: the nibbles as fp16 bits, no decode arithmetic
                bits = llvm.inline_asm(i32, [x, x4], f"prmt.b32 $0, $1, $2, {sel:#x};", "=r,r,r")
                regs[idx] = mgpu_utils.bitcast(bits, f16x2)
                continue
            bits = llvm.inline_asm(
                i32,
                [x, x4],
                f"""
                {{
                .reg .b32 dq_p, dq_a, dq_b;
                prmt.b32 dq_p, $1, $2, {sel:#x};
                {place[0]}
                shl.b32 dq_b, dq_p, 4;
                and.b32 dq_a, dq_a, {place[1]};
                and.b32 dq_b, dq_b, 0x80008000;
                or.b32 $0, dq_a, dq_b;
                }}
                """,
                "=r,r,r",
            )
            regs[idx] = mgpu_utils.bitcast(bits, f16x2)
        vals = mgpu.FragmentedArray(_registers=regs, _layout=codes.layout, _is_signed=None)
        if impl == "none":
            return vals
        out = vals.copy()
        for j, s16 in enumerate(scales):
            cols = slice(16 * j, 16 * (j + 1))
            sb = s16.broadcast_in_dim((shape[0], 16), (0,), codes.layout)
            out[:, cols] = vals[:, cols] * sb
        return out

    return decode


def _place_arith(arith, i32, x, byte: int):
    """fp16x2 bits of the two codes in byte `byte` of the i32 `x` (the "arith" decode)."""
    c = lambda v: arith.constant(i32, v)
    y = arith.shrui(x, c(8 * byte)) if byte else x
    lo = arith.ori(arith.shli(arith.andi(y, c(0x7)), c(9)), arith.shli(arith.andi(y, c(0x8)), c(12)))
    hi = arith.ori(arith.shli(arith.andi(y, c(0x70)), c(21)), arith.shli(arith.andi(y, c(0x80)), c(24)))
    return arith.ori(lo, hi)


def _keep_live(arr) -> None:
    """A side-effecting use of every register of `arr` (a WGMMA-layout array): its registers hold their
    value until here (an in-flight wgmma's register operand must not be overwritten before its wait)."""
    plgpu = _mgpu()
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,))
    def keep(_, a):
        i32 = ir.IntegerType.get_signless(32)
        regs = [mgpu_utils.bitcast(r, i32) for r in a.registers.flat]
        llvm.inline_asm(ir.Type.parse("!llvm.void"), regs, "", ",".join(["r"] * len(regs)), has_side_effects=True)

    keep(arr)


def _fence_async_shared():
    """Orders this thread's generic-proxy shared-memory accesses before later TMA (async proxy) writes."""
    plgpu = _mgpu()
    from jax._src.lib.mlir.dialects import nvvm

    @plgpu.inline_mgpu()
    def fence(_):
        nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)

    fence()


def _scale_halves(word, j: int, dtype=jnp.float16):
    """fp16 `s * 2^7` (bf16: `s * 2^119`) of scale group j (0..3) from the uint32 scale words (row layout)."""
    b = lax.shift_right_logical(word, jnp.uint32(8 * j)) & jnp.uint32(0x7F)
    if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16):  # exponent field E + 239: 2^(E-7) (1 + M/8) * 2^119
        bits = (lax.shift_left(b, jnp.uint32(4)) + jnp.uint32(239 << 7)).astype(jnp.uint16)
        return lax.bitcast_convert_type(bits, jnp.bfloat16)
    bits = lax.shift_left(b, jnp.uint32(7)).astype(jnp.uint16)
    return lax.bitcast_convert_type(bits, jnp.float16) * jnp.float16(32768.0)


def _mosaic_call(x, codes, scales, gx, vecs, *, out_dtype, config: MosaicConfig, p: dict[str, int]):
    plgpu = _mgpu()
    from jax.experimental import pallas as pl

    bm, bk, stages = config.block_m, p["bk"], config.stages
    m_tiles, k_iters = p["m_tiles"], p["k_iters"]
    words = bk // K_WORD
    cdt = x.dtype
    wgmma = plgpu.Layout.WGMMA
    row = plgpu.Layout.WGMMA.reduce(1)
    col = plgpu.Layout.WGMMA.reduce(0)
    ddt = jnp.bfloat16 if (config.bf16_decode and cdt == jnp.bfloat16 and config.decode == "ptx") else jnp.float16
    decode = _decode_fn((WG_N, bk), config.decode, ddt)

    def swizzled(shape, dtype):
        bits = jnp.dtype(dtype).itemsize * 8 if dtype != jnp.int4 else 4
        sw = plgpu.find_swizzle(shape[-1] * bits)
        return plgpu.SMEM(
            shape, dtype, transforms=(plgpu.TilingTransform((8, 8 * sw // bits)), plgpu.SwizzleTransform(sw))
        )

    out_bits = jnp.dtype(out_dtype).itemsize * 8
    o_swizzle = plgpu.find_swizzle(WG_N * out_bits)
    scratch = dict(
        x_smem=swizzled((stages, bm, bk), cdt),
        w_smem=swizzled((stages, N_TILE, bk), jnp.int4),
        s_smem=plgpu.SMEM((stages, words, N_TILE), jnp.uint32),
        gx_smem=plgpu.SMEM((bm,), jnp.float32),
        v_smem=plgpu.SMEM((2, N_TILE), jnp.float32),
        o_smem=plgpu.SMEM((2, bm, WG_N), out_dtype, transforms=(plgpu.SwizzleTransform(o_swizzle),)),
        x_bar=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        w_bar=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        e_bar=plgpu.Barrier(num_arrivals=2),
        x_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        w_free=plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    )

    def weights_tile(w_smem, s_smem, si, wg):
        """Decoded, scaled weight tile `[64, bk]` of this warpgroup (16-bit, wgmma A layout)."""
        ns = pl.ds(wg * WG_N, WG_N)
        codes_t = _load(w_smem.at[si, ns], plgpu.Layout.WGMMA_UPCAST_4X)
        words_t = [_load(s_smem.at[si, i, ns], row) for i in range(words)]
        codes_t = plgpu.layout_cast(codes_t, wgmma)
        w16 = decode(codes_t, *[_scale_halves(words_t[j // 4], j % 4, ddt) for j in range(bk // 16)])
        return w16 if w16.dtype == cdt else w16.astype(cdt)

    grid, tiles, per_cta = p["grid"], p["tiles"], p["tiles_per_cta"]
    if config.persistent:
        scratch["e_free"] = plgpu.Barrier(num_arrivals=2)

    def kernel(x_gmem, w_gmem, s_gmem, gx_gmem, v_gmem, out_gmem, **sc):
        x_smem, w_smem, s_smem, gx_smem, v_smem, o_smem = (
            sc["x_smem"], sc["w_smem"], sc["s_smem"], sc["gx_smem"], sc["v_smem"], sc["o_smem"]
        )
        x_bar, w_bar, e_bar, x_free, w_free = sc["x_bar"], sc["w_bar"], sc["e_bar"], sc["x_free"], sc["w_free"]
        e_free = sc.get("e_free")
        cta = lax.axis_index("mn")
        wg = lax.axis_index("wg")

        def coords(t):
            mi, ni = lax.rem(t, m_tiles), lax.div(t, m_tiles)
            return mi, ni, pl.ds(mi * bm, bm), pl.ds(ni * N_TILE, N_TILE)

        def over_tiles(fn):
            """fn(i, t) for this CTA's tiles t (one tile per CTA unless persistent)."""
            if not config.persistent:
                fn(0, cta)
                return

            @pl.loop(0, per_cta)
            def _tile(i):
                t = cta + i * grid

                @pl.when(t < tiles)
                def _():
                    fn(i, t)

        def mainloop(acc_ref, base):
            """The K loop of one tile; `base`: its first global step (ring slot = step % stages)."""
            slot = lambda ki: lax.rem(base + ki, stages)

            def w_tile(ki):
                si = slot(ki)
                plgpu.barrier_wait(w_bar.at[si])
                w = weights_tile(w_smem, s_smem, si, wg)
                plgpu.barrier_arrive(w_free.at[si])
                return w

            def mma(ki, w):
                si = slot(ki)
                plgpu.barrier_wait(x_bar.at[si])
                plgpu.wgmma(acc_ref, w, plgpu.transpose_ref(x_smem.at[si], (1, 0)))

            if config.pipeline == "serial":

                @pl.loop(0, k_iters)
                def _step(ki):
                    mma(ki, w_tile(ki))
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(x_free.at[slot(ki)])

                return

            if config.pipeline == "pipelined":
                # Two register sets, unrolled by two so that each set keeps one SSA value per step: the
                # value a wgmma reads stays in its registers (a later use, `_keep_live`, after the
                # wgmma_wait that retires it) and is never copied while in flight (a loop-carried copy
                # let the next decode reuse the registers of the running wgmma: NaNs on the H200).
                def one(ki, w_new, w_old):
                    mma(ki, w_new)
                    plgpu.wgmma_wait(1)  # wgmma ki-1, the reader of w_old, is done
                    _keep_live(w_old)
                    plgpu.barrier_arrive(x_free.at[slot(ki - 1)])

                wa = w_tile(0)
                mma(0, wa)

                def two_steps(j, wa):
                    k1 = 1 + 2 * j
                    wb = w_tile(k1)  # decoded while wgmma k1-1 runs
                    one(k1, wb, wa)
                    wa2 = w_tile(k1 + 1)
                    one(k1 + 1, wa2, wb)
                    return wa2

                wa = lax.fori_loop(0, (k_iters - 1) // 2, two_steps, wa)
                if (k_iters - 1) % 2:
                    wb = w_tile(k_iters - 1)
                    one(k_iters - 1, wb, wa)
                    wa = wb
                plgpu.wgmma_wait(0)
                _keep_live(wa)
                plgpu.barrier_arrive(x_free.at[slot(k_iters - 1)])
                return

            w0 = w_tile(0)

            def step(ki, w_cur):
                mma(ki, w_cur)
                w_next = lax.cond(ki + 1 < k_iters, lambda: w_tile(ki + 1), lambda: w_cur)
                plgpu.wgmma_wait(0)
                if config.pipeline == "fenced":  # w_cur's registers stay live (unreused) until here
                    _, w_next = lax.optimization_barrier((w_cur, w_next))
                plgpu.barrier_arrive(x_free.at[slot(ki)])
                return w_next

            lax.fori_loop(0, k_iters, step, w0)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(config.consumer_registers, action="increase")
            ns = pl.ds(wg * WG_N, WG_N)

            def tile(i, t):
                _, ni, ms, _ = coords(t)

                def body(acc_ref):
                    mainloop(acc_ref, i * k_iters)
                    return acc_ref[...]

                acc = pl.run_scoped(body, plgpu.ACC((WG_N, bm), jnp.float32))
                plgpu.barrier_wait(e_bar)
                gw = _load(v_smem.at[0, ns], row)
                bias_v = _load(v_smem.at[1, ns], row)
                gxv = _load(gx_smem, col)
                if e_free is not None:
                    plgpu.barrier_arrive(e_free)
                y = acc * jnp.float32(128.0)
                y = y * lax.broadcast_in_dim(gxv, (WG_N, bm), (1,))
                y = y * lax.broadcast_in_dim(gw, (WG_N, bm), (0,))
                y = y + lax.broadcast_in_dim(bias_v, (WG_N, bm), (0,))
                y = plgpu.layout_cast(y.astype(out_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
                if config.persistent:  # the previous tile's store has finished reading o_smem
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.transpose_ref(o_smem.at[wg], (1, 0))[...] = y
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], out_gmem.at[ms, pl.ds(ni * N_TILE + wg * WG_N, WG_N)])
                if not config.persistent:
                    plgpu.wait_smem_to_gmem(0)

            over_tiles(tile)
            if config.persistent:
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(config.producer_registers, action="decrease")

            def tile(i, t):
                _, _, ms, nt = coords(t)
                if not config.persistent:
                    plgpu.copy_gmem_to_smem(gx_gmem.at[ms], gx_smem, e_bar)
                    plgpu.copy_gmem_to_smem(v_gmem.at[:, nt], v_smem, e_bar)

                @pl.loop(0, k_iters)
                def _fill(ki):
                    g = i * k_iters + ki
                    si = lax.rem(g, stages)

                    @pl.when(g >= stages)
                    def _wait_free():
                        plgpu.barrier_wait(w_free.at[si])
                        plgpu.barrier_wait(x_free.at[si])
                        _fence_async_shared()

                    ks = pl.ds(ki * bk, bk)
                    plgpu.copy_gmem_to_smem(w_gmem.at[nt, ks], w_smem.at[si], w_bar.at[si])
                    plgpu.copy_gmem_to_smem(s_gmem.at[pl.ds(ki * words, words), nt], s_smem.at[si], w_bar.at[si])
                    plgpu.copy_gmem_to_smem(x_gmem.at[ms, ks], x_smem.at[si], x_bar.at[si])

                if config.persistent:  # after this tile's K loads: the consumers read the last values by now

                    @pl.when(i > 0)
                    def _wait_epilogue():
                        plgpu.barrier_wait(e_free)
                        _fence_async_shared()

                    plgpu.copy_gmem_to_smem(gx_gmem.at[ms], gx_smem, e_bar)
                    plgpu.copy_gmem_to_smem(v_gmem.at[:, nt], v_smem, e_bar)

            over_tiles(tile)

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((p["mp"], p["np"]), out_dtype),
        scratch_types=scratch,
        grid=(grid,),
        grid_names=("mn",),
        num_threads=3,
        thread_name="wg",
        kernel_name=f"nvfp4_mgpu_{config.tag}",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    return f(x, codes, scales, gx, vecs)


def nvfp4_matmul_mosaic(
    x: jax.Array,
    w: MosaicWeights,
    x_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    config: MosaicConfig = MosaicConfig(),
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """`y [M, N] = (x * x_scale[:, None]) @ W^T + bias` with NVFP4 `W [N, K]` in the Mosaic layout
    (`to_mosaic`). Same arguments and numerics as `nvfp4_matmul.nvfp4_matmul`; sm_90 GPUs only.

    `x [M, K]`: fp16 block values with per-row global scales `x_scale [M]` (W4A4), or a bf16/fp16
    activation with `x_scale=None` (W4A16; other dtypes are rounded to bf16). `out_dtype`: bf16 or fp16.
    """
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"out_dtype must be bfloat16 or float16 for the Mosaic kernel, found {out_dtype}")
    m, k = x.shape
    dev = jax.devices()[0]
    p = plan(m, k, w, config, getattr(dev, "core_count", None) if dev.platform == "gpu" else None)
    if x.dtype not in (jnp.float16, jnp.bfloat16):
        x = x.astype(jnp.bfloat16)
    xp = jnp.pad(x, ((0, p["mp"] - m), (0, p["kp"] - k)))
    gx = jnp.ones((m,), jnp.float32) if x_scale is None else x_scale.astype(jnp.float32).reshape(m)
    gx = jnp.pad(gx, (0, p["mp"] - m))
    b = jnp.zeros((w.n,), jnp.float32) if bias is None else bias.astype(jnp.float32).reshape(w.n)
    b = jnp.pad(b, (0, p["np"] - w.n))
    vecs = jnp.stack([w.global_scale, b])
    y = _mosaic_call(xp, w.codes, w.scales, gx, vecs, out_dtype=out_dtype, config=config, p=p)
    return y[:m, : w.n]
