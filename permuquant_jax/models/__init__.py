"""Flax NNX models with reference semantics: the FLUX.1 DiT, its T5 and CLIP text encoders, its autoencoder,
and the FLUX sampler (`models.sampling`)."""

from permuquant_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig
from permuquant_jax.models.clip import CLIPTextConfig, CLIPTextModel
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
from permuquant_jax.models.t5 import T5Config, T5Encoder

__all__ = [
    "AutoEncoder",
    "AutoEncoderConfig",
    "CLIPTextConfig",
    "CLIPTextModel",
    "DoubleStreamBlock",
    "FluxConfig",
    "FluxDiT",
    "GatherIndex",
    "LastLayer",
    "Linear",
    "ModulatedLayerNorm",
    "SingleStreamBlock",
    "T5Config",
    "T5Encoder",
    "abstract_flux",
    "param_count",
    "scan_blocks",
]
