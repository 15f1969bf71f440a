"""permuquant-jax: PermuQuant channel-permuted NVFP4 quantization for FLUX.1 in JAX."""

__version__ = "0.1.0"
