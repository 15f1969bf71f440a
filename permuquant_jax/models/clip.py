"""The CLIP text transformer (FLUX's ``text_encoder``, CLIP ViT-L/14's text tower) in Flax NNX.

Token + learned position embeddings; pre-LN layers with causal self-attention (scaled logits,
softmax in float32) and a quick-GELU MLP; a final LayerNorm. The pooled output is the final hidden
state at the end-of-text token: ``argmax(input_ids)`` for configs with the legacy ``eos_token_id``
2 (OpenAI's CLIP, whose end-of-text id is the largest id; FLUX's config), else the first position
holding ``eos_token_id`` (transformers' two rules).

The layers are ONE stacked module run under a scan. Module paths follow transformers' names:
``token_embedding``, ``position_embedding``, ``layers.layer_norm1``,
``layers.self_attn.{q_proj,k_proj,v_proj,out_proj}``, ``layers.layer_norm2``, ``layers.mlp.{fc1,fc2}``,
``final_layer_norm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from permuquant_jax.models.flux import scan_blocks, stack_blocks
from permuquant_jax.models.layers import Dtype, Linear

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text transformer (transformers' ``CLIPTextConfig`` fields)."""

    vocab_size: int = 49408
    hidden: int = 768
    heads: int = 12
    layers: int = 12
    intermediate: int = 3072
    max_position: int = 77
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    hidden_act: str = "quick_gelu"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "heads", "layers", "intermediate", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"CLIPTextConfig: hidden {self.hidden} must be divisible by heads {self.heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"CLIPTextConfig.eos_token_id must be an integer, got {self.eos_token_id!r}")
        if not self.eps > 0:
            raise ValueError(f"CLIPTextConfig.eps must be positive, got {self.eps}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """CLIP ViT-L/14's text transformer (FLUX's ``text_encoder``): 12 layers, width 768, 12 heads."""
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A small text transformer with CLIP's vocabulary and context (49408 ids, 77 tokens): width 64,
        4 heads, MLP 128, 2 layers."""
        return cls(hidden=64, heads=4, layers=2, intermediate=128)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LayerNorm(nnx.Module):
    """LayerNorm with ``scale`` and ``bias``; statistics, normalization and affine in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """CLIP's MLP activation: quick-GELU ``x * sigmoid(1.702 x)``, exact GELU or tanh GELU."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=name == "gelu_new")


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with q/k/v/out projections (all with biases)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads, self.head_dim = config.heads, config.head_dim
        w = config.hidden
        self.q_proj = Linear(w, w, **kw)
        self.k_proj = Linear(w, w, **kw)
        self.v_proj = Linear(w, w, **kw)
        self.out_proj = Linear(w, w, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        q, k, v = (p(x).reshape(b, s, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        dtype = q.dtype
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32).astype(dtype)
        logits = logits * jnp.asarray(self.head_dim**-0.5, dtype)
        causal = jnp.tril(jnp.ones((s, s), bool))
        logits = jnp.where(causal, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(dtype)
        return self.out_proj(out.reshape(b, s, self.heads * self.head_dim))


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = config.hidden_act
        self.fc1 = Linear(config.hidden, config.intermediate, **kw)
        self.fc2 = Linear(config.intermediate, config.hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(activation(self.act, self.fc1(x)))


class CLIPLayer(nnx.Module):
    """Pre-LN transformer layer: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(config.hidden, eps=config.eps, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden, eps=config.eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nnx.Module):
    """CLIP text transformer: ``model(input_ids int32 [B, S]) -> (last_hidden_state [B, S, W], pooled [B, W])``.

    ``S`` may be at most ``max_position`` (77). ``dtype`` is the compute dtype, ``param_dtype``
    (default ``dtype``) the storage dtype.
    """

    def __init__(
        self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = None
    ):
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden, **kw)
        self.position_embedding = nnx.Embed(config.max_position, config.hidden, **kw)
        self.layers = stack_blocks(
            lambda r: CLIPLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r), config.layers, rngs
        )
        self.final_layer_norm = LayerNorm(config.hidden, eps=config.eps, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"CLIPTextModel: input_ids must be integer token ids [batch, seq_len], got {input_ids.dtype} "
                f"of shape {input_ids.shape}"
            )
        b, s = input_ids.shape
        if s > cfg.max_position:
            raise ValueError(
                f"CLIPTextModel: sequence length {s} exceeds max_position {cfg.max_position} (tokenize to "
                f"{cfg.max_position} tokens)"
            )
        x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(s))[None]
        x = scan_blocks(self.layers, x.astype(self.dtype), lambda layer, h: layer(h), cfg.layers)
        hidden = self.final_layer_norm(x)
        ids = input_ids.astype(jnp.int32)
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = hidden[jnp.arange(b), eos]
        return hidden, pooled
