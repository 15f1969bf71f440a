"""FLUX's autoencoder vs diffusers' AutoencoderKL (fp32, tiny random FLUX-like config) and the loaders.

The reference side is diffusers in PyTorch on the CPU: a tiny ``AutoencoderKL`` with FLUX's geometry
(16 latent channels, no quant convs) written with ``save_pretrained``, and a file written here in
BFL's ``ae.safetensors`` key layout that diffusers reads through its own ``convert_ldm_vae_checkpoint``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from permuquant_jax.convert.ae import ae_keymap, load_autoencoder, read_autoencoder_config
from permuquant_jax.convert.safetensors_io import CheckpointError
from permuquant_jax.models.autoencoder import AutoEncoderConfig, abstract_autoencoder, tiled_blend

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

SCALE, SHIFT = 0.3611, 0.1159
TINY = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=256)
# FLUX.1's vae/config.json (FLUX.1-dev and schnell share it).
FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, act_fn="silu", sample_size=1024, mid_block_add_attention=True,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=SCALE, shift_factor=SHIFT, force_upcast=True,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

encode = nnx.jit(lambda m, x: m.encode(x))
decode = nnx.jit(lambda m, z: m.decode(z))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def diffusers_vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**FLUX_VAE, **TINY, **overrides})


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights everywhere, norms included (diffusers' init leaves them at 1 / 0)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    vae = diffusers_vae().eval()
    randomize(vae, gen)
    folder = tmp_path_factory.mktemp("pipe") / "vae"
    vae.save_pretrained(folder)
    x = torch.rand((2, 3, 64, 96), generator=gen) * 2 - 1  # non-square, multiple of 16
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
        z = torch.randn(mode.shape, generator=gen)
        image = vae.decode(z / SCALE + SHIFT).sample
    return dict(vae=vae, folder=folder, x=x, z_ref=(mode - SHIFT) * SCALE, z=z, image=image, gen=gen)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def model(ref):
    return load_autoencoder(ref["folder"])


def test_diffusers_folder_parity(ref, model):
    assert model.config == AutoEncoderConfig.tiny()
    assert read_autoencoder_config(ref["folder"].parent) == AutoEncoderConfig.tiny()  # a pipeline folder
    z = encode(model, jnp.asarray(nhwc(ref["x"])))
    assert z.shape == (2, 8, 12, 16)
    assert rel_err(z, nhwc(ref["z_ref"])) <= 1e-5
    image = decode(model, jnp.asarray(nhwc(ref["z"])))
    assert image.shape == (2, 64, 96, 3)
    assert rel_err(image, nhwc(ref["image"])) <= 1e-5


def bfl_layout(cfg: AutoEncoderConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under BFL's ae.safetensors keys, written from BFL's module structure."""
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = torch.randn((cout, cin, k, k), generator=gen) / math.sqrt(cin * k * k)
        sd[f"{name}.bias"] = 0.2 * torch.randn((cout,), generator=gen)

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn((c,), generator=gen)
        sd[f"{name}.bias"] = 0.2 * torch.randn((c,), generator=gen)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{p}", c, c, 1)
        resnet(f"{name}.block_2", c, c)

    ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(n):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i < len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder.mid", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, 2 * cfg.z_channels, 3)
    conv("decoder.conv_in", cfg.z_channels, cin, 3)
    mid("decoder.mid", cin)
    for i in reversed(range(len(mult))):
        for j in range(n + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, cfg.out_ch, 3)
    return sd


