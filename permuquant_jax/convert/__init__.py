"""Checkpoint import: FLUX.1 files as people download them -> Flax NNX models."""

from permuquant_jax.convert.checkpoint import (
    default_checkpoint_path,
    load_flux,
    open_checkpoint,
    read_flux_config,
)
from permuquant_jax.convert.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "default_checkpoint_path", "load_flux", "open_checkpoint", "read_flux_config"]
