"""permuquant-jax: PermuQuant channel-permuted NVFP4 quantization for FLUX.1 in JAX.

Entry points: `permuquant_jax.load(DST)` (a quantized model written by `python -m permuquant_jax.convert`),
`permuquant_jax.convert.load_flux(path)` (a float FLUX.1 checkpoint), `permuquant_jax.quant.quantize_model`
(any Flax NNX model), `permuquant_jax.formats` (NVFP4, MXFP4, INTn) and `permuquant_jax.kernels`.
"""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"


def load(directory: str | os.PathLike, *, backend: str = "auto") -> Any:
    """Load a quantized FluxDiT directory written by `python -m permuquant_jax.convert` (see `convert.saved.load`)."""
    from permuquant_jax.convert.saved import load as _load

    return _load(directory, backend=backend)
