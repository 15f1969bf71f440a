"""Write the embedded tiny pipeline's text encoders and tokenizer deterministically (the files people
download, in miniature).

    python -m permuquant_jax.assets.make_tiny_pipeline [OUT_DIR] [--random-models]
    (default OUT_DIR: tiny_pipeline/ beside this file)

The shipped DiT and autoencoder (``flux1-tiny.safetensors``, ``ae.safetensors``) are TRAINED, by
``python -m permuquant_jax.train.tiny`` (its settings are in the DiT file's metadata, the command,
times and losses in ``benchmarks/results/quality_tiny_train.md``); they read the encoders written
here, so these must not change. ``--random-models`` also writes the random DiT and autoencoder that the
embedded pipeline held before it was trained (same architectures), e.g. for tests that need them.

Files, each in the layout of the real download:
- ``flux1-tiny.safetensors`` (trained, or random with --random-models): a FLUX DiT in BFL's key layout
  (bf16; the ``FluxConfig.tiny()`` architecture with text widths matching the tiny encoders:
  ``context_in_dim`` 64, ``vec_in_dim`` 32);
- ``ae.safetensors`` (trained, or random with --random-models): the autoencoder in BFL's
  ``ae.safetensors`` key layout (bf16 to stay small, ``AutoEncoderConfig.tiny()``: 8x downscale, 16
  latent channels);
- ``clip_l.safetensors``: a CLIP text encoder as ComfyUI keeps it (``text_model.`` keys, fp16; width
  32 with 2 heads, stated in the metadata ``permuquant.clip_config``; the real 49408-token vocabulary, so
  it reads the shipped ``clip_tokenizer/``);
- ``t5xxl_fp16.safetensors``: a T5 v1.1 encoder as ComfyUI keeps it (``encoder.`` keys + ``shared.weight``,
  fp16; d_model 64);
- ``tokenizer_2/tokenizer.json``: a T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
  Metaspace, ``... </s>``) trained with the ``tokenizers`` library on the built-in prompt set.

Written weights are random (seeded numpy): matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm scales
~ 1 + N(0, 0.1^2), embeddings ~ N(0, 1). The same seed always gives the same bytes (the Unigram
scores are rounded to 6 decimals: the trainer's float sums vary in the last bits between runs).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from permuquant_jax.assets.make_tiny import tiny_tensors
from permuquant_jax.convert.checkpoint import CONFIG_METADATA_KEY
from permuquant_jax.convert.encoders import CLIP_CONFIG_METADATA_KEY
from permuquant_jax.models.flux import FluxConfig

SEED = 20251201
DIT_FILE = "flux1-tiny.safetensors"
AE_FILE = "ae.safetensors"
CLIP_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl_fp16.safetensors"
CALIBRATION_FILE = "calibration_prompts.txt"  # training-grammar captions (train.data.calibration_captions)
T5_TOKENIZER_DIR = "tokenizer_2"

CLIP_VOCAB = 49408  # OpenAI's CLIP BPE vocabulary (assets/clip_tokenizer)
CLIP_POSITIONS = 77
TINY_CLIP = dict(hidden=32, heads=2, layers=2, intermediate=64)
TINY_T5 = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_buckets=32)
T5_VOCAB = 1000
# BFL's AutoEncoderParams of the tiny autoencoder (= models.autoencoder.AutoEncoderConfig.tiny()).
TINY_AE = dict(in_channels=3, ch=32, out_ch=3, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)


def tiny_dit_config() -> FluxConfig:
    """The embedded pipeline's DiT: ``FluxConfig.tiny()`` reading the tiny encoders' widths."""
    return dataclasses.replace(FluxConfig.tiny(), context_in_dim=TINY_T5["d_model"], vec_in_dim=TINY_CLIP["hidden"])


class _Init:
    """Seeded initial values by tensor kind, drawn in the order tensors are requested."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def matrix(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def bias(self, n: int) -> np.ndarray:
        return (0.02 * self.rng.standard_normal(n)).astype(np.float32)

    def scale(self, n: int) -> np.ndarray:
        return (1.0 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def embedding(self, shape: tuple[int, ...], std: float = 1.0) -> np.ndarray:
        return (std * self.rng.standard_normal(shape)).astype(np.float32)


def clip_tensors(seed: int = SEED + 1) -> dict[str, np.ndarray]:
    """A tiny CLIP text encoder in transformers' ``CLIPTextModel`` names with ComfyUI's ``text_model.`` prefix."""
    init, c = _Init(seed), TINY_CLIP
    w, f = c["hidden"], c["intermediate"]
    out = {
        "text_model.embeddings.token_embedding.weight": init.embedding((CLIP_VOCAB, w), 0.02 * 10),
        "text_model.embeddings.position_embedding.weight": init.embedding((CLIP_POSITIONS, w), 0.1),
    }
    for i in range(c["layers"]):
        p = f"text_model.encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[p + n + ".weight"], out[p + n + ".bias"] = init.scale(w), init.bias(w)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{n}.weight"], out[p + f"self_attn.{n}.bias"] = init.matrix((w, w), w), init.bias(w)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = init.matrix((f, w), w), init.bias(f)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = init.matrix((w, f), f), init.bias(w)
    out["text_model.final_layer_norm.weight"] = init.scale(w)
    out["text_model.final_layer_norm.bias"] = init.bias(w)
    return {k: v.astype(np.float16) for k, v in out.items()}


