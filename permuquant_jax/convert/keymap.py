"""Where each tensor of a FLUX.1 checkpoint goes in :class:`~permuquant_jax.models.flux.FluxDiT`.

Two source layouts: Black Forest Labs' single file (``double_blocks.0.img_attn.qkv.weight``, ...)
and diffusers' ``FluxTransformer2DModel`` (``transformer_blocks.0.attn.to_q.weight``, ...). Sources
store linear weights PyTorch-style ``[out, in]``; the model holds kernels ``[in, out]`` and stacks
the blocks on a leading depth axis. A source tensor may fill only part of a target (diffusers' split
q / k / v) or be cut in two (diffusers' final norm stores (scale, shift), BFL and the model (shift,
scale)).
"""

from __future__ import annotations

import dataclasses

from permuquant_jax.models.flux import FluxConfig

TIME_EMBED_DIM = 256


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``src`` of a source tensor go to ``dst`` along the target's output axis.

    ``target`` is the model variable path (e.g. ``("double_blocks", "img_attn", "qkv", "kernel")``),
    ``layer`` the index on the stacked depth axis (None for unstacked variables). ``None`` ranges
    mean "all".
    """

    target: tuple[str, ...]
    layer: int | None
    src: tuple[int, int] | None = None
    dst: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One tensor a checkpoint must contain: its key, stored shape and where it goes."""

    key: str
    shape: tuple[int, ...]
    is_matrix: bool
    pieces: tuple[Piece, ...]


class _Builder:
    def __init__(self) -> None:
        self.table: dict[str, SourceTensor] = {}

    def linear(
        self,
        key: str,
        target: tuple[str, ...],
        n_in: int,
        n_out: int,
        layer: int | None = None,
        *,
        bias: bool = True,
        dst: tuple[int, int] | None = None,
        split: tuple[tuple[tuple[int, int], tuple[int, int]], ...] | None = None,
    ) -> None:
        """A torch Linear ``key.weight`` [n_out, n_in] (+ ``key.bias``) -> ``target.kernel/bias``."""
        if split is None:
            pieces_k = (Piece(target + ("kernel",), layer, None, dst),)
            pieces_b = (Piece(target + ("bias",), layer, None, dst),)
        else:
            pieces_k = tuple(Piece(target + ("kernel",), layer, s, d) for s, d in split)
            pieces_b = tuple(Piece(target + ("bias",), layer, s, d) for s, d in split)
        self.table[key + ".weight"] = SourceTensor(key + ".weight", (n_out, n_in), True, pieces_k)
        if bias:
            self.table[key + ".bias"] = SourceTensor(key + ".bias", (n_out,), False, pieces_b)

    def vector(self, key: str, target: tuple[str, ...], n: int, layer: int | None = None) -> None:
        self.table[key] = SourceTensor(key, (n,), False, (Piece(target, layer),))


def bfl_keymap(cfg: FluxConfig) -> dict[str, SourceTensor]:
    """Every key of a BFL-layout FLUX.1 checkpoint for ``cfg`` (no prefix)."""
    h, m, d = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim
    b = _Builder()
    b.linear("img_in", ("img_in",), cfg.in_channels, h)
    b.linear("txt_in", ("txt_in",), cfg.context_in_dim, h)
    b.linear("time_in.in_layer", ("time_in", "in_layer"), TIME_EMBED_DIM, h)
    b.linear("time_in.out_layer", ("time_in", "out_layer"), h, h)
    b.linear("vector_in.in_layer", ("vector_in", "in_layer"), cfg.vec_in_dim, h)
    b.linear("vector_in.out_layer", ("vector_in", "out_layer"), h, h)
    if cfg.guidance_embed:
        b.linear("guidance_in.in_layer", ("guidance_in", "in_layer"), TIME_EMBED_DIM, h)
        b.linear("guidance_in.out_layer", ("guidance_in", "out_layer"), h, h)
    for i in range(cfg.depth):
        p, t = f"double_blocks.{i}.", ("double_blocks",)
        for s in ("img", "txt"):
            b.linear(p + f"{s}_mod.lin", t + (f"{s}_mod", "lin"), h, 6 * h, i)
            b.linear(p + f"{s}_attn.qkv", t + (f"{s}_attn", "qkv"), h, 3 * h, i, bias=cfg.qkv_bias)
            for norm in ("query_norm", "key_norm"):
                b.vector(p + f"{s}_attn.norm.{norm}.scale", t + (f"{s}_attn", "norm", norm, "scale"), d, i)
            b.linear(p + f"{s}_attn.proj", t + (f"{s}_attn", "proj"), h, h, i)
            b.linear(p + f"{s}_mlp.0", t + (f"{s}_mlp", "fc1"), h, m, i)
            b.linear(p + f"{s}_mlp.2", t + (f"{s}_mlp", "fc2"), m, h, i)
    for i in range(cfg.depth_single_blocks):
        p, t = f"single_blocks.{i}.", ("single_blocks",)
        b.linear(p + "linear1", t + ("linear1",), h, 3 * h + m, i)
        b.linear(p + "linear2", t + ("linear2",), h + m, h, i)
        b.vector(p + "norm.query_norm.scale", t + ("norm", "query_norm", "scale"), d, i)
        b.vector(p + "norm.key_norm.scale", t + ("norm", "key_norm", "scale"), d, i)
        b.linear(p + "modulation.lin", t + ("modulation", "lin"), h, 3 * h, i)
    b.linear("final_layer.linear", ("final_layer", "linear"), h, cfg.out_channels)
    b.linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"), h, 2 * h)
    return b.table


