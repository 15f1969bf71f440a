"""Folding: apply a site's permutation or per-channel scaling to the model's weights (and gather
indices) so that the float function of the model is unchanged. Arrows: paths <- sites <- fold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.quant.arrays import one_hot_rows, permute_axis, scale_axis
from permuquant_jax.quant.linear import QuantLinear, on_device
from permuquant_jax.quant.paths import get_node, path_str, set_node
from permuquant_jax.quant.sites import Ref, Site


class GatheredNorm(nnx.Module):
    """A norm module whose output is gathered: `inner(x)[..., index]` (None: not gathered), for `adaln`
    sites. The index carries the stack axes of the norm's parameters, if any."""

    def __init__(self, inner: nnx.Module, size: int):
        from permuquant_jax.models.layers import GatherIndex

        self.inner = inner
        self.size = int(size)
        self.index = GatherIndex(None)

    def compose(self, perm: np.ndarray) -> None:
        """Reorder the output by `perm [*stack, size]` after the current index."""
        old = self.index.get_value()
        p = jnp.asarray(np.asarray(perm, np.int32))
        self.index.set_value(p if old is None else jnp.take_along_axis(jnp.asarray(old), p, -1))

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        g = self.index.get_value()
        return y if g is None else jnp.take(y, g, axis=-1)


def _update(var: nnx.Variable, fn) -> None:
    value = var.get_value()
    moved = on_device(value)
    # a streamed model's block weight is computed on the device and kept where it was (host memory)
    var.set_value(fn(value) if moved is value else jax.device_put(fn(moved), value.sharding))


def permute_consumer(model: nnx.Module, ref: Ref, size: int, perm: np.ndarray) -> None:
    """Reorder the kernel rows `[start, start+size)` of a consumer linear (or float QuantLinear)."""
    lin = get_node(model, ref.path)
    _update(lin.kernel, lambda k: permute_axis(k, perm, -2, ref.start, size))


def fold_permutation(model: nnx.Module, site: Site, perm: np.ndarray) -> None:
    """Apply permutation `perm [*stack, size]` at `site`; the float function of the model is unchanged.

    Consumers' kernel rows are reordered; the producers absorb the permutation (rows/heads: output rows
    and bias; norm: the gather index and the modulation shift/scale rows); for gather sites each
    consumer becomes a float `QuantLinear` whose input gather reads `x[..., perm]`.
    """
    perm = np.asarray(perm, np.int32)
    for r in site.consumers:
        if site.kind == "gather":
            lin = get_node(model, r.path)
            if not isinstance(lin, QuantLinear):
                lin = QuantLinear.from_linear(lin, format=None)
                set_node(model, r.path, lin)
            lin.compose_gather(perm, r.start, site.size)
        permute_consumer(model, r, site.size, perm)
    for r in site.producers:
        lin = get_node(model, r.path)
        _update(lin.kernel, lambda k, r=r: permute_axis(k, perm, -1, r.start, site.size))
        if getattr(lin, "bias", None) is not None:
            _update(lin.bias, lambda b, r=r: permute_axis(b, perm, -1, r.start, site.size))
    if site.adaln is not None:
        a = site.adaln
        for lin_path, st in ((a.shift, a.shift_start), (a.scale, a.scale_start)):
            lin = get_node(model, lin_path)
            _update(lin.kernel, lambda k, st=st: permute_axis(k, perm, -1, st, site.size))
            if getattr(lin, "bias", None) is not None:
                _update(lin.bias, lambda b, st=st: permute_axis(b, perm, -1, st, site.size))
        norm = get_node(model, a.norm)
        if not isinstance(norm, GatheredNorm):
            norm = GatheredNorm(norm, site.size)
            set_node(model, a.norm, norm)
        norm.compose(perm)
    if site.norm is not None:
        n = site.norm
        mod = get_node(model, n.modulation)
        for st in (n.shift_start, n.scale_start):
            _update(mod.kernel, lambda k, st=st: permute_axis(k, perm, -1, st, site.size))
            if getattr(mod, "bias", None) is not None:
                _update(mod.bias, lambda b, st=st: permute_axis(b, perm, -1, st, site.size))
        var = get_node(model, n.gather)
        old = var.get_value()
        p = jnp.asarray(perm)
        new = p if old is None else jnp.take_along_axis(jnp.asarray(old), p, -1)
        var.set_value(new.astype(jnp.int32))


