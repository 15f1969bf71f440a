"""Write the embedded tiny FLUX checkpoint (BFL key layout, bf16) deterministically.

    python -m permuquant_jax.assets.make_tiny [OUT]   (default: flux_tiny.safetensors beside this file)

The weights are random (seeded): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), RMS norm scales
~ 1 + N(0, 0.1^2). The same seed always gives the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from permuquant_jax.convert.checkpoint import CONFIG_METADATA_KEY
from permuquant_jax.convert.keymap import bfl_keymap
from permuquant_jax.models.flux import FluxConfig

SEED = 20250801


def tiny_tensors(seed: int = SEED, config: FluxConfig | None = None) -> dict[str, np.ndarray]:
    """The tiny checkpoint's tensors (BFL names, bf16), in key order."""
    config = config or FluxConfig.tiny()
    rng = np.random.default_rng(seed)
    out = {}
    for key, entry in sorted(bfl_keymap(config).items()):
        if entry.is_matrix:
            vals = rng.standard_normal(entry.shape) / np.sqrt(entry.shape[1])
        elif key.endswith(".bias"):
            vals = 0.02 * rng.standard_normal(entry.shape)
        else:
            vals = 1.0 + 0.1 * rng.standard_normal(entry.shape)
        out[key] = vals.astype(np.float32).astype(ml_dtypes.bfloat16)
    return out


def write_tiny(path: str | Path, seed: int = SEED) -> Path:
    """Write the tiny checkpoint to ``path`` and return it."""
    config = FluxConfig.tiny()
    # One metadata entry only: safetensors writes the metadata map in arbitrary order.
    metadata = {CONFIG_METADATA_KEY: json.dumps({**config.to_dict(), "seed": seed}, sort_keys=True)}
    save_file(tiny_tensors(seed, config), str(path), metadata=metadata)
    return Path(path)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("flux_tiny.safetensors")
    p = write_tiny(target)
    print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
