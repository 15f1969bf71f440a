"""Normalized Sylvester Hadamard matrices and the block Hadamard rotation of a last axis.

H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2): symmetric and orthogonal (H @ H = I), so the
same function rotates and un-rotates. `block_hadamard(x, b)` multiplies each consecutive block of
b channels of the last axis by H_b, which is what rotating activations and weights of a linear
layer by the block-diagonal diag(H_b, ..., H_b) does: (x R) (W R)^T = x W^T.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from permuquant_jax.formats.common import check_group, widen_exact


def _check_power_of_two(n: int, what: str) -> None:
    if not isinstance(n, int | np.integer) or n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two (1, 2, 4, ..., 16, ..., 128), found {n!r}")


@functools.lru_cache(maxsize=16)
def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def hadamard_matrix(n: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The normalized `n x n` Sylvester Hadamard matrix (symmetric, orthogonal), `n` a power of two."""
    _check_power_of_two(n, "Hadamard size")
    return jnp.asarray(_sylvester(int(n)), dtype=dtype)


def block_hadamard(x: jax.Array, block: int) -> jax.Array:
    """Apply H_block to each consecutive block of `block` elements of the last axis of `x`.

    Computed in float32 at full matmul precision (no TF32 on GPUs); returns `x.dtype`. The last
    axis must be a multiple of `block`; `block` a power of two (16..128 in this project).
    """
    _check_power_of_two(block, "Hadamard block size")
    check_group(x, block, "block_hadamard")
    h = hadamard_matrix(block, jnp.float32)
    xb = widen_exact(x).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    y = jnp.matmul(xb, h, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape).astype(x.dtype)
