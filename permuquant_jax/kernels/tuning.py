"""Tuning data of the kernels: per device class, which GEMM backend serves which M class, and the
Triton tile configs. `benchmarks/gemm_variants.py` (versions side by side, sweeps) and
`benchmarks/gemm.py --sweep` measure them on the GPU; the numbers are in benchmarks/NOTES-kernels.md.

GEMM backends (what `dispatch.nvfp4_linear` runs after the activation quantization):
- "triton": the in-register Pallas-Triton matmul (`nvfp4_matmul`, config from `MATMUL_TABLE`);
- "decode_cublas": the Pallas decode kernel to exact 16-bit weights, then cuBLAS (`dispatch.dequant_dot`);
- "xla_decode_cublas": the same with XLA's bit-placement decode (no Pallas kernel in the GEMM path);
- "mosaic": the Pallas Mosaic GPU kernel for sm_90 (`nvfp4_matmul_mgpu`, config from `mosaic_config`);
- "xla_gemv": a few rows as one fused XLA decode + row reduction (`gemv.nvfp4_gemv`; M <= 4).
Unknown devices (no table row) fall back to `FALLBACK_CLASS`, whose choices are safe everywhere the
Triton backend runs (compute capability 8.0-9.x).
"""

from __future__ import annotations

from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig

GEMM_BACKENDS = ("triton", "decode_cublas", "xla_decode_cublas", "mosaic", "xla_gemv")

# M classes: (name, largest M in the class); the first that holds M wins.
M_CLASSES: tuple[tuple[str, int], ...] = (("gemv", 16), ("small", 64), ("medium", 1023), ("large", 1 << 62))

# device class -> M class -> GEMM backend. H200: benchmarks/results/gemm_variants_h200.md (2026-12-01,
# two runs): M = 1: triton 49-58 us vs decode+cuBLAS 105-126 us; M = 128: triton 86 vs decode+cuBLAS
# 69-71 us; M = 256-512: triton 94-178 vs 86-138 us; M >= 4096: triton 1.46-2.2x cuBLAS bf16 vs
# decode+cuBLAS 0.90-1.20x, the persistent Mosaic kernel 1.01-1.05x (W4A4) while decode+cuBLAS took
# 1.21x in the same run (results/gemm_mosaic_h200.md run 4): "large" is "mosaic" (where N >= MOSAIC_MIN_N). "small":
# `gemm.py --sweep` at M = 64 (results/gemm_h200.md): triton 185 us vs decode+cuBLAS 165 us (W4A4 +
# W4A16 summed); that sweep printed this whole row. H100: the 2026-11-24 table (decode+cuBLAS from
# M = 1024 on; the Pallas decode was not measured there, so it keeps XLA's decode).
DISPATCH_TABLE: dict[str, dict[str, str]] = {
    "h200": {"gemv": "triton", "small": "decode_cublas", "medium": "decode_cublas", "large": "mosaic"},
    "h100": {"gemv": "triton", "small": "triton", "medium": "triton", "large": "xla_decode_cublas"},
    "sm80": {"gemv": "triton", "small": "triton", "medium": "triton", "large": "xla_decode_cublas"},
}
FALLBACK_CLASS = "sm80"


def device_class(device_kind: str, compute_capability: float | None) -> str | None:
    """The tuning-table class of a device, or None where the Triton kernels do not run (CPU, cc < 8)."""
    kind = device_kind.lower()
    if compute_capability is None or not 8.0 <= compute_capability < 10.0:
        return None
    for name, keys in (("h200", ("h200",)), ("h100", ("h100", "h800"))):
        if any(key in kind for key in keys):
            return name
    return FALLBACK_CLASS


def m_class(m: int) -> str:
    """The M class (`M_CLASSES`) of a GEMM with `m` rows."""
    for name, max_m in M_CLASSES:
        if m <= max_m:
            return name
    return M_CLASSES[-1][0]