def fold_smoothing(model: nnx.Module, site: Site, scale: np.ndarray) -> bool:
    """Fold SmoothQuant scales `s [*stack, size]` (x / s, W * s) into the site, if its producers allow it.

    Returns True when folded (consumer rows scaled, producers divided: rows/heads output rows and bias;
    norm: the modulation's shift rows divided by s and its scale rows mapped so (1 + scale) / s). Returns
    False (nothing changed) when the site is not `scalable`: the caller then scales at run time.
    """
    if not site.scalable or site.kind == "gather":
        return False
    s = np.asarray(scale, np.float32)
    for r in site.consumers:
        lin = get_node(model, r.path)
        _update(lin.kernel, lambda k, r=r: scale_axis(k, s, -2, r.start, site.size, "mul"))
    for r in site.producers:
        lin = get_node(model, r.path)
        _update(lin.kernel, lambda k, r=r: scale_axis(k, s, -1, r.start, site.size, "div"))
        if getattr(lin, "bias", None) is not None:
            _update(lin.bias, lambda b, r=r: scale_axis(b, s, -1, r.start, site.size, "div"))
    if site.adaln is not None:
        a = site.adaln
        sh, sc = get_node(model, a.shift), get_node(model, a.scale)
        if getattr(sc, "bias", None) is None:
            raise ValueError(f"site {site.name!r}: folding a scale into {path_str(a.scale)} needs its bias")
        for lin, st in ((sh, a.shift_start), (sc, a.scale_start)):
            _update(lin.kernel, lambda k, st=st: scale_axis(k, s, -1, st, site.size, "div"))
        if getattr(sh, "bias", None) is not None:
            _update(sh.bias, lambda b: scale_axis(b, s, -1, a.shift_start, site.size, "div"))
        _update(sc.bias, lambda b: scale_axis(b + one_hot_rows(b, a.scale_start, site.size),
                                              s, -1, a.scale_start, site.size, "div")
                - one_hot_rows(b, a.scale_start, site.size))
    if site.norm is not None:
        n = site.norm
        mod = get_node(model, n.modulation)
        # shift' = shift / s; 1 + scale' = (1 + scale) / s, i.e. W' = W / s, b' = (1 + b) / s - 1
        for st in (n.shift_start, n.scale_start):
            _update(mod.kernel, lambda k, st=st: scale_axis(k, s, -1, st, site.size, "div"))
        if getattr(mod, "bias", None) is not None:
            _update(mod.bias, lambda b: scale_axis(b, s, -1, n.shift_start, site.size, "div"))
            _update(mod.bias, lambda b: scale_axis(b + one_hot_rows(b, n.scale_start, site.size),
                                                    s, -1, n.scale_start, site.size, "div")
                    - one_hot_rows(b, n.scale_start, site.size))
        else:
            raise ValueError(
                f"site {site.name!r}: folding a scale into modulation {path_str(n.modulation)} needs its bias"
            )
    return True


def runtime_smoothing(model: nnx.Module, site: Site, scale: np.ndarray) -> None:
    """SmoothQuant where no producer can absorb the scales: consumers scale x by 1/s at run time."""
    for r in site.consumers:
        lin = get_node(model, r.path)
        if not isinstance(lin, QuantLinear):
            lin = QuantLinear.from_linear(lin, format=None)
            set_node(model, r.path, lin)
        lin.set_smoothing(1.0 / scale, r.start, site.size)
        lin.kernel.set_value(scale_axis(lin.kernel.get_value(), scale, -2, r.start, site.size, "mul"))
