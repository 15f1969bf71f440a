"""Flax NNX models with reference semantics (FLUX.1 DiT)."""

from permuquant_jax.models.flux import (
    DoubleStreamBlock,
    FluxConfig,
    FluxDiT,
    LastLayer,
    SingleStreamBlock,
    abstract_flux,
    param_count,
    scan_blocks,
)
from permuquant_jax.models.layers import GatherIndex, Linear, ModulatedLayerNorm

__all__ = [
    "DoubleStreamBlock",
    "FluxConfig",
    "FluxDiT",
    "GatherIndex",
    "LastLayer",
    "Linear",
    "ModulatedLayerNorm",
    "SingleStreamBlock",
    "abstract_flux",
    "param_count",
    "scan_blocks",
]
