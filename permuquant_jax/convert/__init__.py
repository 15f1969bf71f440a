"""Checkpoint import: FLUX.1 files as people download them (DiT, T5, CLIP, autoencoder) -> Flax NNX models."""

from permuquant_jax.convert.ae import load_autoencoder, read_autoencoder_config
from permuquant_jax.convert.checkpoint import (
    default_checkpoint_path,
    load_flux,
    open_checkpoint,
    read_flux_config,
)
from permuquant_jax.convert.encoders import load_clip, load_t5, read_clip_config, read_t5_config
from permuquant_jax.convert.safetensors_io import CheckpointError

__all__ = [
    "CheckpointError",
    "default_checkpoint_path",
    "load_autoencoder",
    "load_clip",
    "load_flux",
    "load_t5",
    "open_checkpoint",
    "read_autoencoder_config",
    "read_clip_config",
    "read_flux_config",
    "read_t5_config",
]