def diffusers_keymap(cfg: FluxConfig) -> dict[str, SourceTensor]:
    """Every key of a diffusers ``FluxTransformer2DModel`` state dict for ``cfg``."""
    h, m, d = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim
    b = _Builder()
    b.linear("x_embedder", ("img_in",), cfg.in_channels, h)
    b.linear("context_embedder", ("txt_in",), cfg.context_in_dim, h)
    tte = "time_text_embed."
    b.linear(tte + "timestep_embedder.linear_1", ("time_in", "in_layer"), TIME_EMBED_DIM, h)
    b.linear(tte + "timestep_embedder.linear_2", ("time_in", "out_layer"), h, h)
    b.linear(tte + "text_embedder.linear_1", ("vector_in", "in_layer"), cfg.vec_in_dim, h)
    b.linear(tte + "text_embedder.linear_2", ("vector_in", "out_layer"), h, h)
    if cfg.guidance_embed:
        b.linear(tte + "guidance_embedder.linear_1", ("guidance_in", "in_layer"), TIME_EMBED_DIM, h)
        b.linear(tte + "guidance_embedder.linear_2", ("guidance_in", "out_layer"), h, h)
    thirds = ((0, h), (h, 2 * h), (2 * h, 3 * h))
    for i in range(cfg.depth):
        p, t = f"transformer_blocks.{i}.", ("double_blocks",)
        b.linear(p + "norm1.linear", t + ("img_mod", "lin"), h, 6 * h, i)
        b.linear(p + "norm1_context.linear", t + ("txt_mod", "lin"), h, 6 * h, i)
        for name, dst in zip(("to_q", "to_k", "to_v"), thirds, strict=True):
            b.linear(p + "attn." + name, t + ("img_attn", "qkv"), h, h, i, dst=dst)
        for name, dst in zip(("add_q_proj", "add_k_proj", "add_v_proj"), thirds, strict=True):
            b.linear(p + "attn." + name, t + ("txt_attn", "qkv"), h, h, i, dst=dst)
        b.vector(p + "attn.norm_q.weight", t + ("img_attn", "norm", "query_norm", "scale"), d, i)
        b.vector(p + "attn.norm_k.weight", t + ("img_attn", "norm", "key_norm", "scale"), d, i)
        b.vector(p + "attn.norm_added_q.weight", t + ("txt_attn", "norm", "query_norm", "scale"), d, i)
        b.vector(p + "attn.norm_added_k.weight", t + ("txt_attn", "norm", "key_norm", "scale"), d, i)
        b.linear(p + "attn.to_out.0", t + ("img_attn", "proj"), h, h, i)
        b.linear(p + "attn.to_add_out", t + ("txt_attn", "proj"), h, h, i)
        b.linear(p + "ff.net.0.proj", t + ("img_mlp", "fc1"), h, m, i)
        b.linear(p + "ff.net.2", t + ("img_mlp", "fc2"), m, h, i)
        b.linear(p + "ff_context.net.0.proj", t + ("txt_mlp", "fc1"), h, m, i)
        b.linear(p + "ff_context.net.2", t + ("txt_mlp", "fc2"), m, h, i)
    for i in range(cfg.depth_single_blocks):
        p, t = f"single_transformer_blocks.{i}.", ("single_blocks",)
        b.linear(p + "norm.linear", t + ("modulation", "lin"), h, 3 * h, i)
        for name, dst in zip(("to_q", "to_k", "to_v"), thirds, strict=True):
            b.linear(p + "attn." + name, t + ("linear1",), h, h, i, dst=dst)
        b.linear(p + "proj_mlp", t + ("linear1",), h, m, i, dst=(3 * h, 3 * h + m))
        b.vector(p + "attn.norm_q.weight", t + ("norm", "query_norm", "scale"), d, i)
        b.vector(p + "attn.norm_k.weight", t + ("norm", "key_norm", "scale"), d, i)
        b.linear(p + "proj_out", t + ("linear2",), h + m, h, i)
    b.linear("proj_out", ("final_layer", "linear"), h, cfg.out_channels)
    # diffusers' AdaLayerNormContinuous stores (scale, shift); the model uses (shift, scale).
    b.linear(
        "norm_out.linear",
        ("final_layer", "adaLN_modulation"),
        h,
        2 * h,
        split=(((0, h), (h, 2 * h)), ((h, 2 * h), (0, h))),
    )
    return b.table
