"""End to end: our FLUX pipeline vs diffusers' FluxPipeline on one tiny saved folder; the CLI.

The tiny diffusers pipeline mirrors the embedded one's architecture (DiT 2+4 blocks of width 128, T5
d_model 64, CLIP width 32 with the real vocabulary, the tiny autoencoder) and every run here uses the
same shapes (batch 2, 48x32 pixels, 2 steps, T5 length 16) in float32, so XLA compiles each jitted
piece once for the whole file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from permuquant_jax.assets import make_tiny_pipeline as mtp  # noqa: E402
from permuquant_jax.generate import cli  # noqa: E402
from permuquant_jax.generate import pipeline as pipeline_mod  # noqa: E402
from permuquant_jax.generate.pipeline import (  # noqa: E402
    FluxPipeline,
    builtin_prompts,
    calibration_text,
    embedded_pipeline_dir,
)
from permuquant_jax.generate.tokenizers import default_clip_tokenizer_path  # noqa: E402
from permuquant_jax.quant.flux_plan import load_text_embeddings  # noqa: E402

H, W, STEPS, SEQ, GUIDANCE = 32, 48, 2, 16, 3.5
PROMPTS = ["a red fox curled up asleep in fresh snow", 'a neon sign that says "OPEN" on a brick wall']
RUN = ["--steps", str(STEPS), "--height", str(H), "--width", str(W), "--max-seq-len", str(SEQ), "--batch", "2",
       "--dtype", "float32", "--no-progress"]


def _tiny_t5(d_model: int):
    cfg = transformers.T5Config(
        vocab_size=mtp.T5_VOCAB, d_model=d_model, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, layer_norm_epsilon=1e-6,
    )
    return transformers.T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def torch_one_thread():
    """One torch thread: the tiny models gain nothing from more, and CI's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory, torch_one_thread):
    """A tiny diffusers FluxPipeline (random torch weights, fp32) and the folder ``save_pretrained`` wrote."""
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    )
    with torch.no_grad():  # diffusers zero-initializes some outputs; give every parameter a signal
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    clip_dir = default_clip_tokenizer_path()
    tokenizer = transformers.CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"),
                                           model_max_length=77)
    tokenizer_2 = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(embedded_pipeline_dir() / "tokenizer_2" / "tokenizer.json"),
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512,
    )
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                                  text_encoder_2=_tiny_t5(64), tokenizer_2=tokenizer_2, transformer=transformer)
    out = tmp_path_factory.mktemp("tiny-flux") / "pipeline"
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe, out


@pytest.fixture(scope="module")
def pipeline_dir(diffusers_pipeline) -> Path:
    return diffusers_pipeline[1]


@pytest.fixture(scope="module")
def reference(diffusers_pipeline):
    """diffusers' FluxPipeline: (noise NHWC, final packed latents, decoded images in [0, 1])."""
    from permuquant_jax.models.sampling import pack_latents

    pipe = diffusers_pipeline[0]
    noise = np.random.default_rng(1).standard_normal((len(PROMPTS), H // 8, W // 8, 16)).astype(np.float32)
    packed = torch.from_numpy(np.array(pack_latents(jnp.asarray(noise))))
    final = {}

    def keep_latents(_pipe, i, _t, kw):
        final[i] = kw["latents"].clone()
        return {}

    with torch.no_grad():
        img = pipe(PROMPTS, latents=packed, output_type="np", height=H, width=W, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, max_sequence_length=SEQ, callback_on_step_end=keep_latents).images
    return noise, final[STEPS - 1].numpy().astype(np.float32), np.asarray(img, np.float32)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_matches_diffusers_pipeline(pipeline_dir, reference):
    noise, ref_latents, ref_images = reference
    pipe = FluxPipeline.from_pretrained(pipeline_dir, dtype=jnp.float32, max_seq_len=SEQ)
    assert pipe.schedule == dict(shift=True, base_shift=0.5, max_shift=1.15)
    txt, txt_ids, y = pipe.encode_prompts(PROMPTS)
    latents = pipe.sample(txt, txt_ids, y, jnp.asarray(noise), steps=STEPS, guidance=GUIDANCE)
    assert latents.shape == ref_latents.shape and latents.dtype == jnp.float32
    assert np.abs(ref_latents).max() > 0.1  # a real signal to compare
    assert _rel(latents, ref_latents) <= 1e-4
    images = (np.asarray(pipe.decode(latents, H, W)) + 1.0) / 2.0
    assert images.shape == ref_images.shape == (len(PROMPTS), H, W, 3)
    assert ref_images.std() > 0.01
    assert np.abs(images - ref_images).max() <= 1 / 255


def _pngs(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs if d.exists() for p in d.rglob("*.png"))


def test_embedded_generate_deterministic_png(tmp_path, capsys):
    from PIL import Image

    outs = [tmp_path / "a", tmp_path / "b"]
    for out, extra in zip(outs, ([], ["--release-text-encoders"]), strict=True):  # same images either way
        argv = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "7", "--out", str(out), *RUN, *extra]
        assert cli.main(argv) == 0
    summary = capsys.readouterr().out
    assert "time per step" in summary and "peak device memory" in summary and "text encoders released" in summary
    a, b = _pngs(outs[0]), _pngs(outs[1])
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b, strict=True))
    assert a[0].read_bytes() != a[1].read_bytes()
    with Image.open(a[1]) as im:
        assert im.size == (W, H) and im.mode == "RGB"
        meta = dict(im.text)
    assert meta["prompt"] == PROMPTS[1] and meta["seed"] == "8" and meta["steps"] == str(STEPS)
    params = json.loads(meta["parameters"])
    # the trained embedded DiT (caption dropout) defaults to true CFG at the scale in its metadata
    assert params["guidance"] == 3.0 and params["max_seq_len"] == SEQ
    # existing files are never replaced without --overwrite
    argv = ["--prompt", PROMPTS[0], "--seed", "7", "--out", str(outs[0]), *RUN]
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_export_calib_reads_back_in_convert(tmp_path):
    npz = tmp_path / "calib.npz"
    assert cli.main(["--export-calib", str(npz), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], *RUN]) == 0
    txt, y = load_text_embeddings(str(npz))
    cfg = mtp.tiny_dit_config()
    assert txt.shape == (2, SEQ, cfg.context_in_dim) and y.shape == (2, cfg.vec_in_dim)
    pipe = FluxPipeline.embedded(dtype=jnp.float32, max_seq_len=SEQ)
    ref_txt, _, ref_y = pipe.encode_prompts(PROMPTS)
    np.testing.assert_array_equal(txt, np.asarray(ref_txt))
    np.testing.assert_array_equal(y, np.asarray(ref_y))
    # the library call convert uses gives the same arrays from a path
    lib_txt, lib_y = calibration_text(embedded_pipeline_dir(), PROMPTS, SEQ, batch_size=2, dtype=jnp.float32)
    np.testing.assert_array_equal(lib_txt, txt)
    np.testing.assert_array_equal(lib_y, y)
    assert len(builtin_prompts()) >= 300


