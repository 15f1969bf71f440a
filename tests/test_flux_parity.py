"""FluxDiT loaded by load_flux vs diffusers' FluxTransformer2DModel (PyTorch fp32, CPU).

Both layouts: a diffusers folder written by ``save_pretrained`` (sharded, and inside a pipeline
folder) and a BFL-layout single file that diffusers reads through its own converter
``convert_flux_transformer_checkpoint_to_diffusers`` (which assumes width 3072).
"""

from __future__ import annotations

import json
import secrets

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flux_ref import diffusers_forward, make_inputs, randomize_torch_module, rel_err, torch_timestep_frequencies

from permuquant_jax.convert import load_flux

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
# End to end, our correctly rounded timestep frequencies differ from PyTorch's CPU float32 exp by one
# ulp at 2 of 128 entries, amplified by t * 1000 (and guidance * 1000): a few 1e-6 of output
# difference that does not come from the architecture. The architecture check swaps in PyTorch's
# table and must hold to TOL; the end-to-end difference is checked against END_TO_END_TOL.
END_TO_END_TOL = 2e-5
ARGS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")


def _jax_forward(model, inputs):
    return np.asarray(jax.jit(lambda m, *a: m(*a))(model, *[inputs[k] for k in ARGS]))


def _our_outputs(model, inputs, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """(end-to-end output, output with PyTorch's timestep frequency table)."""
    from permuquant_jax.models import layers

    out = _jax_forward(model, inputs)
    with monkeypatch.context() as m:
        m.setattr(layers, "timestep_frequencies", lambda dim, max_period: torch_timestep_frequencies(dim, max_period))
        same_table = _jax_forward(model, inputs)
    return out, same_table


def _assert_parity(outs: tuple[np.ndarray, np.ndarray], ref: np.ndarray, what: str, seed: int) -> None:
    out, same_table = outs
    assert out.shape == ref.shape
    e2e, arch = rel_err(out, ref), rel_err(same_table, ref)
    print(f"{what}: rel err {arch:.2e} (same timestep table), {e2e:.2e} end to end")
    assert arch <= TOL, f"{what}: rel err {arch:.3e} > {TOL} (seed {seed})"
    assert e2e <= END_TO_END_TOL, f"{what}: end-to-end rel err {e2e:.3e} > {END_TO_END_TOL} (seed {seed})"


@pytest.mark.parametrize(
    "cfg",
    [
        # guidance-distilled (dev-like), 2 heads of 16, non-square 3x5 latent grid
        dict(
            heads=2,
            head_dim=16,
            axes=(4, 6, 6),
            in_ch=16,
            out_ch=None,
            ctx=24,
            vec=12,
            depth=2,
            single=3,
            guidance=True,
            grid=(3, 5),
            n_txt=7,
            layout="pipeline",
        ),
        # no guidance (schnell-like), 3 heads of 8, out_channels != in_channels, 4x2 grid
        dict(
            heads=3,
            head_dim=8,
            axes=(2, 2, 4),
            in_ch=8,
            out_ch=12,
            ctx=16,
            vec=10,
            depth=1,
            single=2,
            guidance=False,
            grid=(4, 2),
            n_txt=5,
            layout="transformer",
        ),
    ],
    ids=["guidance-pipeline", "no-guidance-transformer"],
)
def test_parity_diffusers_folder(cfg, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    from permuquant_jax.convert import checkpoint

    if cfg["layout"] == "pipeline":  # large-checkpoint path: stacked tensors assembled layer by layer
        monkeypatch.setattr(checkpoint, "LAYERWISE_MIN_BYTES", 0)

    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    ref_model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg["in_ch"],
        out_channels=cfg["out_ch"],
        num_layers=cfg["depth"],
        num_single_layers=cfg["single"],
        attention_head_dim=cfg["head_dim"],
        num_attention_heads=cfg["heads"],
        joint_attention_dim=cfg["ctx"],
        pooled_projection_dim=cfg["vec"],
        guidance_embeds=cfg["guidance"],
        axes_dims_rope=cfg["axes"],
    ).eval()
    randomize_torch_module(ref_model, rng)
    if cfg["layout"] == "pipeline":
        root = tmp_path / "pipe"
        ref_model.save_pretrained(root / "transformer", max_shard_size="50KB")
        (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    else:
        root = tmp_path / "transformer"
        ref_model.save_pretrained(root)

    model = load_flux(root, jnp.float32)
    assert model.config.guidance_embed == cfg["guidance"]
    assert model.config.out_channels == (cfg["out_ch"] or cfg["in_ch"])
    h, w = cfg["grid"]
    inputs = make_inputs(
        rng,
        batch=2,
        h=h,
        w=w,
        n_txt=cfg["n_txt"],
        in_channels=cfg["in_ch"],
        context_dim=cfg["ctx"],
        vec_dim=cfg["vec"],
        guidance=cfg["guidance"],
    )
    ref = diffusers_forward(ref_model, inputs)
    assert ref.shape == (2, h * w, cfg["out_ch"] or cfg["in_ch"])
    outs = _our_outputs(model, inputs, monkeypatch)
    _assert_parity(outs, ref, f"diffusers {cfg['layout']} folder", seed)
    out = outs[0]
    # the two batch elements really differ, so a batch mix-up would show
    assert rel_err(out[0], out[1]) > 1e-2
    if cfg["layout"] == "transformer":
        # the bare diffusers-layout file, no config.json: everything inferred from keys and shapes
        # (the RoPE axes by the default rule, which gives this config's (2, 2, 4) for head dim 8)
        bare = load_flux(root / "diffusion_pytorch_model.safetensors", jnp.float32)
        assert bare.config == model.config
        np.testing.assert_array_equal(_jax_forward(bare, inputs), out)


def _bfl_full_width_tensors(rng: np.random.Generator, depth: int, single: int) -> dict[str, np.ndarray]:
    """Random bf16 tensors with the real FLUX.1-dev key names and shapes (width 3072)."""
    h, m, hd = 3072, 12288, 128
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name, n_in, n_out):
        shapes[name + ".weight"] = (n_out, n_in)
        shapes[name + ".bias"] = (n_out,)

    lin("img_in", 64, h)
    lin("txt_in", 4096, h)
    for e, n_in in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        lin(f"{e}.in_layer", n_in, h)
        lin(f"{e}.out_layer", h, h)
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            lin(p + "_mod.lin", h, 6 * h)
            lin(p + "_attn.qkv", h, 3 * h)
            shapes[p + "_attn.norm.query_norm.scale"] = (hd,)
            shapes[p + "_attn.norm.key_norm.scale"] = (hd,)
            lin(p + "_attn.proj", h, h)
            lin(p + "_mlp.0", h, m)
            lin(p + "_mlp.2", m, h)
    for i in range(single):
        p = f"single_blocks.{i}."
        lin(p + "linear1", h, 3 * h + m)
        lin(p + "linear2", h + m, h)
        shapes[p + "norm.query_norm.scale"] = (hd,)
        shapes[p + "norm.key_norm.scale"] = (hd,)
        lin(p + "modulation.lin", h, 3 * h)
    lin("final_layer.linear", h, 64)
    lin("final_layer.adaLN_modulation.1", h, 2 * h)

    out = {}
    for k, shape in shapes.items():
        if len(shape) == 2:  # uniform with variance 1/fan_in
            a = np.float32(np.sqrt(3.0 / shape[1]))
            vals = rng.random(shape, dtype=np.float32) * (2 * a) - a
        elif k.endswith(".bias"):
            vals = rng.random(shape, dtype=np.float32) * 0.2 - 0.1
        else:
            vals = 1.0 + rng.random(shape, dtype=np.float32) * 0.4 - 0.2
        out["model.diffusion_model." + k] = vals.astype(ml_dtypes.bfloat16)
    return out


def test_parity_bfl_file_full_width(tmp_path, monkeypatch):
    """A BFL-layout file (ComfyUI prefix, bf16 storage) at FLUX's full width 3072, 1 double + 1
    single block: load_flux(fp32) vs diffusers after its own BFL->diffusers converter."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    path = tmp_path / "flux1-dev-2blocks.safetensors"
    tensors = _bfl_full_width_tensors(rng, depth=1, single=1)
    save_file(tensors, str(path))
    del tensors

    # One model in memory at a time (each is 2.2 GB in fp32): ours first, then the reference.
    model = load_flux(path, jnp.float32)
    assert model.config.hidden_size == 3072 and model.config.guidance_embed
    inputs = make_inputs(rng, batch=2, h=2, w=3, n_txt=4, in_channels=64, context_dim=4096, vec_dim=768, guidance=True)
    outs = _our_outputs(model, inputs, monkeypatch)
    del model

    state = convert_flux_transformer_checkpoint_to_diffusers(load_file(str(path)))
    state = {k: v.float() for k, v in state.items()}
    with torch.device("meta"):
        ref_model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    ref_model.load_state_dict(state, strict=True, assign=True)
    ref_model.eval()
    del state
    ref = diffusers_forward(ref_model, inputs)
    del ref_model
    _assert_parity(outs, ref, "BFL file, width 3072", seed)
