"""Permutation sites: where a channel permutation (or per-channel scaling) can be absorbed.

A site is one channel space of `size` channels that one or more linears (the consumers) read as input,
in the column range `[start, start + size)` of each consumer's input. A permutation p chosen for the
site is applied to the consumers' kernel rows (NNX kernels are `[in, out]`) and absorbed upstream:

- `rows`: producer linears write the site in their output rows `[start, start + size)`; their kernel
  columns and bias entries are permuted (FLUX: fc1 -> fc2).
- `heads`: `rows` with segments (the attention heads) that the permutation may not cross (V -> proj).
- `norm`: the producer is a LayerNorm + AdaLN modulation: a `GatherIndex` variable makes the norm write
  its output gathered, and the shift/scale rows of the modulation linear are permuted offline.
- `gather`: no producer; the consumer's activation quantization gathers the channels (`QuantLinear`).

Permutations of stacked (scanned) modules have the leading stack axes of the consumer kernels:
`[*stack, size]`, one permutation per layer of the stack.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[Any, ...]
SiteKind = Literal["rows", "heads", "norm", "gather"]
SITE_KINDS: tuple[str, ...] = ("rows", "heads", "norm", "gather")


def path_str(path: Path) -> str:
    """'double_blocks.img_attn.qkv' for ('double_blocks', 'img_attn', 'qkv')."""
    return ".".join(str(p) for p in path)


def parse_path(path: str | Path) -> Path:
    """The tuple form of a dotted module path (integers for list indices)."""
    if isinstance(path, tuple):
        return path
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))


@dataclass(frozen=True)
class Ref:
    """A linear at `path` that reads (consumer) or writes (producer) the site at offset `start`."""

    path: Path
    start: int = 0

    def __post_init__(self):
        object.__setattr__(self, "path", parse_path(self.path))


@dataclass(frozen=True)
class NormRef:
    """A modulated norm producer: the gather index variable and the modulation linear's shift/scale rows."""

    gather: Path
    modulation: Path
    shift_start: int
    scale_start: int

    def __post_init__(self):
        object.__setattr__(self, "gather", parse_path(self.gather))
        object.__setattr__(self, "modulation", parse_path(self.modulation))


@dataclass(frozen=True)
class Site:
    """One channel space that a permutation (or smoothing) can be chosen for. See the module docstring.

    segments: lengths of consecutive segments a permutation stays within (None: the whole site).
    scalable: whether a per-channel scaling of the site can be folded into the producers (the path from
    producer to consumer is linear in the site's channels: V -> attention -> proj, a modulated norm);
    False for fc1 -> GELU -> fc2 and for gather sites (SmoothQuant then scales at run time).
    """

    name: str
    kind: SiteKind
    size: int
    consumers: tuple[Ref, ...]
    producers: tuple[Ref, ...] = ()
    norm: NormRef | None = None
    segments: tuple[int, ...] | None = None
    scalable: bool = field(default=False)

    def __post_init__(self):
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site {self.name!r}: kind must be one of {SITE_KINDS}, found {self.kind!r}")
        object.__setattr__(self, "consumers", tuple(self.consumers))
        object.__setattr__(self, "producers", tuple(self.producers))
        if not self.consumers:
            raise ValueError(f"site {self.name!r} has no consumers")
        if self.kind in ("rows", "heads") and not self.producers:
            raise ValueError(f"site {self.name!r} of kind {self.kind!r} needs producer linears")
        if self.kind == "norm" and self.norm is None:
            raise ValueError(f"site {self.name!r} of kind 'norm' needs a NormRef (gather index, modulation)")
        if self.segments is not None:
            segs = tuple(int(s) for s in self.segments)
            if sum(segs) != self.size:
                raise ValueError(f"site {self.name!r}: segments {segs} do not sum to its size {self.size}")
            object.__setattr__(self, "segments", segs)


# --------------------------------------------------------------------------- model graph helpers


def get_node(model: nnx.Module, path: Path) -> Any:
    """The submodule / variable / attribute of `model` at `path`."""
    node: Any = model
    for p in parse_path(path):
        try:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise KeyError(f"no module at path {path_str(parse_path(path))!r} (missing {p!r})") from None
    return node


def set_node(model: nnx.Module, path: Path, value: Any) -> None:
    """Replace the submodule of `model` at `path` by `value`."""
    path = parse_path(path)
    parent = get_node(model, path[:-1])
    last = path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def is_linear(node: Any) -> bool:
    """A float linear layer with `kernel [*stack, in, out]` and `bias [*stack, out]` or None: `nnx.Linear`
    or the model package's `Linear` (not `LinearGeneral`/`Einsum`, whose kernels mean something else)."""
    from permuquant_jax.models.layers import Linear as ModelLinear

    return isinstance(node, nnx.Linear | ModelLinear) and isinstance(getattr(node, "kernel", None), nnx.Param)


