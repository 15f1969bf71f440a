"""Number formats: NVFP4 (bit-exact with torchao), MXFP4, symmetric INTn per group, block Hadamard.

Pure jax.numpy, jittable and vmappable, no model knowledge. `get_format(name)` returns a named
setting (weight and activation fake-quantizers, bits per weight); `list_formats()` lists them.
"""

from permuquant_jax.formats import common, hadamard, intq, mxfp4, nvfp4, registry
from permuquant_jax.formats.registry import QuantFormat, get_format, list_formats

__all__ = [
    "QuantFormat",
    "common",
    "get_format",
    "hadamard",
    "intq",
    "list_formats",
    "mxfp4",
    "nvfp4",
    "registry",
]
