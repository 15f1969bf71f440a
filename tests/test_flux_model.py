"""FluxDiT structure and semantics: full-size shapes vs the real checkpoints, config and input
errors, the scan write-back of mutated variables, gather indices, dtypes."""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flux_ref import bfl_to_model, make_inputs, rel_err

from permuquant_jax.convert import load_flux
from permuquant_jax.models import FluxConfig, FluxDiT, Linear, abstract_flux, param_count

ARGS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance")

# The key/shape table of the released FLUX.1-dev file (flux1-dev.safetensors, BFL layout, PyTorch
# [out, in] weights). Block keys are listed for one block; the file repeats them for every index.
DEV_TOP = {
    "img_in.weight": (3072, 64),
    "img_in.bias": (3072,),
    "txt_in.weight": (3072, 4096),
    "txt_in.bias": (3072,),
    "time_in.in_layer.weight": (3072, 256),
    "time_in.in_layer.bias": (3072,),
    "time_in.out_layer.weight": (3072, 3072),
    "time_in.out_layer.bias": (3072,),
    "vector_in.in_layer.weight": (3072, 768),
    "vector_in.in_layer.bias": (3072,),
    "vector_in.out_layer.weight": (3072, 3072),
    "vector_in.out_layer.bias": (3072,),
    "guidance_in.in_layer.weight": (3072, 256),
    "guidance_in.in_layer.bias": (3072,),
    "guidance_in.out_layer.weight": (3072, 3072),
    "guidance_in.out_layer.bias": (3072,),
    "final_layer.linear.weight": (64, 3072),
    "final_layer.linear.bias": (64,),
    "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    "final_layer.adaLN_modulation.1.bias": (6144,),
}
DEV_DOUBLE_BLOCK = {  # double_blocks.{0..18}.
    f"{s}_{k}": shape
    for s in ("img", "txt")
    for k, shape in {
        "mod.lin.weight": (18432, 3072),
        "mod.lin.bias": (18432,),
        "attn.qkv.weight": (9216, 3072),
        "attn.qkv.bias": (9216,),
        "attn.norm.query_norm.scale": (128,),
        "attn.norm.key_norm.scale": (128,),
        "attn.proj.weight": (3072, 3072),
        "attn.proj.bias": (3072,),
        "mlp.0.weight": (12288, 3072),
        "mlp.0.bias": (12288,),
        "mlp.2.weight": (3072, 12288),
        "mlp.2.bias": (3072,),
    }.items()
}
DEV_SINGLE_BLOCK = {  # single_blocks.{0..37}.
    "linear1.weight": (21504, 3072),
    "linear1.bias": (21504,),
    "linear2.weight": (3072, 15360),
    "linear2.bias": (3072,),
    "norm.query_norm.scale": (128,),
    "norm.key_norm.scale": (128,),
    "modulation.lin.weight": (9216, 3072),
    "modulation.lin.bias": (9216,),
}


def real_table(guidance: bool) -> dict[str, tuple[int, ...]]:
    table = {k: v for k, v in DEV_TOP.items() if guidance or not k.startswith("guidance_in.")}
    table |= {f"double_blocks.{i}.{k}": v for i in range(19) for k, v in DEV_DOUBLE_BLOCK.items()}
    table |= {f"single_blocks.{i}.{k}": v for i in range(38) for k, v in DEV_SINGLE_BLOCK.items()}
    return table