# The Mosaic kernel only where the output is wide: H200, 2026-12-01 (results/gemm_mosaic_h200.md runs 6-7),
# persistent serial W4A4 vs decode+cuBLAS: N = 9216 547 vs 556 us, N = 21504 987 vs 1211 us, but N = 3072
# (fc2, K = 12288) 509 vs 521 us and (linear2, K = 15360) 866 vs 711 us. Narrower outputs take the
# decode+cuBLAS path.
# Re-checked 2026-12-01 evening (results/gemm_mosaic_h200.md run 8, one run): serial persistent W4A4 img qkv 475 /
# linear1 1002 / linear2 864 / fc2 536 us vs decode+cuBLAS 531 / 1202 / 741 / 560 (cuBLAS bf16 425 / 963 / 624 /
# 474); fc2 is admitted by MOSAIC_SHAPES below. The FLUX step with this dispatch: W4A4 1.01x bf16
# (results/flux_step_h200.md run 6). The "gemv" class keeps Triton: the fused XLA GEMV (`xla_gemv`) measured
# 76 vs 77 us at 1 x 3072 x 18432 and 198 vs 74 us at M = 4 (run 9).
MOSAIC_MIN_N = 8192


# the M the large-M rules are judged at when M is not known yet (preparing a weight's layout)
LARGE_M = 4096


def gemm_backend(dev_class: str | None, m: int, n: int | None = None, k: int | None = None) -> str:
    """The GEMM backend for `m` rows (and `n` outputs / `k` inputs, when known) on a device class
    (unknown classes: `FALLBACK_CLASS`). "mosaic" rows give way to "decode_cublas" below `MOSAIC_MIN_N`
    outputs."""
    table = DISPATCH_TABLE.get(dev_class or FALLBACK_CLASS, DISPATCH_TABLE[FALLBACK_CLASS])
    backend = table[m_class(m)]
    if backend == "mosaic" and n is not None and n < MOSAIC_MIN_N and (n, k) not in MOSAIC_SHAPES:
        return "decode_cublas"
    return backend


# (max M, config), first match wins (the "triton" backend's tiles), measured with
# benchmarks/gemm_variants.py on the H200 (aligned "mul" K offsets).
MATMUL_TABLE: tuple[tuple[int, MatmulConfig], ...] = (
    # M = 1 GEMV: 49-60 us at 1 x 3072 x 18432 (the CUDA-core "gemv" kind: 56-62 us)
    (16, MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=4, split_k=4, decode="asm")),
    (64, MatmulConfig(block_n=128, block_m=64, num_warps=4, num_stages=4, split_k=2, decode="asm")),
    # M = 512: 159-178 us at 512 x 3072 x 9216
    (1023, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3, split_k=1, decode="asm")),
    # M >= 1024 is served by decode+cuBLAS; the kernel, if asked: 645-660 us at 4096 x 3072 x 9216
    (1 << 62, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3, split_k=1, decode="asm")),
)

# Activation quantization, impl "v2" (H200): at K <= 4096, 32 x 128 tiles, 4 warps: 40.6 us at 4608 x 3072
# (32 x 256, 8 warps: 48-52 us); above, 32 x 256, 8 warps: 113-114 us at 4608 x 15360 (70 % of the copy).
ACT_QUANT_CONFIG: dict[str, int] = {"block_m": 32, "block_k": 256, "num_warps": 8, "num_stages": 1}
ACT_QUANT_CONFIG_NARROW: dict[str, int] = {"block_m": 32, "block_k": 128, "num_warps": 4, "num_stages": 1}
ACT_QUANT_NARROW_MAX_K = 4096

# Weight decode kernel (kernels/decode.py): 93-135 us at 21504 x 3072 over two H200 runs (the same
# config moved by 45 %: the tile sweep is within noise; 16 x 1024 x 4 warps measured 96-128 us).
DECODE_CONFIG: dict[str, int | str] = {"block_n": 32, "block_k": 1024, "num_warps": 8, "num_stages": 1, "decode": "asm"}


