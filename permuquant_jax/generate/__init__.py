"""Text to image: tokenizers, the FLUX pipeline and ``python -m permuquant_jax.generate``."""