def save_bf16(sd: dict[str, torch.Tensor], path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Write ``sd`` as BF16 and return the float32 values actually stored."""
    stored = {k: v.numpy().astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    save_file({prefix + k: v for k, v in stored.items()}, str(path))
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in stored.items()}


@pytest.fixture(scope="module")
def bfl_file(ref, tmp_path_factory):
    sd = bfl_layout(AutoEncoderConfig.tiny(), ref["gen"])
    path = tmp_path_factory.mktemp("bfl") / "ae.safetensors"
    return path, save_bf16(sd, path)


def test_bfl_layout_parity_through_diffusers_converter(ref, bfl_file):
    path, stored = bfl_file
    vae = diffusers_vae().eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(stored, vae.config), strict=True)
    model = load_autoencoder(path)  # BF16 file -> float32 model
    assert model.config == AutoEncoderConfig.tiny()
    x, z = ref["x"], ref["z"]
    with torch.no_grad():
        z_ref = (vae.encode(x).latent_dist.mode() - SHIFT) * SCALE
        image_ref = vae.decode(z / SCALE + SHIFT).sample
    assert rel_err(encode(model, jnp.asarray(nhwc(x))), nhwc(z_ref)) <= 1e-5
    assert rel_err(decode(model, jnp.asarray(nhwc(z))), nhwc(image_ref)) <= 1e-5


def test_load_dtypes_prefix_and_fp16_folder(ref, bfl_file, tmp_path):
    path, stored = bfl_file
    # The same tensors inside an all-in-one file under "vae.", loaded as bfloat16: bit-equal values.
    save_bf16({k: v for k, v in stored.items()}, tmp_path / "all_in_one.safetensors", prefix="vae.")
    a = load_autoencoder(path, jnp.bfloat16)
    b = load_autoencoder(tmp_path / "all_in_one.safetensors", jnp.bfloat16)
    kernel = a.encoder.down[1].block[0].conv1.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(kernel, np.float32),
        stored["encoder.down.1.block.0.conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value(), np.float32), np.asarray(vb.get_value(), np.float32))
    # A diffusers folder in float16: every parameter is the fp32 reference rounded to fp16.
    half = tmp_path / "vae16"
    diffusers_vae().half().save_pretrained(half)  # diffusers' random init is enough here
    ref16 = AutoencoderKL.from_pretrained(half, torch_dtype=torch.float32).state_dict()
    model = load_autoencoder(half)
    q = model.decoder.mid.attn_1.q.kernel[...]
    np.testing.assert_array_equal(np.asarray(q), ref16["decoder.mid_block.attentions.0.to_q.weight"].numpy().T)
    up = model.decoder.up[3].block[0].conv2.kernel[...]  # BFL's up.3 is diffusers' up_blocks.0
    np.testing.assert_array_equal(
        np.asarray(up), ref16["decoder.up_blocks.0.resnets.0.conv2.weight"].numpy().transpose(2, 3, 1, 0)
    )


def test_full_size_flux_keys_and_shapes():
    """Every key and shape of FLUX's real autoencoder (diffusers, full config, on the meta device)
    equals our key map of AutoEncoderConfig.flux(), in both layouts."""
    with torch.device("meta"):
        vae = AutoencoderKL(**FLUX_VAE)
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    cfg = AutoEncoderConfig.flux()
    model = abstract_autoencoder(cfg)
    ours = {k: e.shape for k, e in ae_keymap(cfg, "diffusers", model).items()}
    assert ours == want
    # BFL's layout, pushed through diffusers' converter, gives the same table.
    bfl = ae_keymap(cfg, "bfl", model)
    assert "decoder.up.0.block.2.conv1.weight" in bfl and "encoder.mid.attn_1.proj_out.weight" in bfl
    meta = {k: torch.empty(e.shape, device="meta") for k, e in bfl.items()}
    converted = {k: tuple(v.shape) for k, v in convert_ldm_vae_checkpoint(meta, vae.config).items()}
    assert converted == want
    params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert params == sum(math.prod(s) for s in want.values())


def test_tiled_blend_is_exact_for_a_local_decoder():
    """The tile placement and blending weights: with a position-local "decoder" (8x nearest
    upsampling), tiled and whole decodes agree, for uneven tile grids and several overlaps."""
    z = jax.random.normal(jax.random.key(1), (2, 14, 10, 4))

    def fn(t):
        b, h, w, c = t.shape
        return jnp.broadcast_to(t[:, :, None, :, None, :3], (b, h, 8, w, 8, 3)).reshape(b, 8 * h, 8 * w, 3)

    configs = ((6, 2), (4, 3))
    tiled = jax.jit(lambda z: [tiled_blend(fn, z, tile, overlap, 8) for tile, overlap in configs])(z)
    whole = np.asarray(fn(z))
    for out in tiled:
        np.testing.assert_allclose(np.asarray(out), whole, rtol=1e-6, atol=1e-6)


def test_decode_tiled(ref, model):
    z = jnp.asarray(nhwc(ref["z"]))  # latents 8 x 12: tiles of 6 start at rows (0, 2), columns (0, 3, 6)
    full = decode(model, z)  # compiled by the parity test
    tiled = nnx.jit(lambda m, z: m.decode_tiled(z, tile=6, overlap=2))(model, z)
    assert tiled.shape == full.shape == (2, 64, 96, 3)
    # Where one tile alone covers the image, the result is that tile's own decode, exactly placed:
    # the first tile alone covers pixel rows [0, 16) and columns [0, 24), the last one rows [48, 64)
    # and columns [72, 96).
    zt = ref["z"]
    with torch.no_grad():  # the reference decodes the two tiles on its own (no second compile here)
        tiles = nhwc(ref["vae"].decode(torch.cat([zt[:, :, 0:6, 0:6], zt[:, :, 2:8, 6:12]]) / SCALE + SHIFT).sample)
    np.testing.assert_allclose(np.asarray(tiled[:, :16, :24]), np.asarray(tiles[:2, :16, :24]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tiled[:, 48:, 72:]), np.asarray(tiles[2:, 32:, 24:]), rtol=1e-5, atol=1e-5)
    # Overall it differs from the whole decode through the per-tile GroupNorm statistics and attention
    # (tiny random weights and 48-pixel tiles: ~25%; see the module docs for realistic tiles).
    assert rel_err(tiled, full) < 0.5


def test_bad_inputs_and_bad_checkpoints(model, bfl_file, tmp_path):
    with pytest.raises(ValueError, match="multiples of 16, got 24x32"):
        model.encode(jnp.zeros((1, 24, 32, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model.encode(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="even"):
        model.decode(jnp.zeros((1, 3, 4, 16)))
    path, stored = bfl_file
    base = {k: v.numpy() for k, v in stored.items()}

    def write(sd, name):
        save_file(sd, str(tmp_path / name))
        return tmp_path / name

    missing = write({k: v for k, v in base.items() if k != "decoder.mid.attn_1.q.weight"}, "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.mid\.attn_1\.q\.weight' \(expected shape"):
        load_autoencoder(missing)
    bad = dict(base)
    bad["decoder.up.1.block.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"up\.1\.block\.0\.conv1\.weight': expected shape \[32, 64, 3, 3\]"):
        load_autoencoder(write(bad, "shape.safetensors"))
    sd_vae = {**base, "quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32)}
    with pytest.raises(CheckpointError, match="unexpected key 'quant_conv.weight'.*SD/SDXL"):
        load_autoencoder(write(sd_vae, "sdvae.safetensors"))
    with pytest.raises(CheckpointError, match="not an autoencoder checkpoint"):
        load_autoencoder(write({"img_in.weight": np.zeros((4, 4), np.float32)}, "dit.safetensors"))
    nan = dict(base)
    nan["encoder.conv_in.bias"] = np.full_like(base["encoder.conv_in.bias"], np.nan)
    with pytest.raises(CheckpointError, match="NaN"):
        load_autoencoder(write(nan, "nan.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_autoencoder(missing)
    assert "\n" not in str(info.value)


def test_attention_over_query_blocks_equals_whole():
    """Large images run the mid attention over blocks of queries (bounded logits memory): the same
    result, including a last partial block."""
    from permuquant_jax.models.autoencoder import _attend

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 32)).astype(np.float32) for _ in range(3))
    whole, blocked = jax.jit(lambda q, k, v: (_attend(q, k, v), _attend(q, k, v, block_size=64)))(q, k, v)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    logits = np.einsum("bqc,bkc->bqk", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    np.testing.assert_allclose(np.asarray(blocked), ref, rtol=1e-5, atol=1e-5)
