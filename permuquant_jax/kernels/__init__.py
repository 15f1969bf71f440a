"""NVFP4 GPU kernels (Pallas, Triton backend), their pure-JAX references, and the dispatch.

`nvfp4_linear` is the one entry point; `prepack_weight` converts NVFP4 weights to the matmul kernel's
layout once, offline. See dispatch.py for how the backend is chosen.
"""

from permuquant_jax.kernels.dispatch import (
    BACKENDS,
    TRITON_DEPRECATION,
    nvfp4_linear,
    prepack_weight,
    resolve_backend,
)
from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig, PrepackedNVFP4, prepack, unprepack

__all__ = [
    "BACKENDS",
    "TRITON_DEPRECATION",
    "MatmulConfig",
    "PrepackedNVFP4",
    "nvfp4_linear",
    "prepack",
    "prepack_weight",
    "resolve_backend",
    "unprepack",
]
