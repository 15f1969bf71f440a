"""The T5 v1.1 encoder (FLUX's ``text_encoder_2``, t5-v1_1-xxl) in Flax NNX.

Each layer: RMS norm (no mean, no bias; variance in float32) -> self-attention with unscaled logits
plus a relative position bias -> residual; RMS norm -> gated tanh-GELU feed-forward -> residual.
The bias table lives in block 0 of the reference and is shared by every layer: it is one
``[buckets, heads]`` embedding here, computed once per call and passed to all layers. No linear has
a bias. A final RMS norm gives transformers' ``last_hidden_state``.

The layers are ONE stacked module (arrays with a leading depth axis) run under a scan, as the DiT's
blocks are. Module paths: ``shared`` (token embedding), ``relative_attention_bias``,
``blocks.attn_norm``, ``blocks.attn.{q,k,v,o}``, ``blocks.ffn_norm``, ``blocks.ffn.{wi_0,wi_1,wo}``,
``final_norm``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.flux import scan_blocks, stack_blocks
from permuquant_jax.models.layers import Dtype, Linear


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 v1.1 encoder (gated-GELU feed-forward, no biases)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "num_heads",
            "d_ff",
            "num_layers",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 4:
            raise ValueError(
                "T5Config.relative_attention_num_buckets must be a multiple of 4 (half per direction, half of "
                f"those exact), got {self.relative_attention_num_buckets}"
            )
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                f"T5Config.relative_attention_max_distance {self.relative_attention_max_distance} must exceed the "
                f"exact-bucket range {self.relative_attention_num_buckets // 4}"
            )
        if not self.eps > 0:
            raise ValueError(f"T5Config.eps must be positive, got {self.eps}")

    @property
    def inner_dim(self) -> int:
        """Width of q, k, v: ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    @classmethod
    def xxl(cls) -> T5Config:
        """t5-v1_1-xxl, FLUX's ``text_encoder_2``: 24 layers, width 4096, 64 heads of 64, FFN 10240."""
        return cls()

    @classmethod
    def tiny(cls) -> T5Config:
        """A small encoder with T5's vocabulary (32128 ids): width 64, 4 heads of 16, FFN 128, 2 layers."""
        return cls(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def relative_position_buckets(
    query_length: int, key_length: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Bidirectional T5 buckets of ``key - query`` positions: int32 ``[query_length, key_length]``.

    Half the buckets per direction (positive offsets in the upper half); within one direction, offsets
    below a quarter of ``num_buckets`` get a bucket each, larger ones share logarithmically wider buckets
    up to ``max_distance``. Computed on the host in float32 arithmetic like the reference, so the
    truncation to an integer bucket agrees at every offset.
    """
    rel = np.arange(key_length, dtype=np.int64)[None, :] - np.arange(query_length, dtype=np.int64)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(dist.astype(np.float32) / np.float32(max_exact))
    scaled = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5RMSNorm(nnx.Module):
    """``scale * (x / rms(x))`` without mean or bias; the mean square in float32, as T5's layer norm."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return scale * (x32 * rrms).astype(scale.dtype)


class T5Attention(nnx.Module):
    """Self-attention with unscaled logits plus a given position bias; ``q, k, v, o`` without biases."""

    def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = Linear(config.d_model, config.inner_dim, **kw)
        self.k = Linear(config.d_model, config.inner_dim, **kw)
        self.v = Linear(config.d_model, config.inner_dim, **kw)
        self.o = Linear(config.inner_dim, config.d_model, **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        q, k, v = (proj(x).reshape(b, s, self.num_heads, self.d_kv) for proj in (self.q, self.k, self.v))
        dtype = q.dtype
        # Logits rounded to the compute dtype and the bias added there, softmax in float32 (as the reference).
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32).astype(dtype)
        logits = logits + position_bias.astype(dtype)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(dtype)
        return self.o(out.reshape(b, s, self.num_heads * self.d_kv))


class T5GatedFFN(nnx.Module):
    """``wo(gelu_tanh(wi_0(x)) * wi_1(x))`` (T5 v1.1's gated-GELU feed-forward)."""

    def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = Linear(config.d_model, config.d_ff, **kw)
        self.wi_1 = Linear(config.d_model, config.d_ff, **kw)
        self.wo = Linear(config.d_ff, config.d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """One encoder layer: pre-norm attention and pre-norm feed-forward, each with a residual."""

    def __init__(self, config: T5Config, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.attn_norm = T5RMSNorm(config.d_model, eps=config.eps, param_dtype=param_dtype)
        self.attn = T5Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ffn_norm = T5RMSNorm(config.d_model, eps=config.eps, param_dtype=param_dtype)
        self.ffn = T5GatedFFN(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, position_bias: jax.Array) -> jax.Array:
        x = _clamp_fp16(x + self.attn(self.attn_norm(x), position_bias))
        return _clamp_fp16(x + self.ffn(self.ffn_norm(x)))


def _clamp_fp16(x: jax.Array) -> jax.Array:
    """The reference's float16 guard: once any value overflowed, clip everything to max - 1000."""
    if x.dtype != jnp.float16:
        return x
    big = float(jnp.finfo(jnp.float16).max)
    limit = jnp.where(jnp.isinf(x).any(), big - 1000.0, big).astype(x.dtype)
    return jnp.clip(x, -limit, limit)


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder: ``encoder(input_ids int32 [B, S]) -> [B, S, d_model]`` (final-normed hidden states).

    No attention mask, as FLUX runs it: padding tokens take part in attention, so the padded length
    changes the embeddings. ``dtype`` is the compute dtype, ``param_dtype`` (default ``dtype``) the
    storage dtype.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = None):
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets, config.num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.blocks = stack_blocks(
            lambda r: T5Block(config, dtype=dtype, param_dtype=param_dtype, rngs=r), config.num_layers, rngs
        )
        self.final_norm = T5RMSNorm(config.d_model, eps=config.eps, param_dtype=param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """The ``[heads, length, length]`` relative position bias every layer adds to its logits."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = self.relative_attention_bias.embedding[...]
        return jnp.moveaxis(jnp.take(table, jnp.asarray(buckets), axis=0), -1, 0)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"T5Encoder: input_ids must be integer token ids [batch, seq_len], got {input_ids.dtype} "
                f"of shape {input_ids.shape}"
            )
        x = self.shared(input_ids).astype(self.dtype)
        bias = self.position_bias(input_ids.shape[1])[None]
        x = scan_blocks(self.blocks, x, lambda block, h: block(h, bias), self.config.num_layers)
        return self.final_norm(x).astype(self.dtype)
