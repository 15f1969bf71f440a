"""The FLUX.1 diffusion transformer (Black Forest Labs' architecture) in Flax NNX.

Module paths follow BFL's parameter names (``double_blocks.img_attn.qkv``, ``single_blocks.linear1``,
...). The 19 double-stream and 38 single-stream blocks are each ONE stacked module whose arrays carry
a leading depth axis; they run under ``jax.lax.scan``, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.layers import (
    MLP,
    Dtype,
    Linear,
    MLPEmbedder,
    ModulatedLayerNorm,
    Modulation,
    QKNorm,
    SelfAttention,
    attention,
    rope_frequencies,
    split_heads,
    timestep_embedding,
)

TIME_EMBED_DIM = 256


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Architecture of a FLUX.1 DiT (BFL's ``FluxParams``).

    ``hidden_size`` must equal ``num_heads * head_dim`` with ``sum(axes_dim) == head_dim``.
    """

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        for name in (
            "in_channels",
            "out_channels",
            "vec_in_dim",
            "context_in_dim",
            "hidden_size",
            "num_heads",
            "depth",
            "depth_single_blocks",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FluxConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxConfig: hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"FluxConfig: the RoPE axes_dim {list(self.axes_dim)} sum to {sum(self.axes_dim)}, but the "
                f"head dim is {self.head_dim} (hidden_size {self.hidden_size} / num_heads {self.num_heads})"
            )
        if any(a <= 0 or a % 2 for a in self.axes_dim):
            raise ValueError(
                f"FluxConfig: every RoPE axis dim must be a positive even number, got {list(self.axes_dim)}"
            )
        if self.mlp_hidden_dim < 1 or self.mlp_hidden_dim != self.hidden_size * self.mlp_ratio:
            raise ValueError(
                f"FluxConfig: mlp_ratio {self.mlp_ratio} times hidden_size {self.hidden_size} must be a "
                f"positive integer, got {self.hidden_size * self.mlp_ratio}"
            )
        if self.theta <= 0:
            raise ValueError(f"FluxConfig.theta must be positive, got {self.theta}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def flux1_dev(cls) -> FluxConfig:
        """FLUX.1 [dev]: 19 + 38 blocks of width 3072, guidance-distilled (11.9B parameters)."""
        return cls(guidance_embed=True)

    @classmethod
    def flux1_schnell(cls) -> FluxConfig:
        """FLUX.1 [schnell]: as dev without the guidance embedder."""
        return cls(guidance_embed=False)

    @classmethod
    def tiny(cls) -> FluxConfig:
        """A few-MB FLUX-architecture model with the real input/output dims (64 / 4096 / 768).

        Width 128 (2 heads of 64, RoPE axes 8/28/28), MLP 512, 2 double + 4 single blocks, with the
        guidance embedder, so every code path of the full model runs.
        """
        return cls(
            hidden_size=128, num_heads=2, axes_dim=(8, 28, 28), depth=2, depth_single_blocks=4, guidance_embed=True
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


class DoubleStreamBlock(nnx.Module):
    """Separate img / txt weights, joint attention over [txt, img] tokens."""

    def __init__(self, config: FluxConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        h, heads = config.hidden_size, config.num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = heads
        self.img_mod = Modulation(h, double=True, **kw)
        self.img_norm1 = ModulatedLayerNorm(h)
        self.img_attn = SelfAttention(h, heads, qkv_bias=config.qkv_bias, **kw)
        self.img_norm2 = ModulatedLayerNorm(h)
        self.img_mlp = MLP(h, config.mlp_hidden_dim, **kw)
        self.txt_mod = Modulation(h, double=True, **kw)
        self.txt_norm1 = ModulatedLayerNorm(h)
        self.txt_attn = SelfAttention(h, heads, qkv_bias=config.qkv_bias, **kw)
        self.txt_norm2 = ModulatedLayerNorm(h)
        self.txt_mlp = MLP(h, config.mlp_hidden_dim, **kw)

    def __call__(
        self,
        img: jax.Array,
        txt: jax.Array,
        vec: jax.Array,
        pe: tuple[jax.Array, jax.Array],
        attention_impl: str | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.split_qkv(self.img_norm1(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.split_qkv(self.txt_norm1(txt, txt_shift1, txt_scale1))
        q = jnp.concatenate([txt_q, img_q], axis=1)
        k = jnp.concatenate([txt_k, img_k], axis=1)
        v = jnp.concatenate([txt_v, img_v], axis=1)
        attn = attention(q, k, v, pe, attention_impl)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(self.img_norm2(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(self.txt_norm2(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP: ``linear1`` -> [q, k, v, mlp]; ``linear2`` on [attn, gelu(mlp)]."""

    def __init__(self, config: FluxConfig, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = config.num_heads
        self.hidden_size = h
        self.linear1 = Linear(h, 3 * h + config.mlp_hidden_dim, **kw)
        self.linear2 = Linear(h + config.mlp_hidden_dim, h, **kw)
        self.norm = QKNorm(config.head_dim, param_dtype=param_dtype, rngs=rngs)
        self.pre_norm = ModulatedLayerNorm(h)
        self.modulation = Modulation(h, double=False, **kw)

    def __call__(
        self, x: jax.Array, vec: jax.Array, pe: tuple[jax.Array, jax.Array], attention_impl: str | None = None
    ) -> jax.Array:
        ((shift, scale, gate),) = self.modulation(vec)
        hidden = self.linear1(self.pre_norm(x, shift, scale))
        qkv, mlp = hidden[..., : 3 * self.hidden_size], hidden[..., 3 * self.hidden_size :]
        q, k, v = split_heads(qkv, self.num_heads, self.norm)
        attn = attention(q, k, v, pe, attention_impl)
        out = self.linear2(jnp.concatenate([attn, jax.nn.gelu(mlp, approximate=True)], axis=-1))
        return x + gate * out


class LastLayer(nnx.Module):
    """AdaLN (shift, scale order, as BFL) then the output projection."""

    def __init__(self, hidden: int, out_channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_final = ModulatedLayerNorm(hidden)
        self.linear = Linear(hidden, out_channels, **kw)
        self.adaLN_modulation = Linear(hidden, 2 * hidden, **kw)

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(vec))[:, None, :], 2, axis=-1)
        return self.linear(self.norm_final(x, shift, scale))


def stack_blocks(make, depth: int, rngs: nnx.Rngs):
    """Build ``depth`` copies of a block as one module whose arrays have a leading depth axis (the shape
    `scan_blocks` runs; also used by the T5 and CLIP encoders)."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r: nnx.Rngs):
        return make(r)

    return build(rngs)


def scan_blocks(blocks: nnx.Module, carry: Any, fn, depth: int | None = None, *, stream: bool = False) -> Any:
    """Run ``carry = fn(block_i, carry)`` over a stacked module under ``jax.lax.scan``.

    Variables that ``fn`` assigns on a block (e.g. statistics of an observer module substituted for
    a Linear) are collected per layer and written back into the stacked module afterwards; variables
    left untouched (the weights) are not copied. Every array variable of ``blocks`` must carry the
    leading depth axis (``depth``; None: the leading dim most variables share).

    ``stream``: the stacked arrays may live in host memory (`offload_blocks`); each layer's slice is
    copied to device memory inside the scan body, so only the layers in flight occupy the device.
    """
    graphdef, state = nnx.split(blocks)
    shapes = {
        ".".join(map(str, path)): tuple(np.shape(var.get_value()))
        for path, var in nnx.to_flat_state(state)
        if var.get_value() is not None
    }
    if depth is None:
        leading = [shape[0] if shape else None for shape in shapes.values()]
        depth = max(set(leading), key=leading.count)
    for name, shape in shapes.items():
        if not shape or shape[0] != depth:
            raise ValueError(
                f"scan_blocks: every variable of a stacked block needs the leading depth axis ({depth}); "
                f"'{name}' has shape {shape}"
            )

    def body(c, layer_state):
        if stream:
            layer_state = jax.tree.map(_to_device, layer_state)
        inputs = {path: var.get_value() for path, var in nnx.to_flat_state(layer_state)}
        block = nnx.merge(graphdef, layer_state)
        c = fn(block, c)
        changed = {}
        for path, var in nnx.to_flat_state(nnx.state(block)):
            if var.get_value() is not inputs.get(path, _MISSING):
                changed[path] = var
        return c, (nnx.from_flat_state(changed) if changed else None)

    carry, written = jax.lax.scan(body, carry, state)
    if written is not None:
        nnx.update(blocks, written)
    return carry


_MISSING = object()
HOST_MEMORY_KIND = "pinned_host"


def _to_device(x: Any) -> Any:
    return jax.device_put(x, jax.memory.Space.Device) if isinstance(x, jax.Array) else x


def host_sharding(device: jax.Device | None = None) -> jax.sharding.Sharding:
    """The sharding of an array kept in `device`'s pinned host memory (default: the first device)."""
    return jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind=HOST_MEMORY_KIND)


def offload_blocks(model: FluxDiT, device: jax.Device | None = None) -> FluxDiT:
    """Keep the arrays of `model`'s stacked double/single blocks in pinned host memory (in place; returns
    `model`); its forward then streams each block's slice to the device inside the scan (`scan_blocks`).

    The device then holds the other weights, one or two blocks and the activations instead of the whole
    model (FLUX.1-dev: ~0.6 GiB a block of 22 GiB), at the cost of a host-to-device copy of every block in
    every forward. Outputs are the same arrays as with the model on the device (the same programs run on
    the same values). Operations outside a forward (e.g. folding a permutation into a stacked kernel) then
    read host arrays."""
    sharding = host_sharding(device)
    for blocks in (model.double_blocks, model.single_blocks):
        state = nnx.state(blocks)
        nnx.update(blocks, jax.tree.map(
            lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array | np.ndarray) else x, state))
    model.streamed = True
    return model


class FluxDiT(nnx.Module):
    """FLUX.1 transformer: ``model(img, img_ids, txt, txt_ids, timesteps, y, guidance=None)``.

    Shapes as BFL: ``img`` (B, L, in_channels) packed 2x2 latents, ``img_ids`` (B, L, 3),
    ``txt`` (B, S, context_in_dim), ``txt_ids`` (B, S, 3), ``timesteps`` (B,) in [0, 1],
    ``y`` (B, vec_in_dim) pooled text, ``guidance`` (B,) guidance scale (guidance-distilled models
    only). Returns (B, L, out_channels) in ``dtype``.

    ``dtype`` is the computation dtype, ``param_dtype`` (default: ``dtype``) the storage dtype;
    ``attention_impl`` picks the attention kernel (see :func:`~permuquant_jax.models.layers.attention`).
    """

    def __init__(
        self,
        config: FluxConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = None,
        attention_impl: str | None = None,
    ):
        if attention_impl not in (None, "auto", "xla", "cudnn"):
            raise ValueError(
                f"FluxDiT: attention_impl must be None/'auto' (cuDNN on GPU when it accepts the "
                f"shapes, else XLA), 'xla' or 'cudnn'; got {attention_impl!r}"
            )
        param_dtype = param_dtype or dtype
        self.config = config
        self.dtype = dtype
        self.attention_impl = attention_impl
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = config.hidden_size
        self.img_in = Linear(config.in_channels, h, **kw)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, h, **kw)
        self.vector_in = MLPEmbedder(config.vec_in_dim, h, **kw)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, h, **kw) if config.guidance_embed else None
        self.txt_in = Linear(config.context_in_dim, h, **kw)
        block_kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.double_blocks = stack_blocks(lambda r: DoubleStreamBlock(config, **block_kw, rngs=r), config.depth, rngs)
        self.single_blocks = stack_blocks(
            lambda r: SingleStreamBlock(config, **block_kw, rngs=r), config.depth_single_blocks, rngs
        )
        self.final_layer = LastLayer(h, config.out_channels, **kw)
        self.streamed = False  # stacked blocks in host memory, streamed by the forward (`offload_blocks`)

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        img, img_ids, txt, txt_ids, timesteps, y, guidance = self._check_inputs(
            img, img_ids, txt, txt_ids, timesteps, y, guidance
        )
        dtype = self.dtype
        img = self.img_in(img.astype(dtype))
        vec = self.time_in(timestep_embedding(timesteps, TIME_EMBED_DIM).astype(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        txt = self.txt_in(txt.astype(dtype))

        ids = jnp.concatenate([txt_ids, img_ids], axis=1)
        pe = rope_frequencies(ids, cfg.axes_dim, cfg.theta)
        impl = self.attention_impl

        def double(block, carry):
            return block(carry[0], carry[1], vec, pe, impl)

        stream = getattr(self, "streamed", False)
        img, txt = scan_blocks(self.double_blocks, (img, txt), double, cfg.depth, stream=stream)
        x = jnp.concatenate([txt, img], axis=1)
        x = scan_blocks(self.single_blocks, x, lambda block, c: block(c, vec, pe, impl), cfg.depth_single_blocks,
                        stream=stream)
        img = x[:, txt.shape[1] :]
        return self.final_layer(img, vec)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        cfg = self.config

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"FluxDiT input: {msg}")

        img, txt, y = jnp.asarray(img), jnp.asarray(txt), jnp.asarray(y)
        need(
            img.ndim == 3 and img.shape[-1] == cfg.in_channels,
            f"img must be (batch, tokens, {cfg.in_channels}) packed latents, got shape {img.shape}",
        )
        b, n_img = img.shape[:2]
        need(
            txt.ndim == 3 and txt.shape[0] == b and txt.shape[-1] == cfg.context_in_dim,
            f"txt must be ({b}, tokens, {cfg.context_in_dim}), got shape {txt.shape}",
        )
        n_txt = txt.shape[1]
        img_ids = _batched_ids(img_ids, b, n_img, "img_ids")
        txt_ids = _batched_ids(txt_ids, b, n_txt, "txt_ids")
        for name, ids in (("img_ids", img_ids), ("txt_ids", txt_ids)):
            need(
                ids.shape[-1] == len(cfg.axes_dim),
                f"{name} have {ids.shape[-1]} position axes but the model's RoPE has {len(cfg.axes_dim)} "
                f"(axes_dim {list(cfg.axes_dim)})",
            )
        need(y.shape == (b, cfg.vec_in_dim), f"y must be ({b}, {cfg.vec_in_dim}), got shape {y.shape}")
        timesteps = _batched_scalar(timesteps, b, "timesteps")
        if cfg.guidance_embed:
            need(
                guidance is not None,
                "this model is guidance-distilled (guidance_embed=True, e.g. FLUX.1-dev): pass guidance, "
                "e.g. jnp.full((batch,), 3.5)",
            )
            guidance = _batched_scalar(guidance, b, "guidance")
        else:
            need(
                guidance is None,
                "this model has no guidance embedder (guidance_embed=False, e.g. FLUX.1-schnell): pass guidance=None",
            )
        return img, img_ids, txt, txt_ids, timesteps, y, guidance


def _batched_ids(ids: Any, batch: int, tokens: int, name: str) -> jax.Array:
    ids = jnp.asarray(ids)
    if ids.ndim == 2:
        ids = jnp.broadcast_to(ids[None], (batch, *ids.shape))
    if ids.ndim != 3 or ids.shape[:2] != (batch, tokens):
        raise ValueError(
            f"FluxDiT input: {name} must be ({batch}, {tokens}, n_axes) to match the tokens, got shape {ids.shape}"
        )
    return ids


def _batched_scalar(x: Any, batch: int, name: str) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        x = jnp.broadcast_to(x, (batch,))
    if x.shape != (batch,):
        raise ValueError(f"FluxDiT input: {name} must be a scalar or shape ({batch},), got shape {x.shape}")
    return x


def param_count(model: nnx.Module) -> int:
    """Number of scalars in the module's ``nnx.Param`` variables (works on abstract models)."""
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        n = 1
        for s in value.shape:
            n *= s
        total += n
    return total


def abstract_flux(config: FluxConfig, dtype: Dtype = jnp.bfloat16) -> FluxDiT:
    """A :class:`FluxDiT` whose variables are ``jax.ShapeDtypeStruct`` (no memory, no init)."""
    return nnx.eval_shape(lambda: FluxDiT(config, rngs=nnx.Rngs(0), dtype=dtype))


__all__: Sequence[str] = (
    "FluxConfig",
    "FluxDiT",
    "DoubleStreamBlock",
    "SingleStreamBlock",
    "LastLayer",
    "scan_blocks",
    "offload_blocks",
    "host_sharding",
    "param_count",
    "abstract_flux",
)