def model_params_from_table(table: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Expected FluxDiT params: kernels [in, out]; blocks stacked on a leading depth axis."""
    out: dict[str, list] = {}
    for key, shape in table.items():
        path, layer, is_weight = bfl_to_model(key)
        shape = shape[::-1] if is_weight else shape
        if layer is not None:
            entry = out.setdefault(path, [0, shape])
            assert entry[1] == shape
            entry[0] += 1
        else:
            out[path] = [None, shape]
    return {k: (shape if n is None else (n, *shape)) for k, (n, shape) in out.items()}


@pytest.mark.parametrize("name,guidance,count", [("dev", True, 11_901_408_320), ("schnell", False, 11_891_178_560)])
def test_full_size_shapes_match_real_checkpoint(name, guidance, count):
    cfg = FluxConfig.flux1_dev() if guidance else FluxConfig.flux1_schnell()
    model = abstract_flux(cfg, jnp.bfloat16)
    got = {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    table = real_table(guidance)
    assert sum(int(np.prod(s)) for s in table.values()) == count
    assert param_count(model) == count, name
    assert got == model_params_from_table(table)
    assert all(v.get_value().dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_heads=25), r"hidden_size 3072 must be divisible by num_heads 25"),
        (dict(axes_dim=(16, 56, 54)), r"axes_dim \[16, 56, 54\] sum to 126, but the head dim is 128"),
        (dict(hidden_size=96, num_heads=2, axes_dim=(15, 17, 16)), r"positive even number"),
        (dict(depth=0), r"depth must be a positive integer, got 0"),
        (dict(mlp_ratio=4.0001), r"mlp_ratio 4.0001 times hidden_size 3072"),
        (dict(context_in_dim=-1), r"context_in_dim must be a positive integer, got -1"),
    ],
)
def test_config_errors_name_the_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FluxConfig(**kwargs)


def test_tiny_preset():
    cfg = FluxConfig.tiny()
    assert (cfg.in_channels, cfg.context_in_dim, cfg.vec_in_dim) == (64, 4096, 768)
    assert cfg.hidden_size % 128 == 0 and cfg.mlp_hidden_dim % 128 == 0 and cfg.guidance_embed
    assert param_count(abstract_flux(cfg)) * 2 <= 8_000_000


@pytest.fixture(scope="module")
def tiny_model():
    # The shipped tiny checkpoint: building the same model by random init costs ~10 s of one-off
    # eager compiles on a 2-core CPU.
    return load_flux(None, jnp.float32)


@nnx.jit
def forward(model, *args):
    return model(*args)


@pytest.fixture
def tiny_inputs():
    cfg = FluxConfig.tiny()
    rng = np.random.default_rng(secrets.randbits(32))
    return make_inputs(
        rng,
        batch=2,
        h=2,
        w=3,
        n_txt=4,
        in_channels=cfg.in_channels,
        context_dim=cfg.context_in_dim,
        vec_dim=cfg.vec_in_dim,
        guidance=True,
    )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(img=np.zeros((2, 6, 60), np.float32)), r"img must be \(batch, tokens, 64\).*\(2, 6, 60\)"),
        (dict(txt=np.zeros((3, 4, 4096), np.float32)), r"txt must be \(2, tokens, 4096\).*\(3, 4, 4096\)"),
        (dict(img_ids=np.zeros((2, 5, 3), np.float32)), r"img_ids must be \(2, 6, n_axes\).*\(2, 5, 3\)"),
        (dict(txt_ids=np.zeros((2, 4, 2), np.float32)), r"txt_ids have 2 position axes .* RoPE has 3"),
        (dict(y=np.zeros((2, 700), np.float32)), r"y must be \(2, 768\), got shape \(2, 700\)"),
        (dict(timesteps=np.zeros((3,), np.float32)), r"timesteps must be a scalar or shape \(2,\)"),
        (dict(guidance=None), r"guidance-distilled .* pass guidance"),
    ],
)
def test_input_errors(tiny_model, tiny_inputs, change, match):
    inputs = {**tiny_inputs, **change}
    with pytest.raises(ValueError, match=match):
        tiny_model(*[inputs[k] for k in ARGS])


def test_guidance_given_to_schnell_like_model_is_an_error(tiny_inputs):
    model = nnx.eval_shape(
        lambda: FluxDiT(
            FluxConfig(
                hidden_size=128, num_heads=2, axes_dim=(8, 28, 28), depth=1, depth_single_blocks=1, guidance_embed=False
            ),
            rngs=nnx.Rngs(0),
        )
    )
    with pytest.raises(ValueError, match=r"no guidance embedder .* guidance=None"):
        model(*[tiny_inputs[k] for k in ARGS])


class AmaxObserver(nnx.Module):
    """Wraps a Linear, records the running per-channel amax of its input and a call count."""

    def __init__(self, inner: Linear, depth: int):
        self.inner = inner
        self.amax = nnx.BatchStat(jnp.zeros((depth, inner.in_features), jnp.float32))
        self.calls = nnx.BatchStat(jnp.zeros((depth,), jnp.int32))

    def __call__(self, x):
        self.amax[...] = jnp.maximum(self.amax[...], jnp.abs(x).max(axis=(0, 1)))
        self.calls[...] = self.calls[...] + 1
        return self.inner(x)


def test_scan_writes_back_mutated_variables(tiny_model, tiny_inputs):
    model = nnx.clone(tiny_model)
    args = [tiny_inputs[k] for k in ARGS]
    ref = forward(model, *args)
    depth = model.config.depth
    model.double_blocks.img_attn.qkv = AmaxObserver(model.double_blocks.img_attn.qkv, depth)
    out = forward(model, *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)  # transparent
    forward(model, *args)
    obs = model.double_blocks.img_attn.qkv
    np.testing.assert_array_equal(np.asarray(obs.calls[...]), np.full((depth,), 2))

    # Layer 0's qkv input, computed by hand: img_norm1 of img_in(img), modulated by img_mod row 0.
    b0 = jax.tree.map(lambda a: a[0], nnx.state(model.double_blocks, nnx.Param))
    vec = model.time_in(_temb(tiny_inputs["timesteps"])) + model.guidance_in(_temb(tiny_inputs["guidance"]))
    vec = vec + model.vector_in(jnp.asarray(tiny_inputs["y"]))
    mod = jax.nn.silu(vec) @ b0["img_mod"]["lin"]["kernel"][...] + b0["img_mod"]["lin"]["bias"][...]
    h = model.config.hidden_size
    shift, scale = mod[:, None, :h], mod[:, None, h : 2 * h]
    x = model.img_in(jnp.asarray(tiny_inputs["img"]))
    xn = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-6)
    expected = jnp.abs((1 + scale) * xn + shift).max(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(obs.amax[...][0]), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(obs.amax[...]) > 0)
    assert not np.allclose(obs.amax[...][0], obs.amax[...][1])


def test_scan_rejects_a_variable_without_the_depth_axis(tiny_model, tiny_inputs):
    model = nnx.clone(tiny_model)
    model.single_blocks.linear2 = AmaxObserver(model.single_blocks.linear2, depth=3)  # the model has 4
    with pytest.raises(ValueError, match=r"leading depth axis \(4\); 'linear2.amax' has shape \(3, 640\)"):
        model(*[tiny_inputs[k] for k in ARGS])


def _temb(t):
    from permuquant_jax.models.layers import timestep_embedding

    return timestep_embedding(jnp.asarray(t), 256)


def test_gather_index_with_folded_modulation_rows_is_exact(tiny_model, tiny_inputs):
    """Permuting a norm's output (GatherIndex) together with its modulation shift/scale rows and the
    consuming linear's input rows leaves the model's function unchanged."""
    model = nnx.clone(tiny_model)
    args = [tiny_inputs[k] for k in ARGS]
    ref = np.asarray(forward(model, *args))
    cfg, h = model.config, model.config.hidden_size
    rng = np.random.default_rng(secrets.randbits(32))

    def fold(blocks, norm, mod, consumer, depth, first_chunk):
        perms = np.stack([rng.permutation(h) for _ in range(depth)]).astype(np.int32)
        getattr(blocks, norm).perm.set_value(jnp.asarray(perms))
        lin = mod.lin
        k, b = np.array(lin.kernel[...]), np.array(lin.bias[...])
        for c in (first_chunk, first_chunk + 1):  # shift, scale chunks
            cols = slice(c * h, (c + 1) * h)
            k[:, :, cols] = np.take_along_axis(k[:, :, cols], perms[:, None, :], axis=2)
            b[:, cols] = np.take_along_axis(b[:, cols], perms, axis=1)
        lin.kernel.set_value(jnp.asarray(k))
        lin.bias.set_value(jnp.asarray(b))
        ck = np.array(consumer.kernel[...])
        consumer.kernel.set_value(jnp.asarray(np.take_along_axis(ck, perms[:, :, None], axis=1)))

    db, sb = model.double_blocks, model.single_blocks
    fold(db, "img_norm1", db.img_mod, db.img_attn.qkv, cfg.depth, 0)
    fold(db, "txt_norm2", db.txt_mod, db.txt_mlp.fc1, cfg.depth, 3)
    fold(sb, "pre_norm", sb.modulation, sb.linear1, cfg.depth_single_blocks, 0)
    out = np.asarray(forward(model, *args))
    assert rel_err(out, ref) < 1e-5
    # the gather alone (modulation not folded) does change the output: the test can fail
    other = np.stack([rng.permutation(h) for _ in range(cfg.depth_single_blocks)]).astype(np.int32)
    sb.pre_norm.perm.set_value(jnp.asarray(other))
    assert rel_err(np.asarray(forward(model, *args)), ref) > 1e-3


def test_bf16_close_to_fp32(tiny_model, tiny_inputs):
    args = [tiny_inputs[k] for k in ARGS]
    ref = np.asarray(forward(tiny_model, *args))
    state = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, nnx.state(tiny_model))
    bf = nnx.eval_shape(lambda: FluxDiT(FluxConfig.tiny(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(bf, state)
    out = forward(bf, *args)
    assert out.dtype == jnp.bfloat16
    err = rel_err(np.asarray(out, np.float32), ref)
    assert err < 3e-2, err
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_timestep_frequencies_within_one_ulp_of_pytorch():
    pytest.importorskip("torch")
    from flux_ref import torch_timestep_frequencies

    from permuquant_jax.models.layers import timestep_frequencies

    ours, ref = timestep_frequencies(256, 10_000.0), torch_timestep_frequencies(256, 10_000.0)
    assert ours.dtype == ref.dtype == np.float32
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - ref.view(np.int32))
    assert ulps.max() <= 1 and np.count_nonzero(ulps) <= 4, np.nonzero(ulps)
