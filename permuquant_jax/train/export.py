"""Writing trained models as the files people download: a BFL-layout DiT and BFL's ``ae.safetensors`` layout.

The inverse of the loaders' key maps (``convert.keymap.bfl_keymap``, ``convert.ae.ae_keymap``): linear
kernels ``[in, out]`` are stored PyTorch-style ``[out, in]``, convolutions HWIO as OIHW, the
autoencoder's attention linears as 1x1 convolutions; stacked blocks are split per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from permuquant_jax.convert.ae import ae_keymap
from permuquant_jax.convert.checkpoint import CONFIG_METADATA_KEY
from permuquant_jax.convert.keymap import bfl_keymap
from permuquant_jax.models.autoencoder import AutoEncoder
from permuquant_jax.models.flux import FluxDiT

STORE_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def _value(model: nnx.Module, path: tuple) -> np.ndarray:
    obj = model
    for name in path:
        obj = obj[name] if isinstance(name, int) else getattr(obj, name)
    return np.asarray(obj.get_value(), np.float32)


def _store_dtype(store: str):
    if store not in STORE_DTYPES:
        raise ValueError(f"storage dtype must be one of {list(STORE_DTYPES)}, got {store!r}")
    return STORE_DTYPES[store]


def dit_tensors(model: FluxDiT, store: str = "bf16") -> dict[str, np.ndarray]:
    """The DiT's parameters under BFL's keys (``double_blocks.0.img_attn.qkv.weight``, ...), in ``store``."""
    dtype = _store_dtype(store)
    out: dict[str, np.ndarray] = {}
    cache: dict[tuple, np.ndarray] = {}
    for key, entry in sorted(bfl_keymap(model.config).items()):
        (piece,) = entry.pieces  # BFL's layout: one whole target per stored tensor
        if piece.target not in cache:
            cache[piece.target] = _value(model, piece.target)
        arr = cache[piece.target]
        arr = arr[piece.layer] if piece.layer is not None else arr
        arr = arr.T if entry.is_matrix else arr
        if tuple(arr.shape) != tuple(entry.shape):
            raise AssertionError(f"dit_tensors: {key} has shape {arr.shape}, the key map expects {entry.shape}")
        out[key] = np.ascontiguousarray(arr).astype(dtype)
    return out


def save_dit(model: FluxDiT, path: str | Path, *, store: str = "bf16", extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a BFL single-file checkpoint; the config (with RoPE axes, which shapes cannot
    say) and ``extra`` go into the one metadata entry ``permuquant.flux_config`` (JSON)."""
    meta = {CONFIG_METADATA_KEY: json.dumps({**model.config.to_dict(), **(extra or {})}, sort_keys=True)}
    save_file(dit_tensors(model, store), str(path), metadata=meta)
    return Path(path)


def ae_tensors(model: AutoEncoder, store: str = "bf16") -> dict[str, np.ndarray]:
    """The autoencoder's parameters under BFL's ``ae.safetensors`` keys and shapes, in ``store``."""
    dtype = _store_dtype(store)
    out: dict[str, np.ndarray] = {}
    for key, entry in sorted(ae_keymap(model.config, "bfl", model).items()):
        arr = _value(model, entry.target)
        if entry.kind == "conv":
            arr = arr.transpose(3, 2, 0, 1)
        elif entry.kind == "conv1x1":
            arr = arr.T[:, :, None, None]
        if tuple(arr.shape) != tuple(entry.shape):
            raise AssertionError(f"ae_tensors: {key} has shape {arr.shape}, the key map expects {entry.shape}")
        out[key] = np.ascontiguousarray(arr).astype(dtype)
    return out


def save_autoencoder(model: AutoEncoder, path: str | Path, *, store: str = "bf16") -> Path:
    """Write ``model`` in BFL's ``ae.safetensors`` layout (no metadata: the loaders infer the config
    from the shapes and assume FLUX's latent scale 0.3611 / shift 0.1159)."""
    cfg = model.config
    if (cfg.scale_factor, cfg.shift_factor) != (0.3611, 0.1159):
        raise ValueError(f"save_autoencoder: BFL's layout has no place for scale {cfg.scale_factor} / shift "
                         f"{cfg.shift_factor}; train with FLUX's 0.3611 / 0.1159")
    save_file(ae_tensors(model, store), str(path))
    return Path(path)
