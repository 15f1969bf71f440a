"""Permutation sites: where a channel permutation (or per-channel scaling) can be absorbed.

A site is one channel space of `size` channels that one or more linears (the consumers) read as input,
in the column range `[start, start + size)` of each consumer's input. A permutation p chosen for the
site is applied to the consumers' kernel rows (NNX kernels are `[in, out]`) and absorbed upstream:

- `rows`: producer linears write the site in their output rows `[start, start + size)`; their kernel
  columns and bias entries are permuted (FLUX: fc1 -> fc2).
- `heads`: `rows` with segments (the attention heads) that the permutation may not cross (V -> proj).
- `norm`: the producer is a LayerNorm + AdaLN modulation: a `GatherIndex` variable makes the norm write
  its output gathered, and the shift/scale rows of the modulation linear are permuted offline.
- `adaln`: the common DiT layout: a LayerNorm module (with or without affine) whose output is modulated
  `norm(x) * (1 + scale) + shift` by SEPARATE shift and scale linears; folding replaces the norm by a
  `GatheredNorm` (the norm, then its output gathered) and permutes the shift/scale linears' outputs.
- `gather`: no producer; the consumer's activation quantization gathers the channels (`QuantLinear`).

Permutations of stacked (scanned) modules have the leading stack axes of the consumer kernels:
`[*stack, size]`, one permutation per layer of the stack.

Module paths live in `paths.py`, folding in `fold.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from flax import nnx

from permuquant_jax.quant.paths import (  # noqa: F401 - re-exported (imported from here by users)
    Path,
    find_linears,
    get_node,
    is_linear,
    kernel_of,
    match_any,
    parse_path,
    path_str,
    set_node,
    stack_shape,
)

SiteKind = Literal["rows", "heads", "norm", "adaln", "gather"]
SITE_KINDS: tuple[str, ...] = ("rows", "heads", "norm", "adaln", "gather")


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
class AdaLNRef:
    """An `adaln` producer: the norm module and the separate shift and scale linears (their output
    columns `[shift_start, +size)` and `[scale_start, +size)` modulate the site's channels)."""

    norm: Path
    shift: Path
    scale: Path
    shift_start: int = 0
    scale_start: int = 0

    def __post_init__(self):
        for f in ("norm", "shift", "scale"):
            object.__setattr__(self, f, parse_path(getattr(self, f)))


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
    adaln: AdaLNRef | None = None
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
        if self.kind == "adaln" and self.adaln is None:
            raise ValueError(f"site {self.name!r} of kind 'adaln' needs an AdaLNRef (norm, shift and scale linears)")
        if self.kind == "norm" and self.norm is None:
            raise ValueError(f"site {self.name!r} of kind 'norm' needs a NormRef (gather index, modulation)")
        if self.segments is not None:
            segs = tuple(int(s) for s in self.segments)
            if sum(segs) != self.size:
                raise ValueError(f"site {self.name!r}: segments {segs} do not sum to its size {self.size}")
            object.__setattr__(self, "segments", segs)


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
        if s.adaln is not None:
            a = s.adaln
            get_node(model, a.norm)
            for lin_path, st in ((a.shift, a.shift_start), (a.scale, a.scale_start)):
                k = get_node(model, lin_path).kernel.get_value()
                if st < 0 or st + s.size > k.shape[-1]:
                    raise ValueError(
                        f"site {s.name!r}: {path_str(lin_path)} has {k.shape[-1]} outputs, "
                        f"the site needs [{st}, {st + s.size})"
                    )
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
