"""Named quantization settings: a short string -> weight and activation fake-quantizers + bits/weight.

Names: "nvfp4" (W4A4), "nvfp4-w4a16" (weight only), "mxfp4", "mxfp4-w4a16", and
"int<n>-g<g>[-w<n>a<m>]" for symmetric INT<n> weights per group of <g> (n in 2..8, g in
16/32/64/128, bfloat16 scales); activations are INT<m> with the same group (m in 2..8), or none
for a16; without the suffix m = n ("int4-g64" is W4A4, "int3-g64-w3a3" the paper's W3A3).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

from permuquant_jax.formats import intq, mxfp4, nvfp4

_INT_RE = re.compile(r"int(\d)-g(\d+)(?:-w(\d)a(\d+))?")


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """A quantization setting.

    weight_fake_quant(w, global_scale=None): w is `[N, K]` (or any `[..., K]`), groups along K.
    act_fake_quant(x, global_scale=None): identity for weight-only formats. `global_scale` is for
    NVFP4 only (None = dynamic per tensor, "per_row", or a calibrated float32 scale); passing one
    to a format without a global scale (`uses_global_scale` False) is an error.
    bits_per_weight counts the element bits plus the block scale bits (NVFP4: 4 + 8/16 = 4.5);
    the one float32 global scale per tensor is not counted.
    """

    name: str
    family: str  # "nvfp4", "mxfp4" or "int"
    group: int
    weight_bits: int
    act_bits: int | None
    bits_per_weight: float
    packable: bool
    uses_global_scale: bool
    weight_fake_quant: Callable[..., jax.Array] = dataclasses.field(repr=False, compare=False)
    act_fake_quant: Callable[..., jax.Array] = dataclasses.field(repr=False, compare=False)

    @property
    def weight_only(self) -> bool:
        return self.act_bits is None


def _no_global_scale(name: str, fn: Callable[[jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    def wrapped(x: jax.Array, global_scale: object = None) -> jax.Array:
        if global_scale is not None:
            raise ValueError(
                f"format {name!r} has no global scale, found global_scale={global_scale!r}; "
                "pass None (only NVFP4 formats take one)"
            )
        return fn(x)

    return wrapped


_nvfp4_fq_static = jax.jit(nvfp4.fake_quant, static_argnums=1)
_nvfp4_fq_traced = jax.jit(nvfp4.fake_quant)
_mxfp4_fq = jax.jit(mxfp4.fake_quant)
_intq_fq = jax.jit(intq.fake_quant, static_argnums=(1, 2, 3))


def _nvfp4_fake_quant(x: jax.Array, global_scale: nvfp4.GlobalScale = None) -> jax.Array:
    """`nvfp4.fake_quant`, compiled once per shape (and per global-scale mode)."""
    if global_scale is None or isinstance(global_scale, str):
        return _nvfp4_fq_static(x, global_scale)
    return _nvfp4_fq_traced(x, global_scale)


def _identity(x: jax.Array, global_scale: object = None) -> jax.Array:
    return x


def _nvfp4(name: str, weight_only: bool) -> QuantFormat:
    return QuantFormat(
        name=name,
        family="nvfp4",
        group=nvfp4.BLOCK_SIZE,
        weight_bits=4,
        act_bits=None if weight_only else 4,
        bits_per_weight=4 + 8 / nvfp4.BLOCK_SIZE,
        packable=True,
        uses_global_scale=True,
        weight_fake_quant=_nvfp4_fake_quant,
        act_fake_quant=_identity if weight_only else _nvfp4_fake_quant,
    )


def _mxfp4(name: str, weight_only: bool) -> QuantFormat:
    fq = _no_global_scale(name, _mxfp4_fq)
    return QuantFormat(
        name=name,
        family="mxfp4",
        group=mxfp4.BLOCK_SIZE,
        weight_bits=4,
        act_bits=None if weight_only else 4,
        bits_per_weight=4 + 8 / mxfp4.BLOCK_SIZE,
        packable=False,
        uses_global_scale=False,
        weight_fake_quant=fq,
        act_fake_quant=_identity if weight_only else fq,
    )


def _int(name: str, wbits: int, abits: int | None, group: int) -> QuantFormat:
    def quantizer(bits: int) -> Callable[..., jax.Array]:
        return _no_global_scale(name, lambda x: _intq_fq(x, bits, group, jnp.bfloat16))

    return QuantFormat(
        name=name,
        family="int",
        group=group,
        weight_bits=wbits,
        act_bits=abits,
        bits_per_weight=wbits + 16 / group,
        packable=False,
        uses_global_scale=False,
        weight_fake_quant=quantizer(wbits),
        act_fake_quant=_identity if abits is None else quantizer(abits),
    )


def list_formats() -> list[str]:
    """Canonical format names (INT formats also accept a "-w<n>a<m>" suffix, m in 2..8 or 16)."""
    names = ["nvfp4", "nvfp4-w4a16", "mxfp4", "mxfp4-w4a16"]
    for n in intq.BITS:
        for g in intq.GROUP_SIZES:
            names += [f"int{n}-g{g}", f"int{n}-g{g}-w{n}a16"]
    return names


def _unknown(name: str, why: str = "") -> ValueError:
    groups = "/".join(str(g) for g in intq.GROUP_SIZES)
    return ValueError(
        f"unknown quantization format {name!r}{why}; known formats: nvfp4, nvfp4-w4a16, mxfp4, "
        f"mxfp4-w4a16, and int<n>-g<g>[-w<n>a<m>] with n in 2..8, g in {groups}, m in 2..8 or 16 "
        "(e.g. int4-g64, int4-g64-w4a16, int3-g64-w3a3, int8-g128); see list_formats()"
    )


def get_format(name: str) -> QuantFormat:
    """The QuantFormat called `name` (see the module docstring); ValueError listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string, found {type(name).__name__}")
    key = name.strip().lower()
    if key in ("nvfp4", "nvfp4-w4a4", "nvfp4-w4a16"):
        return _nvfp4(key, key.endswith("a16"))
    if key in ("mxfp4", "mxfp4-w4a4", "mxfp4-w4a16"):
        return _mxfp4(key, key.endswith("a16"))
    m = _INT_RE.fullmatch(key)
    if m is None:
        raise _unknown(name)
    n, g = int(m[1]), int(m[2])
    if n not in intq.BITS or g not in intq.GROUP_SIZES:
        raise _unknown(name, f" (bits {n} or group {g} out of range)")
    if m[3] is None:
        return _int(key, n, n, g)
    w, a = int(m[3]), int(m[4])
    if w != n:
        raise _unknown(name, f" (weight bits in the suffix, {w}, differ from int{n})")
    if a == 16:
        return _int(key, n, None, g)
    if a not in intq.BITS:
        raise _unknown(name, f" (activation bits {a} not in 2..8 or 16)")
    return _int(key, n, a, g)
