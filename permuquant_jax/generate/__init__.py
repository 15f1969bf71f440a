"""Text to image: tokenizers, the FLUX pipeline and ``python -m permuquant_jax.generate``.

``FluxPipeline`` (load from a diffusers folder, BFL files or the embedded tiny pipeline; ``encode_prompts``,
``sample``, ``decode``, ``generate``), ``calibration_text`` (T5/CLIP embeddings for ``convert``'s
calibration), ``builtin_prompts`` (the built-in prompt set). Imported lazily: ``import permuquant_jax.generate``
stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FluxPipeline", "builtin_prompts", "calibration_text", "read_prompts", "save_calibration_npz"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from permuquant_jax.generate import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'permuquant_jax.generate' has no attribute {name!r}")