def t5_tensors(vocab_size: int, seed: int = SEED + 2) -> dict[str, np.ndarray]:
    """A tiny T5 v1.1 encoder in transformers' ``T5EncoderModel`` names (ComfyUI's t5xxl file: ``shared.weight``)."""
    init, c = _Init(seed), TINY_T5
    d, inner, ff = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"]
    out = {"shared.weight": init.embedding((vocab_size, d))}
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer."
        for n in ("q", "k", "v"):
            out[p + f"0.SelfAttention.{n}.weight"] = init.matrix((inner, d), d)
        out[p + "0.SelfAttention.o.weight"] = init.matrix((d, inner), inner)
        if i == 0:
            out[p + "0.SelfAttention.relative_attention_bias.weight"] = init.embedding(
                (c["num_buckets"], c["num_heads"]), 0.5
            )
        out[p + "0.layer_norm.weight"] = init.scale(d)
        out[p + "1.DenseReluDense.wi_0.weight"] = init.matrix((ff, d), d)
        out[p + "1.DenseReluDense.wi_1.weight"] = init.matrix((ff, d), d)
        out[p + "1.DenseReluDense.wo.weight"] = init.matrix((d, ff), ff)
        out[p + "1.layer_norm.weight"] = init.scale(d)
    out["encoder.final_layer_norm.weight"] = init.scale(d)
    return {k: v.astype(np.float16) for k, v in out.items()}


def ae_tensors(seed: int = SEED + 3) -> dict[str, np.ndarray]:
    """A tiny FLUX autoencoder in BFL's ``ae.safetensors`` key layout (convs OIHW, attention as 1x1 convs)."""
    init, c = _Init(seed), TINY_AE
    out: dict[str, np.ndarray] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        out[name + ".weight"] = init.matrix((cout, cin, k, k), cin * k * k)
        out[name + ".bias"] = init.bias(cout)

    def norm(name: str, ch: int) -> None:
        out[name + ".weight"], out[name + ".bias"] = init.scale(ch), init.bias(ch)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def mid(name: str, ch: int) -> None:
        resnet(name + ".block_1", ch, ch)
        norm(name + ".attn_1.norm", ch)
        for n in ("q", "k", "v", "proj_out"):
            conv(name + f".attn_1.{n}", ch, ch, 1)
        resnet(name + ".block_2", ch, ch)

    ch, mult, nres, z = c["ch"], c["ch_mult"], c["num_res_blocks"], c["z_channels"]
    conv("encoder.conv_in", c["in_channels"], ch, 3)
    block_in = ch
    for i, m in enumerate(mult):
        block_out = ch * m
        for j in range(nres):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder.mid", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * z, 3)

    block_in = ch * mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    mid("decoder.mid", block_in)
    for i in reversed(range(len(mult))):
        block_out = ch * mult[i]
        for j in range(nres + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, c["out_ch"], 3)
    return {k: v.astype(ml_dtypes.bfloat16) for k, v in out.items()}


