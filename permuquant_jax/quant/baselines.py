"""Baselines that share PermuQuant's interface: RTN, SmoothQuant, block Hadamard, PermuQuant-H.

Each method is a rule for the candidate transforms of a site (see `api.quantize_model`):
- `rtn`: the identity only (round to nearest, no transform);
- `smoothquant`: per-channel scales s (x / s, W * s), folded into the producers where the site allows
  it (rows of a linear producer through a linear path, the modulation of a norm), else applied at run
  time by the quantized linear;
- `hadamard`: the identity order, with weights rotated offline and activations rotated at run time by
  a block Hadamard of size b (16, 32, 64 or 128);
- `permuquant`: identity and the joint orders per alpha, accepted by the calibration rule;
- `permuquant-h`: as `permuquant`, with the block Hadamard after the order (and dealt orders as extra
  candidates), the identity order then being plain block Hadamard;
- `auto`: per site and layer the best of the identity (RTN), smoothing and the orders, and per linear
  whether a block Hadamard of `hadamard_block` helps, each on the validated downstream error.
"""

from __future__ import annotations

import numpy as np

METHODS: tuple[str, ...] = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h", "auto")
HADAMARD_BLOCKS: tuple[int, ...] = (16, 32, 64, 128)


def check_method(method: str, hadamard_block: int | None) -> str:
    """Normalize and validate a method name and its Hadamard block; ValueError naming the bad value."""
    m = method.strip().lower().replace("_", "-")
    if m not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if (uses_hadamard(m) or (m == "auto" and hadamard_block is not None)) and hadamard_block not in HADAMARD_BLOCKS:
        raise ValueError(
            f"method {m!r} needs a Hadamard block in {HADAMARD_BLOCKS}, found {hadamard_block!r}"
        )
    return m


def uses_hadamard(method: str) -> bool:
    """Whether the method rotates activations and weights by a block Hadamard."""
    return method in ("hadamard", "permuquant-h")


def uses_permutation(method: str) -> bool:
    """Whether the method chooses channel orders."""
    return method in ("permuquant", "permuquant-h")


def smoothquant_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Per-channel smoothing factors s_j = (max|X_j| / max|W_j|)^alpha, clipped to [1e-4, 1e4].

    alpha is the migration strength: 0 leaves everything as is (s = 1, i.e. RTN), 0.5 is SmoothQuant's
    default s_j = sqrt(max|X_j|) / sqrt(max|W_j|), 1 moves all of an activation channel's range into
    the weights. (SmoothQuant writes s_j = max|X_j|^a / max|W_j|^(1-a); the two agree at a = 0.5.)
    Channels with a zero maximum on either side keep s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must lie in [0, 1], found {alpha}")
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0)
    ratio = np.where(ok, a / np.where(ok, w, 1.0), 1.0)
    return np.clip(ratio**alpha, 1e-4, 1e4).astype(np.float32)