def matmul_config(m: int, n: int, k: int) -> MatmulConfig:
    """The tuned matmul config for an `[m, k] x [n, k]^T` product."""
    del n, k
    for max_m, cfg in MATMUL_TABLE:
        if m <= max_m:
            return cfg
    return MATMUL_TABLE[-1][1]


def act_quant_config(m: int, k: int, hadamard_block: int | None = None) -> dict[str, int]:
    """The tuned activation-quantization config; the tile width holds whole Hadamard blocks."""
    cfg = dict(ACT_QUANT_CONFIG_NARROW if k <= ACT_QUANT_NARROW_MAX_K else ACT_QUANT_CONFIG)
    if hadamard_block and cfg["block_k"] < hadamard_block:
        cfg["block_k"] = hadamard_block
    return cfg


# Mosaic GPU kernel (kernels/nvfp4_matmul_mgpu.py): the int4 nibble order XLA hands it (found by
# tests/gpu/check_mosaic.py's probe on the H200) and the tiles per M. H200, 2026-12-01 (results/
# gemm_mosaic_h200.md, run 4): the persistent serial kernel was correct at every checked shape and took
# 445 us at 4096 x 3072 x 9216 W4A4 (cuBLAS bf16 425, decode+cuBLAS 514) and 1005 us at 4608 x 3072 x
# 21504 (999 / 1211); W4A16 493 / 1094 us (decode+cuBLAS 538 / 1268): the "large" class takes it (wide N). The
# "pipelined" pipeline (correct since run 5) took 515 us at 4096 x 3072 x 9216 in run 5 (cuBLAS 429; the
# serial kernel was not timed in that run): not chosen. The FLUX step with this config: W4A4 148.3 ms vs
# 150.2 ms with decode+cuBLAS at large M (results/flux_step_h200.md run 5).
MOSAIC_NIBBLE_ORDER = "low_first"
MOSAIC_SMALL_M = 1024  # up to here 128-token tiles (more CTAs), above 256
# the config of the "large" class (benchmarks/flux_step.py --mosaic-config replaces it for one run)
MOSAIC_LARGE: dict[str, object] = {"block_m": 256, "block_k": 64, "stages": 4, "pipeline": "serial",
                                   "persistent": True}


# (N, K) -> MosaicConfig fields that replace MOSAIC_LARGE's for that weight shape at large M; an entry also
# admits a narrow shape (N < MOSAIC_MIN_N) to the Mosaic kernel. H200, 2026-12-01 evening run 1
# (results/gemm_mosaic_h200.md), W4A4 us: img fc2 (N 3072, K 12288) serial 256-token 536 vs decode+cuBLAS
# 560 (run 7: 509 vs 521): admitted; single linear2 (N 3072, K 15360) 864 vs 741 (run 7: 866 vs 711): not;
# 128- and 192-token tiles were slower at both (753 / 714 and 1068 / 938 us), the pipelined loop too.
MOSAIC_SHAPES: dict[tuple[int, int], dict[str, object]] = {(3072, 12288): {}}


def mosaic_config(m: int, n: int | None = None, k: int | None = None):
    """The Mosaic kernel's config for a GEMM with `m` rows (`n` outputs, `k` inputs)."""
    from permuquant_jax.kernels.nvfp4_matmul_mgpu import MosaicConfig

    if m <= MOSAIC_SMALL_M:
        return MosaicConfig(block_m=128, block_k=64, stages=4, persistent=True)
    return MosaicConfig(**{**MOSAIC_LARGE, **MOSAIC_SHAPES.get((n, k), {})})


def decode_config(n: int, k: int) -> dict[str, int | str]:
    """The tuned decode-kernel config for weights `[n, k]`."""
    del n, k
    return dict(DECODE_CONFIG)
