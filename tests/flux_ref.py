"""Shared helpers for the FLUX tests: diffusers reference runs and test inputs (no tests here)."""

from __future__ import annotations

import numpy as np


def grid_ids(batch: int, h: int, w: int, offset: int = 0) -> np.ndarray:
    """Image position ids as FLUX builds them: (0, row, col) for an h x w grid of 2x2 patches."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None] + offset
    ids[..., 2] = np.arange(w)[None, :] + offset
    return np.broadcast_to(ids.reshape(1, h * w, 3), (batch, h * w, 3)).copy()


def make_inputs(
    rng: np.random.Generator,
    *,
    batch: int,
    h: int,
    w: int,
    n_txt: int,
    in_channels: int,
    context_dim: int,
    vec_dim: int,
    guidance: bool,
) -> dict[str, np.ndarray | None]:
    """Random FluxDiT inputs (BFL names): packed latents on an h x w grid, text, pooled vector."""
    txt_ids = np.zeros((batch, n_txt, 3), np.float32)
    # FLUX uses zero text ids; random small ints here also exercise the first RoPE axis.
    txt_ids[..., 0] = rng.integers(0, 4, size=(1, n_txt))
    return dict(
        img=rng.standard_normal((batch, h * w, in_channels)).astype(np.float32),
        img_ids=grid_ids(batch, h, w),
        txt=rng.standard_normal((batch, n_txt, context_dim)).astype(np.float32),
        txt_ids=txt_ids,
        timesteps=rng.uniform(0.05, 1.0, size=(batch,)).astype(np.float32),
        y=rng.standard_normal((batch, vec_dim)).astype(np.float32),
        guidance=rng.uniform(1.0, 5.0, size=(batch,)).astype(np.float32) if guidance else None,
    )


def randomize_torch_module(module, rng: np.random.Generator) -> None:
    """Overwrite every parameter with random values: weights ~ N(0, 1/fan_in), biases and norm scales
    away from their init, so that a wrong mapping of any tensor shows in the output."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2:
                vals = rng.standard_normal(p.shape) / np.sqrt(p.shape[1])
            elif name.endswith("bias"):
                vals = 0.1 * rng.standard_normal(p.shape)
            else:
                vals = 1.0 + 0.2 * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(vals.astype(np.float32)))


def diffusers_forward(model, inputs: dict) -> np.ndarray:
    """Run a diffusers FluxTransformer2DModel on BFL-named inputs (fp32, no grad) -> numpy."""
    import torch

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        out = model(
            hidden_states=t(inputs["img"]),
            encoder_hidden_states=t(inputs["txt"]),
            pooled_projections=t(inputs["y"]),
            timestep=t(inputs["timesteps"]),
            img_ids=t(inputs["img_ids"][0]),
            txt_ids=t(inputs["txt_ids"][0]),
            guidance=None if inputs["guidance"] is None else t(inputs["guidance"]),
            return_dict=False,
        )[0]
    return out.numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Frobenius, float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bfl_to_model(key: str) -> tuple[str, int | None, bool]:
    """Where a BFL checkpoint key lives in FluxDiT, by BFL's naming rule (independent of the loader):
    (dotted model path, layer index on the stacked axis or None, True if a transposed weight)."""
    import re

    key = key.replace("_mlp.0.", "_mlp.fc1.").replace("_mlp.2.", "_mlp.fc2.")
    key = key.replace("adaLN_modulation.1.", "adaLN_modulation.")
    is_weight = key.endswith(".weight")
    if is_weight:
        key = key[: -len("weight")] + "kernel"
    m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.*)", key)
    if m:
        return f"{m.group(1)}.{m.group(3)}", int(m.group(2)), is_weight
    return key, None, is_weight


def torch_timestep_frequencies(dim: int = 256, max_period: float = 10_000.0) -> np.ndarray:
    """The frequency table exactly as BFL and diffusers compute it (PyTorch float32 exp on the CPU)."""
    import math

    import torch

    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).numpy()
