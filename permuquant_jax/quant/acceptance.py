"""The layer-local acceptance pass: observers that measure, for every candidate transform of every site
part, the squared error of the quantized consumer output against float on calibration data (one jitted
step per batch, accumulators only: constant memory)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.quant.calibrate import _zeros
from permuquant_jax.quant.permute import part_errors


class EvalStat(nnx.Variable):
    """An accumulator of the acceptance pass (per-candidate squared errors, reference energy, amax)."""


class EvalInput(nnx.Variable):
    """Read-only inputs of the acceptance pass (candidate orders and scales, with stack axes)."""


class EvalPart(nnx.Module):
    """Candidates for the input columns `[start, start+size)` of one consumer."""

    def __init__(self, start: int, size: int, perms: np.ndarray, scales: np.ndarray | None):
        self.start = int(start)
        self.size = int(size)
        stack, c = perms.shape[:-2], perms.shape[-2]
        self.perms = EvalInput(jnp.asarray(perms, jnp.int32))
        self.scales = EvalInput(None if scales is None else jnp.asarray(scales, jnp.float32))
        self.err = EvalStat(_zeros((*stack, c), np.float32))
        self.ref = EvalStat(_zeros(stack, np.float32))
        self.amax = EvalStat(_zeros((*stack, c), np.float32))


class EvalObserver(nnx.Module):
    """Stands in for a linear: returns `inner(x)` (float) and, for every candidate of every part,
    accumulates the squared error of the quantized part output against float on this x."""

    def __init__(self, inner: nnx.Module, parts: Sequence[EvalPart], format: str, hadamard_block: int | None):
        self.inner = inner
        self.parts = nnx.List(list(parts))
        self.format = format
        self.hadamard_block = hadamard_block

    def __call__(self, x: jax.Array) -> jax.Array:
        from permuquant_jax.formats.registry import get_format

        fmt = get_format(self.format)
        xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        w = self.inner.kernel[...]
        for part in self.parts:
            s, n = part.start, part.size
            err, ref, amax = part_errors(
                xf[:, s : s + n], w[s : s + n], part.perms[...], part.scales.get_value(),
                fmt.act_fake_quant, fmt.weight_fake_quant, self.hadamard_block,
            )
            part.err[...] = part.err[...] + err
            part.ref[...] = part.ref[...] + ref
            part.amax[...] = jnp.maximum(part.amax[...], amax)
        return self.inner(x)
