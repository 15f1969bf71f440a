"""Tuning tables of the kernels: configs are data, chosen by shape; `benchmarks/gemm.py --sweep`
measures the candidates on the GPU and prints the rows to paste here.

Measured on one H100 80GB HBM3 (JAX 0.11.2); see benchmarks/NOTES-kernels.md.
"""

from __future__ import annotations

from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig

# (max M, config), first match wins; measured with benchmarks/gemm.py --sweep (NOTES-kernels.md).
# Small M is bound by memory: many CTAs over N and split K keep weight bytes in flight; large M is
# bound by the tensor cores (and, today, by our decode path: see the notes).
MATMUL_TABLE: tuple[tuple[int, MatmulConfig], ...] = (
    # M = 1 GEMV: 53-64 us at 1 x 3072 x 18432 (the CUDA-core "gemv" kernel measured 75 us)
    (16, MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=4, split_k=4, decode="asm")),
    (64, MatmulConfig(block_n=128, block_m=64, num_warps=4, num_stages=4, split_k=2, decode="asm")),
    # M = 512: 177-202 us at 512 x 3072 x 9216
    (1023, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3, split_k=1, decode="asm")),
    # M >= 1024 goes to dispatch.dequant_dot; the kernel, if asked, 706-800 us at 4096 x 3072 x 9216
    (1 << 62, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3, split_k=1)),
)

# From this M on, the dispatch decodes W with XLA and calls cuBLAS (`dispatch.dequant_dot`): measured
# 1.25-1.38x cuBLAS bf16 against 1.9-2.1x for our in-register kernel at M >= 4096 (NOTES-kernels.md).
DEQUANT_DOT_MIN_M = 1024

# Activation quantization (60 us at 4608 x 3072, bf16 in, fp16 values out).
ACT_QUANT_CONFIG: dict[str, int] = {"block_m": 8, "block_k": 512, "num_warps": 4, "num_stages": 1}


def matmul_config(m: int, n: int, k: int) -> MatmulConfig:
    """The tuned matmul config for an `[m, k] x [n, k]^T` product."""
    del n, k
    for max_m, cfg in MATMUL_TABLE:
        if m <= max_m:
            return cfg
    return MATMUL_TABLE[-1][1]


def act_quant_config(m: int, k: int, hadamard_block: int | None = None) -> dict[str, int]:
    """The tuned activation-quantization config; the tile width holds whole Hadamard blocks."""
    cfg = dict(ACT_QUANT_CONFIG)
    if hadamard_block and cfg["block_k"] < hadamard_block:
        cfg["block_k"] = hadamard_block
    return cfg