def find_linears(model: nnx.Module) -> dict[Path, nnx.Module]:
    """Every float linear of `model`, by path, in graph order."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if is_linear(node):
            out[tuple(path)] = node
    return out


def match_any(path: Path | str, patterns: Iterable[str]) -> bool:
    """Whether the dotted path matches one of the patterns (fnmatch globs, or `re:` regexes)."""
    s = path if isinstance(path, str) else path_str(path)
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], s):
                return True
        elif fnmatch.fnmatchcase(s, pat):
            return True
    return False


def kernel_of(model: nnx.Module, path: Path) -> np.ndarray:
    """The float kernel `[*stack, in, out]` of the linear at `path` (float32 numpy)."""
    return np.asarray(get_node(model, path).kernel.get_value(), np.float32)


def stack_shape(model: nnx.Module, path: Path) -> tuple[int, ...]:
    """Leading stack axes of a (possibly scanned) linear's kernel."""
    return tuple(get_node(model, path).kernel.get_value().shape[:-2])


def gather_sites(model: nnx.Module, paths: Iterable[Path]) -> list[Site]:
    """A `gather` site (the whole input) for each linear path: the plan for models we do not know."""
    sites = []
    for p in paths:
        k = get_node(model, p).kernel.get_value().shape[-2]
        sites.append(Site(name=path_str(p), kind="gather", size=k, consumers=(Ref(p, 0),)))
    return sites


def validate_sites(model: nnx.Module, sites: Sequence[Site]) -> None:
    """Check that every reference exists with a compatible shape; raise ValueError naming the site."""
    for s in sites:
        stacks = set()
        for r in s.consumers:
            lin = get_node(model, r.path)
            k = lin.kernel.get_value()
            if r.start < 0 or r.start + s.size > k.shape[-2]:
                raise ValueError(
                    f"site {s.name!r}: consumer {path_str(r.path)} has {k.shape[-2]} input channels, "
                    f"the site needs columns [{r.start}, {r.start + s.size})"
                )
            stacks.add(k.shape[:-2])
        for r in s.producers:
            k = get_node(model, r.path).kernel.get_value()
            if r.start < 0 or r.start + s.size > k.shape[-1]:
                raise ValueError(
                    f"site {s.name!r}: producer {path_str(r.path)} has {k.shape[-1]} output rows, "
                    f"the site needs rows [{r.start}, {r.start + s.size})"
                )
            stacks.add(k.shape[:-2])
        if s.norm is not None:
            k = get_node(model, s.norm.modulation).kernel.get_value()
            for st in (s.norm.shift_start, s.norm.scale_start):
                if st < 0 or st + s.size > k.shape[-1]:
                    raise ValueError(
                        f"site {s.name!r}: modulation {path_str(s.norm.modulation)} has {k.shape[-1]} rows, "
                        f"the site needs rows [{st}, {st + s.size})"
                    )
            stacks.add(k.shape[:-2])
            var = get_node(model, s.norm.gather)
            if not isinstance(var, nnx.Variable):
                raise ValueError(f"site {s.name!r}: {path_str(s.norm.gather)} is not a GatherIndex variable")
        if len(stacks) != 1:
            raise ValueError(f"site {s.name!r}: its linears have different stack shapes {sorted(stacks)}")


# --------------------------------------------------------------------------- folding


def _permute_axis(a: jnp.ndarray, perm: np.ndarray, axis: int, start: int, size: int) -> jnp.ndarray:
    """a with the range [start, start+size) of `axis` reordered by perm `[*stack, size]` (per stack entry)."""
    a = jnp.asarray(a)
    axis = axis % a.ndim
    perm = np.asarray(perm)
    stack, dim = perm.shape[:-1], a.shape[axis]
    # The whole index of the axis is built on the host, so one compiled gather serves every range
    # (start, size) of an array shape (one per range made dozens of small compilations).
    idx = np.array(np.broadcast_to(np.arange(dim, dtype=np.int32), (*stack, dim)))
    idx[..., start : start + size] = start + perm
    shape = [1] * a.ndim
    shape[: len(stack)] = stack
    shape[axis] = dim
    return _gather_axis(a, jax.device_put(idx.reshape(shape)), axis)