def train_t5_tokenizer(prompts: list[str], vocab_size: int = T5_VOCAB) -> str:
    """A T5-style Unigram ``tokenizer.json`` (as a string) trained on ``prompts``; deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        max_piece_length=16, show_progress=False,
    )
    tok.train_from_iterator(prompts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    data = json.loads(tok.to_str())
    # The trainer appends the characters that no kept piece covers with scores just below the lowest,
    # in an order that varies between runs: give them one shared score. Then fix the order (specials
    # first, then by score and text); the EM scores themselves agree to ~1e-11 between runs.
    vocab = [[piece, round(score, 6)] for piece, score in data["model"]["vocab"]]
    specials, rest = vocab[:3], vocab[3:]
    lowest, n_chars = min(sc for _, sc in rest), sum(len(pc) == 1 for pc, _ in rest)
    tail = [ps for ps in rest if ps[1] <= lowest + 1e-4 * (n_chars + 1)]  # the trainer spaces them by 1e-4
    for ps in tail:
        ps[1] = round(lowest, 3)
    rest = sorted(rest, key=lambda ps: (-ps[1], ps[0]))
    data["model"]["vocab"] = specials + rest
    ids = {piece: i for i, (piece, _) in enumerate(data["model"]["vocab"])}
    if (ids.get("<pad>"), ids.get("</s>"), ids.get("<unk>")) != (0, 1, 2):
        raise AssertionError(f"T5 special tokens must be <pad>=0, </s>=1, <unk>=2, got {ids.get('<pad>')}, "
                             f"{ids.get('</s>')}, {ids.get('<unk>')}")
    return json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True)


def builtin_prompts() -> list[str]:
    """The built-in prompt set (``generate/prompts.txt``), one prompt a line."""
    path = Path(__file__).resolve().parent.parent / "generate" / "prompts.txt"
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def write_tiny_pipeline(out: str | Path, seed: int = SEED, *, random_models: bool = False) -> Path:
    """Write the embedded pipeline's encoders and T5 tokenizer into ``out`` (with ``random_models`` also
    a random DiT and autoencoder; the shipped ones are trained: ``permuquant_jax.train.tiny``); returns it."""
    out = Path(out)
    (out / T5_TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    tok_json = train_t5_tokenizer(builtin_prompts())
    (out / T5_TOKENIZER_DIR / "tokenizer.json").write_text(tok_json + "\n", encoding="utf-8")
    vocab = len(json.loads(tok_json)["model"]["vocab"])

    if random_models:
        cfg = tiny_dit_config()
        meta = {CONFIG_METADATA_KEY: json.dumps({**cfg.to_dict(), "seed": seed}, sort_keys=True)}
        save_file(tiny_tensors(seed, cfg), str(out / DIT_FILE), metadata=meta)
        save_file(ae_tensors(seed + 3), str(out / AE_FILE))
    # CLIP's head count cannot be read off the shapes (width 32 is not a multiple of 64): say it.
    clip_meta = {CLIP_CONFIG_METADATA_KEY: json.dumps(
        dict(vocab_size=CLIP_VOCAB, hidden=TINY_CLIP["hidden"], heads=TINY_CLIP["heads"], layers=TINY_CLIP["layers"],
             intermediate=TINY_CLIP["intermediate"], max_position=CLIP_POSITIONS), sort_keys=True)}
    save_file(clip_tensors(seed + 1), str(out / CLIP_FILE), metadata=clip_meta)
    save_file(t5_tensors(vocab, seed + 2), str(out / T5_FILE))
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--random-models"]
    target = Path(args[0]) if args else Path(__file__).with_name("tiny_pipeline")
    d = write_tiny_pipeline(target, random_models="--random-models" in sys.argv[1:])
    for p in sorted(d.rglob("*")):
        if p.is_file():
            print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
