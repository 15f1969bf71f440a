"""load_flux: the embedded tiny checkpoint, stored dtypes, prefixes, and every kind of bad input."""

from __future__ import annotations

import json
import secrets
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from flux_ref import bfl_to_model
from safetensors.numpy import save_file

from permuquant_jax.assets.make_tiny import tiny_tensors, write_tiny
from permuquant_jax.convert import (
    CheckpointError,
    checkpoint,
    default_checkpoint_path,
    load_flux,
    read_flux_config,
)
from permuquant_jax.convert.safetensors_io import TensorInfo, check_tensors
from permuquant_jax.models import FluxConfig, FluxDiT


@pytest.fixture(scope="module")
def tiny() -> dict[str, np.ndarray]:
    """The shipped tiny checkpoint's tensors, read by safetensors itself (BFL names, bf16)."""
    from safetensors import safe_open

    with safe_open(str(default_checkpoint_path()), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _model_arrays(model: FluxDiT) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_model_holds(model: FluxDiT, tensors: dict[str, np.ndarray], dtype) -> None:
    """Every BFL tensor sits at its model path (transposed, stacked), cast to ``dtype``, and every
    model parameter is accounted for."""
    arrays = _model_arrays(model)
    seen = set()
    for key, value in tensors.items():
        path, layer, is_weight = bfl_to_model(key)
        got = arrays[path] if layer is None else arrays[path][layer]
        want = (value.T if is_weight else value).astype(np.dtype(dtype))
        assert got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        seen.add(path)
    assert seen == set(arrays)


def test_default_checkpoint_is_the_tiny_model(tiny):
    # (the layer-by-layer path of large stacked tensors: test_device_transpose_path, both variants)
    path = default_checkpoint_path()
    assert path.is_file() and path.stat().st_size <= 8_000_000
    model = load_flux()
    assert model.config == FluxConfig.tiny() and read_flux_config() == FluxConfig.tiny()
    assert_model_holds(model, tiny, jnp.bfloat16)


def test_shipped_file_is_reproducible(tmp_path, tiny):
    out = write_tiny(tmp_path / "again.safetensors")
    assert out.read_bytes() == default_checkpoint_path().read_bytes()
    assert tiny_tensors().keys() == tiny.keys()


@pytest.mark.parametrize("stored", [np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_stored_dtypes(stored, dtype, tiny, tmp_path):
    rng = np.random.default_rng(secrets.randbits(32))
    # fresh values, so each stored dtype really carries its own precision
    tensors = {}
    for k, v in tiny.items():
        noise = 1 + 0.01 * rng.standard_normal(v.shape, np.float32)
        tensors[k] = (v.astype(np.float32) * noise).astype(stored)
    path = tmp_path / "ckpt.safetensors"
    save_file(tensors, str(path))
    model = load_flux(path, dtype)
    assert model.config == FluxConfig.tiny()
    assert_model_holds(model, tensors, dtype)


def test_comfy_prefix_and_all_in_one_file(tiny, tmp_path):
    tensors = {"model.diffusion_model." + k: v for k, v in tiny.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = np.zeros((8, 4, 3, 3), np.float32)
    tensors["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
    path = tmp_path / "flux1-dev-fp8-all-in-one.safetensors"
    save_file(tensors, str(path))
    assert_model_holds(load_flux(path, jnp.bfloat16, progress=True), tiny, jnp.bfloat16)


def test_config_override_and_metadata_free_inference(tiny, tmp_path):
    path = tmp_path / "nometa.safetensors"
    save_file(dict(tiny), str(path))  # no metadata: RoPE axes from the head dim (8/28/28 for 64)
    assert read_flux_config(path) == FluxConfig.tiny()
    with pytest.raises(CheckpointError, match=r"missing key 'double_blocks.2.img_mod.lin.weight'.*"
                       r"depth=3\+4.*\(the config passed in\)"):
        load_flux(path, config=FluxConfig(**{**FluxConfig.tiny().to_dict(), "depth": 3}))


# ---------------------------------------------------------------------------------------------
# Bad input: one-line CheckpointError naming the file, the key and expected vs found.


def expect_error(path, *fragments, call=None):
    with pytest.raises(CheckpointError) as info:
        (call or load_flux)(path)
    msg = str(info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert isinstance(info.value, ValueError)
    return msg


def test_not_safetensors(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("this is a text file, not weights\n" * 10)
    expect_error(p, str(p), "not a safetensors file")
    q = tmp_path / "tiny.bin"
    q.write_bytes(b"\x01\x02")
    expect_error(q, str(q), "not a safetensors file", "only 2 bytes")
    r = tmp_path / "badjson.safetensors"
    r.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 10)
    expect_error(r, str(r), "header is not JSON")
    g = tmp_path / "flux1-dev-Q8_0.gguf"
    g.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    expect_error(g, str(g), "GGUF file", "use the .safetensors checkpoint")
    torch = pytest.importorskip("torch")
    pt = tmp_path / "flux.pt"
    torch.save({"img_in.weight": torch.zeros(4, 4)}, pt)
    expect_error(pt, str(pt), "PyTorch .pt/.ckpt", "convert it to .safetensors")


def test_truncated(tmp_path):
    data = default_checkpoint_path().read_bytes()
    p = tmp_path / "partial.safetensors"
    p.write_bytes(data[: len(data) - 1000])
    msg = expect_error(p, str(p), "truncated file", f"only {len(data) - 1000 - 8 - _header_len(data)} data")
    assert "tensor '" in msg


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def test_vae_checkpoint(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    expect_error(folder, "config.json", "_class_name is 'AutoencoderKL'", "'FluxTransformer2DModel'")
    expect_error(
        folder / "diffusion_pytorch_model.safetensors", "looks like a VAE (autoencoder)", "key '", "'img_in.weight'"
    )


@pytest.mark.parametrize(
    "keys",
    [
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.time_embed.0.weight",
            "model.diffusion_model.out.2.weight",
        ),  # SD 1.x/SDXL original layout
        ("conv_in.weight", "time_embedding.linear_1.weight", "down_blocks.0.resnets.0.conv1.weight"),  # diffusers
    ],
)
def test_sd_unet_checkpoint(keys, tmp_path):
    p = tmp_path / "unet.safetensors"
    save_file({k: np.zeros((4, 4), np.float16) for k in keys}, str(p))
    expect_error(p, str(p), "looks like an SD-family UNet", "expected key 'img_in.weight'")


def test_missing_key(tiny, tmp_path):
    tensors = dict(tiny)
    del tensors["double_blocks.1.txt_attn.proj.bias"]
    p = tmp_path / "missing.safetensors"
    save_file(tensors, str(p))
    expect_error(p, str(p), "missing key 'double_blocks.1.txt_attn.proj.bias'", "expected shape [128]",
                 "expected a FLUX.1 transformer with hidden_size=128", "(inferred from the other keys)")


def test_check_tensors_order_counts_and_notes():
    """The one key/shape/dtype check every loader runs: missing before unexpected before shape before
    dtype, the first of each named with how many more, notes and the basis where given."""
    infos = {"a": TensorInfo("p.a", "BF16", (2, 3), 0, 12), "b": TensorInfo("p.b", "I8", (4,), 12, 16),
             "x": TensorInfo("p.x", "F32", (1,), 16, 20), "y": TensorInfo("p.y", "F32", (1,), 20, 24)}

    def check(expected, present, **kw):
        with pytest.raises(CheckpointError) as e:
            check_tensors(expected, present, infos.__getitem__, checkpoint="ck", describe="a toy with w=2",
                          dtypes=("BF16", "F32"), stored=lambda k: "p." + k, where=lambda k: f"file-{k}", **kw)
        return str(e.value)

    msg = check({"a": (2, 3), "m": (5,), "n": (6,)}, ["a", "x"], basis="from config.json",
                missing_note=lambda k: " (or 'q.m')" if k == "m" else "")
    assert msg == ("ck: missing key 'p.m' (or 'q.m') (expected shape [5]) and 1 more; expected a toy with w=2 "
                   "(from config.json)")
    msg = check({"a": (2, 3)}, ["a", "x", "y"], unexpected_note=lambda k: " (an adapter)")
    assert msg == "file-x: unexpected key 'p.x' (shape [1]) and 1 more; not part of a toy with w=2 (an adapter)"
    assert check({"a": (3, 2), "b": (4,)}, ["a", "b"]) == (
        "file-a: key 'p.a': expected shape [3, 2], found [2, 3] (for a toy with w=2)")
    assert check({"a": (2, 3), "b": (4,)}, ["a", "b"]) == (
        "file-b: key 'p.b': expected a float tensor (BF16, F32), found I8")
    check_tensors({"a": (2, 3)}, ["a"], infos.__getitem__, checkpoint="ck", describe="", dtypes=("BF16",),
                  stored=str, where=str)  # all good: no error


def test_unexpected_key(tiny, tmp_path):
    tensors = dict(tiny)
    tensors["double_blocks.0.img_attn.lora_A.weight"] = np.zeros((4, 128), ml_dtypes.bfloat16)
    p = tmp_path / "lora-merged.safetensors"
    save_file(tensors, str(p))
    expect_error(p, str(p), "unexpected key 'double_blocks.0.img_attn.lora_A.weight'", "shape [4, 128]")


def test_wrong_shape(tiny, tmp_path):
    tensors = dict(tiny)
    tensors["single_blocks.2.linear2.weight"] = np.zeros((128, 600), ml_dtypes.bfloat16)
    p = tmp_path / "resized.safetensors"
    save_file(tensors, str(p))
    expect_error(p, str(p), "key 'single_blocks.2.linear2.weight'", "expected shape [128, 640]", "found [128, 600]")


def test_integer_tensor(tiny, tmp_path):
    tensors = dict(tiny)
    tensors["img_in.bias"] = np.zeros((128,), np.int8)
    p = tmp_path / "int8.safetensors"
    save_file(tensors, str(p))
    expect_error(p, str(p), "key 'img_in.bias'", "expected a float tensor", "found I8")


def test_directory_without_transformer(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    expect_error(
        tmp_path,
        str(tmp_path),
        "no FLUX transformer in this directory",
        "transformer/",
        "found: [model_index.json, text_encoder/, vae/]",
    )
    expect_error(tmp_path / "nope", "no such file or directory")
    (tmp_path / "transformer").mkdir()
    expect_error(tmp_path, "transformer", "needs config.json")


def test_diffusers_folder_with_missing_shard(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    shard = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {"x_embedder.weight": shard}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(
        tmp_path, "diffusion_pytorch_model-00001-of-00002.safetensors", "does not exist", "'x_embedder.weight'"
    )


def test_device_transpose_path(tiny, tmp_path, monkeypatch):
    """The GPU's path for large stacked weights (layers read as stored [out, in], transposed and checked
    on the device), run on the CPU: the same arrays as the host path for a BFL file (bf16 read straight
    in) and a diffusers folder stored in f32 (q/k/v split over rows, cast while copied); a NaN is named by
    its stored key and index."""
    from test_hostile_load import CONFIG, _diffusers_folder

    from permuquant_jax.convert.keymap import diffusers_keymap

    monkeypatch.setattr(checkpoint, "LAYERWISE_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "DEVICE_TRANSPOSE", True)
    assert_model_holds(load_flux(), tiny, jnp.bfloat16)
    rng = np.random.default_rng(secrets.randbits(32))
    tensors = {k: (0.05 * rng.standard_normal(e.shape)).astype(np.float32)
               for k, e in diffusers_keymap(FluxConfig.tiny()).items()}
    folder = _diffusers_folder(tmp_path, tensors, CONFIG)
    on_device = _model_arrays(load_flux(folder))
    monkeypatch.setattr(checkpoint, "DEVICE_TRANSPOSE", False)
    on_host = _model_arrays(load_flux(folder))
    assert on_device.keys() == on_host.keys()
    for k in on_host:
        np.testing.assert_array_equal(on_device[k], on_host[k], err_msg=k)
    monkeypatch.setattr(checkpoint, "DEVICE_TRANSPOSE", True)
    bad = dict(tiny)
    bad["single_blocks.2.linear1.weight"] = bad["single_blocks.2.linear1.weight"].copy()
    bad["single_blocks.2.linear1.weight"][5, 7] = np.nan
    path = tmp_path / "nan.safetensors"
    save_file(bad, str(path))
    expect_error(path, str(path), "tensor 'single_blocks.2.linear1.weight'", "1 NaN", "first at index [5, 7]")