def _copy_without(src: Path, dst: Path, drop: str) -> Path:
    dst.mkdir()
    for child in src.iterdir():
        if child.name != drop:
            os.symlink(child, dst / child.name)
    return dst


def _bad_inputs(root: Path, pipeline_dir: Path) -> dict[str, tuple[list[str], str]]:
    cases: dict[str, tuple[list[str], str]] = {}
    cases["missing subfolder"] = (
        ["--model", str(_copy_without(pipeline_dir, root / "no-t5", "text_encoder_2"))], "text_encoder_2")
    d = _copy_without(pipeline_dir, root / "no-tokjson", "tokenizer_2")
    (d / "tokenizer_2").mkdir()
    (d / "tokenizer_2" / "spiece.model").write_bytes(b"\x00")
    cases["tokenizer without tokenizer.json"] = (["--model", str(d)], "tokenizer.json")
    d = _copy_without(pipeline_dir, root / "wide-t5", "text_encoder_2")
    _tiny_t5(48).save_pretrained(d / "text_encoder_2", safe_serialization=True)
    cases["wrong-width encoder"] = (["--model", str(d)], "width 48")
    cases["height not a multiple of 16"] = (["--height", "40"], "multiple of 16")
    cases["height beyond FLUX's range"] = (["--height", "8192"], "exceeds 4096")
    cases["attention larger than memory"] = (["--height", "4096", "--width", "4096"], "for attention on the CPU")
    blocker = root / "a-file"
    blocker.write_text("not a directory")
    cases["unwritable out"] = (["--out", str(blocker / "images")], str(blocker))
    return cases


def test_cli_bad_inputs_one_line_exit_2(tmp_path, pipeline_dir, capsys, monkeypatch):
    monkeypatch.delenv("PERMUQUANT_DEBUG", raising=False)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**20}  # a 4 GiB machine, whatever CI runs on
    monkeypatch.setattr(pipeline_mod.os, "sysconf", lambda name: pages[name])
    cases = _bad_inputs(tmp_path, pipeline_dir)
    capsys.readouterr()  # drop save_pretrained's progress output
    for k, (name, (extra, expect)) in enumerate(cases.items()):
        out = tmp_path / f"out-{k}"
        assert cli.main(["--prompt", "a fox", "--out", str(out), *RUN, *extra]) == 2, name
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err[-2000:])
        assert "Traceback" not in err and expect in lines[0], (name, lines[0])
        assert not out.exists(), f"{name}: a refused run left {out} behind"
    assert not _pngs(tmp_path)
    for bad in (["--bogus"], ["--steps", "x"]):  # argparse's own errors: one line too (as convert's)
        with pytest.raises(SystemExit) as e:
            cli.main(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), (bad, err)
        assert bad[-1] in err and "see --help" in err, err
    # the real entry point: same single line, exit code 2, from `python -m`
    argv = [sys.executable, "-m", "permuquant_jax.generate", "--prompt", "a fox", "--out", str(tmp_path / "o"),
            *RUN, *cases["missing subfolder"][0]]
    env = {k: v for k, v in os.environ.items() if k != "PERMUQUANT_DEBUG"}
    r = subprocess.run(argv, capture_output=True, text=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr[-2000:]
    assert "text_encoder_2" in r.stderr and not _pngs(tmp_path)


def test_embedded_assets_regenerate_bit_identical(tmp_path):
    out = mtp.write_tiny_pipeline(tmp_path / "tiny")
    shipped = embedded_pipeline_dir()
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) == 3  # clip_l, t5xxl_fp16, tokenizer_2/tokenizer.json (the DiT and AE are trained, not generated)
    for rel in files:
        assert (out / rel).read_bytes() == (shipped / rel).read_bytes(), f"{rel}: run assets/make_tiny_pipeline.py"
