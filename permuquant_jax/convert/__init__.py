"""Checkpoint import: FLUX.1 files as people download them (DiT, T5, CLIP, autoencoder) -> Flax NNX models.

The names below are imported on first use (PEP 562), so `python -m permuquant_jax.convert` installs its
signal handlers before JAX is imported (a Ctrl-C in the first second ends as cleanly as a later one).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "permuquant_jax.convert.safetensors_io",
    "default_checkpoint_path": "permuquant_jax.convert.checkpoint",
    "load_autoencoder": "permuquant_jax.convert.ae",
    "load_clip": "permuquant_jax.convert.encoders",
    "load_flux": "permuquant_jax.convert.checkpoint",
    "load_t5": "permuquant_jax.convert.encoders",
    "open_checkpoint": "permuquant_jax.convert.checkpoint",
    "read_autoencoder_config": "permuquant_jax.convert.ae",
    "read_clip_config": "permuquant_jax.convert.encoders",
    "read_flux_config": "permuquant_jax.convert.checkpoint",
    "read_t5_config": "permuquant_jax.convert.encoders",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'permuquant_jax.convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
