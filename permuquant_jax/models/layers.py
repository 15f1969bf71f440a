"""Building blocks of the FLUX.1 DiT in Flax NNX, with Black Forest Labs' semantics.

Every linear map is a :class:`Linear` (kernel ``[in, out]``), so quantization code can swap any of
them for another module with the same ``__call__(x)``. Norms compute in float32 and return the input
dtype; RoPE is applied in float32 like the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type | None

LAYER_NORM_EPS = 1e-6
RMS_NORM_EPS = 1e-6


class GatherIndex(nnx.Variable):
    """An int32 channel index (``[dim]``, or ``[depth, dim]`` in a stacked block) or None.

    A modulated norm holding one writes its output channels in this order (see
    :class:`ModulatedLayerNorm`). It is not a trainable parameter.
    """


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel`` ``[in_features, out_features]``.

    ``dtype`` is the computation dtype (None: the promoted dtype of input and kernel); products are
    accumulated in float32 and rounded once to ``dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.precision = precision
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        y = jax.lax.dot_general(
            x.astype(dtype),
            kernel.astype(dtype),
            (((x.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
            preferred_element_type=jnp.float32,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nnx.Module):
    """RMS norm over the last axis (eps 1e-6) with a learned ``scale``; float32 inside."""

    def __init__(self, dim: int, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_NORM_EPS)
        return (x32 * rrms).astype(x.dtype) * self.scale[...].astype(x.dtype)


class QKNorm(nnx.Module):
    """RMS norms of queries and keys (per head)."""

    def __init__(self, dim: int, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        self.query_norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)
        self.key_norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class ModulatedLayerNorm(nnx.Module):
    """LayerNorm without affine (eps 1e-6), optional channel gather, then AdaLN modulation.

    ``out = (1 + scale) * LN(x)[..., perm] + shift``. With ``perm`` set and the matching
    shift/scale rows of the modulation permuted offline, the block computes the same function with
    this output in permuted channel order (the PermuQuant ``norm`` site).
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.perm = GatherIndex(None)

    def __call__(self, x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        xn = centered * jax.lax.rsqrt(var + LAYER_NORM_EPS)
        perm = self.perm.get_value()
        if perm is not None:
            xn = jnp.take(xn, perm, axis=-1)
        out = (1.0 + scale.astype(jnp.float32)) * xn + shift.astype(jnp.float32)
        return out.astype(x.dtype)


class Modulation(nnx.Module):
    """``lin(silu(vec))`` split into (shift, scale, gate) once (single) or twice (double)."""

    def __init__(self, dim: int, *, double: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, vec: jax.Array) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        chunks = jnp.split(out, self.multiplier, axis=-1)
        return [tuple(chunks[i : i + 3]) for i in range(0, self.multiplier, 3)]


class MLPEmbedder(nnx.Module):
    """``out_layer(silu(in_layer(x)))``: the time / guidance / pooled-text embedders."""

    def __init__(self, in_dim: int, hidden_dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.in_layer = Linear(in_dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.out_layer = Linear(hidden_dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class MLP(nnx.Module):
    """``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, dim: int, hidden_dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(hidden_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SelfAttention(nnx.Module):
    """Fused ``qkv`` projection, per-head QK RMS norm, output ``proj`` (attention itself is joint)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = QKNorm(head_dim, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def split_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Project ``x`` (B, L, dim) to normed q, k and v, each (B, L, heads, head_dim)."""
        return split_heads(self.qkv(x), self.num_heads, self.norm)


def split_heads(qkv: jax.Array, num_heads: int, norm: QKNorm) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, L, 3*H*D) laid out as [q | k | v], heads contiguous -> normed q, k and v (B, L, H, D)."""
    b, l, three_dim = qkv.shape
    head_dim = three_dim // (3 * num_heads)
    q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, num_heads, head_dim), 2, 0)
    q, k = norm(q, k, v)
    return q, k, v


def timestep_frequencies(dim: int = 256, max_period: float = 10_000.0) -> np.ndarray:
    """The ``dim // 2`` float32 frequencies ``exp(-log(max_period) * i / (dim // 2))``.

    The exponent is rounded to float32 step by step as the PyTorch references compute it, and the
    exponential is then correctly rounded. Timesteps are multiplied by 1000 (guidance scales too), so
    a one-ulp difference in a frequency moves the embedding by ~1e-5: PyTorch's float32 ``exp`` on
    the CPU is off by one ulp at 2 of the 128 FLUX frequencies, which is most of the (few 1e-6)
    fp32 difference between this model and diffusers.
    """
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(
    t: jax.Array, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0
) -> jax.Array:
    """Sinusoidal embedding of ``t`` (B,) -> (B, dim) float32, [cos | sin] as in BFL."""
    t = time_factor * jnp.asarray(t, jnp.float32)
    freqs = jnp.asarray(timestep_frequencies(dim, max_period))
    args = t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def rope_frequencies(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary tables for position ids (B, L, n_axes) -> (cos, sin), each (B, L, 1, sum(axes_dim)/2).

    Axis i uses ``axes_dim[i]`` channels; pair j of an axis rotates by ``pos * theta**(-2j/dim)``.
    """
    omegas = [1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dim]
    angles = [ids[..., i : i + 1].astype(jnp.float32) * jnp.asarray(om, jnp.float32) for i, om in enumerate(omegas)]
    angle = jnp.concatenate(angles, axis=-1)[:, :, None, :]
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate consecutive channel pairs (2j, 2j+1) of ``x`` (B, L, H, D); float32 inside."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pe: tuple[jax.Array, jax.Array],
    implementation: str | None = None,
) -> jax.Array:
    """RoPE on q and k, then softmax attention; q, k, v (B, L, H, D) -> (B, L, H*D).

    ``implementation``: "xla" or "cudnn" (passed to :func:`jax.nn.dot_product_attention`), or
    None / "auto": cuDNN's fused attention on a GPU for bf16/fp16 with a head dim it accepts, XLA
    otherwise (always on the CPU).
    """
    cos, sin = pe
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    impl = resolve_attention_impl(implementation, q)
    try:
        out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
    except (ValueError, NotImplementedError, RuntimeError):
        if implementation not in (None, "auto"):
            raise
        # cuDNN refused these shapes or this cuDNN version at trace time: use XLA's attention.
        out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    b, l, h, d = out.shape
    return out.reshape(b, l, h * d)


def resolve_attention_impl(implementation: str | None, q: jax.Array) -> str:
    """The attention implementation ``attention`` uses for ``implementation`` and queries ``q``."""
    if implementation not in (None, "auto"):
        if implementation not in ("xla", "cudnn"):
            raise ValueError(f"attention implementation must be None, 'auto', 'xla' or 'cudnn', got {implementation!r}")
        return implementation
    head_dim = q.shape[-1]
    if (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim <= 128
        and head_dim % 8 == 0
    ):
        return "cudnn"
    return "xla"