@functools.partial(jax.jit, static_argnums=2)
def _gather_axis(a, idx, axis):
    return jnp.take_along_axis(a, jnp.broadcast_to(idx, (*a.shape[:axis], idx.shape[axis], *a.shape[axis + 1 :])),
                               axis=axis)


def _scale_axis(a: jnp.ndarray, s: np.ndarray, axis: int, start: int, size: int, op: str) -> jnp.ndarray:
    """a with the range [start, start+size) of `axis` multiplied (op "mul") or divided by s `[*stack, size]`."""
    return _scale_axis_jit(jnp.asarray(a), jnp.asarray(s, jnp.float32), axis % jnp.ndim(a), start, size, op)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _scale_axis_jit(a, s, axis, start, size, op):
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(start, start + size)
    v = jnp.asarray(s, jnp.float32)
    shape = [1] * a.ndim
    shape[: v.ndim - 1] = v.shape[:-1]
    shape[axis] = size
    v = v.reshape(shape)
    part = a[tuple(idx)].astype(jnp.float32)
    part = part * v if op == "mul" else part / v
    return a.at[tuple(idx)].set(part.astype(a.dtype))


def _update(var: nnx.Variable, fn) -> None:
    var.set_value(fn(var.get_value()))


def permute_consumer(model: nnx.Module, ref: Ref, size: int, perm: np.ndarray) -> None:
    """Reorder the kernel rows `[start, start+size)` of a consumer linear (or float QuantLinear)."""
    lin = get_node(model, ref.path)
    _update(lin.kernel, lambda k: _permute_axis(k, perm, -2, ref.start, size))


def fold_permutation(model: nnx.Module, site: Site, perm: np.ndarray) -> None:
    """Apply permutation `perm [*stack, size]` at `site`; the float function of the model is unchanged.

    Consumers' kernel rows are reordered; the producers absorb the permutation (rows/heads: output rows
    and bias; norm: the gather index and the modulation shift/scale rows); for gather sites each
    consumer becomes a float `QuantLinear` whose input gather reads `x[..., perm]`.
    """
    from permuquant_jax.quant.linear import QuantLinear

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
        _update(lin.kernel, lambda k, r=r: _permute_axis(k, perm, -1, r.start, site.size))
        if getattr(lin, "bias", None) is not None:
            _update(lin.bias, lambda b, r=r: _permute_axis(b, perm, -1, r.start, site.size))
    if site.norm is not None:
        n = site.norm
        mod = get_node(model, n.modulation)
        for st in (n.shift_start, n.scale_start):
            _update(mod.kernel, lambda k, st=st: _permute_axis(k, perm, -1, st, site.size))
            if getattr(mod, "bias", None) is not None:
                _update(mod.bias, lambda b, st=st: _permute_axis(b, perm, -1, st, site.size))
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
        _update(lin.kernel, lambda k, r=r: _scale_axis(k, s, -2, r.start, site.size, "mul"))
    for r in site.producers:
        lin = get_node(model, r.path)
        _update(lin.kernel, lambda k, r=r: _scale_axis(k, s, -1, r.start, site.size, "div"))
        if getattr(lin, "bias", None) is not None:
            _update(lin.bias, lambda b, r=r: _scale_axis(b, s, -1, r.start, site.size, "div"))
    if site.norm is not None:
        n = site.norm
        mod = get_node(model, n.modulation)
        # shift' = shift / s; 1 + scale' = (1 + scale) / s, i.e. W' = W / s, b' = (1 + b) / s - 1
        for st in (n.shift_start, n.scale_start):
            _update(mod.kernel, lambda k, st=st: _scale_axis(k, s, -1, st, site.size, "div"))
        if getattr(mod, "bias", None) is not None:
            _update(mod.bias, lambda b: _scale_axis(b, s, -1, n.shift_start, site.size, "div"))
            _update(mod.bias, lambda b: _scale_axis(b + _one_hot_rows(b, n.scale_start, site.size),
                                                    s, -1, n.scale_start, site.size, "div")
                    - _one_hot_rows(b, n.scale_start, site.size))
        else:
            raise ValueError(
                f"site {site.name!r}: folding a scale into modulation {path_str(n.modulation)} needs its bias"
            )
    return True


def _one_hot_rows(b: jnp.ndarray, start: int, size: int) -> jnp.ndarray:
    """Ones on the last-axis range [start, start+size) of b's shape, zeros elsewhere."""
    m = np.zeros(b.shape[-1], jnp.dtype(b.dtype))
    m[start : start + size] = 1
    return jax.device_put(np.array(np.broadcast_to(m, b.shape)))
