"""Train the tiny FLUX pipeline on captioned scenes and write it in the embedded pipeline's layout.

    python -m permuquant_jax.train.tiny --out /tmp/trained_tiny/run [--ae-steps N] [--steps N] ...

The defaults are the recipe of the shipped embedded pipeline (a few minutes on one GPU; hours on a
CPU: pass small --steps / --ae-steps / --num-images / --batch there).

1. scenes: ``train.data`` (coloured shapes with captions, 64x64 by default, deterministic from --seed);
2. the autoencoder (``AutoEncoderConfig.tiny()``: FLUX's architecture at width 32, 16 latent channels)
   trained on them, written as ``ae.safetensors`` (BFL layout) and read back from that file;
3. the captions encoded once by the embedded pipeline's fixed random T5 and CLIP encoders (loaded by
   ``generate.pipeline.FluxPipeline`` as ``generate`` loads them, in --text-dtype, T5 length
   --max-seq-len);
4. the DiT (``FluxConfig.tiny()`` widths reading the tiny encoders, without the guidance embedder:
   nothing here is guidance-distilled) trained with the rectified-flow objective on the latents, with
   caption dropout (--drop-text: the empty prompt, for classifier-free guidance) and an exponential
   moving average of the weights (--ema, the weights written), as ``flux1-tiny.safetensors`` (BFL
   layout, bf16; its metadata's ``trained`` entry holds the image size, T5 length, sampling steps and
   guidance scale that ``generate`` takes as defaults), and ``calibration_prompts.txt`` (training-grammar
   captions that are not quality-table prompts, for ``convert``'s calibration);
5. the encoders and ``tokenizer_2/`` copied from the embedded pipeline, so the folder has the same
   files as ``assets/tiny_pipeline/`` (--no-encoder-copy: only the trained files; the samples then read
   the embedded encoders); ``train_log.json`` (settings, losses, times), ``losses.png``, ``data.png``
   (training scenes) and ``samples.png`` / ``samples_nocfg.png`` (the pipeline run from the written
   files at --cfg-scale and at 1.0, i.e. without guidance) beside them.

--budget-s is a safety stop for runs under a hard time limit: each training phase stops early (at a
multiple of 50 steps, recorded in ``train_log.json`` as ``ae_steps_run`` / ``dit_steps_run``) when
the run would not otherwise finish in time; the result is then not the full schedule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from permuquant_jax.models.autoencoder import AutoEncoderConfig
from permuquant_jax.models.flux import FluxConfig

DIT_FILE, AE_FILE, CLIP_FILE, T5_FILE, T5_TOKENIZER_DIR = (
    "flux1-tiny.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "tokenizer_2")
CALIBRATION_FILE = "calibration_prompts.txt"  # as assets.make_tiny_pipeline.CALIBRATION_FILE (a test checks)
SAMPLE_PROMPTS = (
    "a red circle", "a blue square", "a green triangle", "a yellow circle",
    "two red squares", "three blue circles", "two green triangles", "three yellow squares",
    "a red circle above a blue square", "a blue triangle below a yellow circle",
    "a green square to the left of a red triangle", "a yellow triangle to the right of a blue circle",
    "a big red square", "a small green circle", "a red triangle above a green circle", "two blue triangles",
)


def trained_dit_config(text_width: int = 64, clip_width: int = 32) -> FluxConfig:
    """The trained DiT: ``FluxConfig.tiny()`` (width 128, 2 heads of 64, 2 double + 4 single blocks, RoPE
    8/28/28, 64 latent channels in and out) reading the tiny encoders' widths, no guidance embedder."""
    return dataclasses.replace(FluxConfig.tiny(), context_in_dim=text_width, vec_in_dim=clip_width,
                               guidance_embed=False)


def encode_captions(pipe, captions: Sequence[str], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(txt ``[C, L, T5 width]``, y ``[C, CLIP width]``) float32 of ``captions`` through ``pipe``'s encoders."""
    txts, ys = [], []
    for i in range(0, len(captions), batch):
        chunk = list(captions[i : i + batch])
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        txt, _, y = pipe.encode_prompts(padded)
        txts.append(np.asarray(txt, np.float32)[: len(chunk)])
        ys.append(np.asarray(y, np.float32)[: len(chunk)])
    return np.concatenate(txts), np.concatenate(ys)


def write_grid(images: np.ndarray, path: Path, cols: int = 4, scale: int = 4) -> None:
    """uint8 images ``[N, H, W, 3]`` -> one PNG grid (nearest-neighbour upscaled by ``scale``)."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def write_loss_plot(curves: dict[str, list[float]], path: Path, width: int = 360, height: int = 240) -> None:
    """Loss curves (running mean over 25 steps, log10 axis, min/max labelled) side by side as a PNG (PIL only)."""
    from PIL import Image, ImageDraw

    panels = []
    for name, losses in curves.items():
        x = np.asarray(losses, np.float64)
        k = max(1, min(25, len(x)))
        smooth = np.log10(np.maximum(np.convolve(x, np.ones(k) / k, mode="valid"), 1e-12))
        img = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(img)
        left, top, right, bottom = 50, 20, width - 10, height - 25
        d.rectangle([left, top, right, bottom], outline="black")
        lo, hi = float(smooth.min()), float(smooth.max())
        span = hi - lo or 1.0
        pts = [(left + (right - left) * i / max(len(smooth) - 1, 1), bottom - (bottom - top) * (v - lo) / span)
               for i, v in enumerate(smooth)]
        d.line(pts, fill=(30, 70, 220), width=2)
        d.text((left, 4), f"{name} loss (log scale, mean of {k})", fill="black")
        d.text((2, top), f"{10 ** hi:.3g}", fill="black")
        d.text((2, bottom - 10), f"{10 ** lo:.3g}", fill="black")
        d.text((left, bottom + 6), "step 0", fill="black")
        d.text((right - 60, bottom + 6), f"step {len(x)}", fill="black")
        panels.append(img)
    out = Image.new("RGB", (width * len(panels), height), "white")
    for i, img in enumerate(panels):
        out.paste(img, (i * width, 0))
    out.save(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m permuquant_jax.train.tiny", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (the embedded pipeline's layout)")
    p.add_argument("--steps", type=int, default=15000, help="DiT training steps (default: %(default)s)")
    p.add_argument("--ae-steps", type=int, default=3000, help="autoencoder training steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="DiT batch size (default: %(default)s)")
    p.add_argument("--ae-batch", type=int, default=64, help="autoencoder batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="DiT peak learning rate (default: %(default)s)")
    p.add_argument("--ae-lr", type=float, default=1e-3, help="autoencoder peak learning rate (default: %(default)s)")
    p.add_argument("--ema", type=float, default=0.999,
                   help="DiT weight averaging decay, 0: none (default: %(default)s)")
    p.add_argument("--drop-text", type=float, default=0.1,
                   help="fraction of captions replaced by the empty prompt (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=3.0,
                   help="classifier-free guidance scale recorded as generate's default and used for samples.png; "
                   "needs --drop-text > 0 (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels, a multiple of 16 (default: %(default)s)")
    p.add_argument("--num-images", type=int, default=12288, help="training scenes (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=24, help="T5 prompt length (default: %(default)s)")
    p.add_argument("--text-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype the encoders run in for the training captions (generate's default: bfloat16)")
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps for samples.png (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of both trainings (default: 0)")
    p.add_argument("--ae", metavar="FILE", help="reuse a trained ae.safetensors instead of training one")
    p.add_argument("--log-every", type=int, default=500, help="log line every N steps (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="safety stop: the whole run's wall-clock limit in seconds (see above; default: none)")
    p.add_argument("--no-encoder-copy", action="store_true",
                   help="write only the trained files (not the embedded encoders and tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from permuquant_jax.convert.ae import load_autoencoder
    from permuquant_jax.generate.pipeline import FluxPipeline, embedded_pipeline_dir
    from permuquant_jax.train.autoencoder import AELossConfig, encode_all, train_autoencoder
    from permuquant_jax.train.data import all_captions, calibration_prompts_text, make_dataset
    from permuquant_jax.train.export import save_autoencoder, save_dit
    from permuquant_jax.train.flow import FlowConfig, FlowData, train_dit
    from permuquant_jax.train.loop import OptimConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t0 = time.perf_counter()
    images, captions, _ = make_dataset(args.num_images, args.seed, args.size)
    times["data_s"] = time.perf_counter() - t0
    log(f"{len(images)} scenes {args.size}x{args.size} ({times['data_s']:.0f} s)")

    ae_cfg = AutoEncoderConfig.tiny()
    ae_optim = OptimConfig(steps=args.ae_steps, lr=args.ae_lr, seed=args.seed)
    ae_losses: list[float] = []
    t0 = time.perf_counter()
    if args.ae:
        shutil.copyfile(args.ae, out / AE_FILE)
    else:
        ae_model, ae_losses = train_autoencoder(images, ae_cfg, ae_optim, AELossConfig(batch_size=args.ae_batch),
                                                progress=progress, log=log, log_every=args.log_every,
                                                max_seconds=_left(args.budget_s, t_all, 0.35))
        save_autoencoder(ae_model, out / AE_FILE)
        del ae_model
    times["ae_s"] = time.perf_counter() - t0
    ae = load_autoencoder(out / AE_FILE, dtype=jnp.float32)  # the stored (bf16) weights, as generate reads them
    latents = encode_all(ae, images)
    rec_err = _reconstruction_error(ae, images[:256], latents[:256])
    log(f"autoencoder: {times['ae_s']:.0f} s; latents mean {latents.mean():.3f} std {latents.std():.3f}; "
        f"reconstruction mean |err| {rec_err:.4f} (of 2)")

    src = embedded_pipeline_dir()
    enc = src if args.no_encoder_copy else out
    if not args.no_encoder_copy:
        for name in (CLIP_FILE, T5_FILE):
            shutil.copyfile(src / name, out / name)
        shutil.copytree(src / T5_TOKENIZER_DIR, out / T5_TOKENIZER_DIR, dirs_exist_ok=True)
    text_dtype = jnp.dtype(args.text_dtype)
    pipe = FluxPipeline.from_pretrained(None, dtype=text_dtype, max_seq_len=args.max_seq_len)
    vocab = all_captions() + [""]
    txt, y = encode_captions(pipe, vocab)
    pipe.release_text_encoders()
    index = {c: i for i, c in enumerate(vocab)}
    caption_ids = np.asarray([index[c] for c in captions], np.int32)

    from permuquant_jax.models.sampling import pack_latents

    packed = np.asarray(pack_latents(jnp.asarray(latents)))
    data = FlowData(latents=packed, caption_ids=caption_ids, txt=txt, y=y, empty=index[""],
                    latent_hw=(latents.shape[1], latents.shape[2]))
    dit_cfg = trained_dit_config(txt.shape[-1], y.shape[-1])
    dit_optim = OptimConfig(steps=args.steps, lr=args.lr, seed=args.seed, ema=args.ema)
    flow_cfg = FlowConfig(batch_size=args.batch, drop_text=args.drop_text)
    t0 = time.perf_counter()
    dit, dit_losses = train_dit(data, dit_cfg, dit_optim, flow_cfg, progress=progress, log=log,
                                log_every=args.log_every, max_seconds=_left(args.budget_s, t_all, 0.8))
    times["dit_s"] = time.perf_counter() - t0
    train_info = dict(image_size=args.size, max_seq_len=args.max_seq_len, sample_steps=args.sample_steps,
                      dit_steps=args.steps, dit_steps_run=len(dit_losses), ae_steps=args.ae_steps,
                      ae_steps_run=len(ae_losses) if ae_losses else None, seed=args.seed, ema=args.ema,
                      drop_text=args.drop_text, scenes=args.num_images)
    if args.drop_text > 0:
        train_info["cfg_scale"] = args.cfg_scale
    save_dit(dit, out / DIT_FILE, extra={"trained": train_info})
    (out / CALIBRATION_FILE).write_text(calibration_prompts_text())  # what convert calibrates this DiT on
    log(f"DiT: {times['dit_s']:.0f} s; final loss (mean of last 100) {np.mean(dit_losses[-100:]):.4f}")

    t0 = time.perf_counter()
    gen = FluxPipeline.from_pretrained(out / DIT_FILE, ae=out / AE_FILE, clip=enc / CLIP_FILE, t5=enc / T5_FILE,
                                       tokenizers=enc)
    for name, scale in (("samples.png", args.cfg_scale if args.drop_text > 0 else 1.0), ("samples_nocfg.png", 1.0)):
        samples = gen.generate(list(SAMPLE_PROMPTS), seed=0, batch=len(SAMPLE_PROMPTS), guidance=scale)
        write_grid(samples, out / name)
    write_grid(images[:16], out / "data.png")
    times["sample_s"] = time.perf_counter() - t0
    curves = {"autoencoder": ae_losses, "dit": dit_losses} if ae_losses else {"dit": dit_losses}
    write_loss_plot(curves, out / "losses.png")
    times["total_s"] = time.perf_counter() - t_all
    record = dict(
        command="python -m permuquant_jax.train.tiny " + " ".join(sys.argv[1:] if argv is None else argv),
        settings=vars(args), trained=train_info, ae_config=ae_cfg.to_dict(), dit_config=dit_cfg.to_dict(),
        ae_optim=dataclasses.asdict(ae_optim), dit_optim=dataclasses.asdict(dit_optim),
        flow=dataclasses.asdict(flow_cfg), times=times, reconstruction_mean_abs_err=rec_err,
        latent_mean=float(latents.mean()), latent_std=float(latents.std()),
        sample_prompts=list(SAMPLE_PROMPTS), ae_losses=ae_losses, dit_losses=dit_losses,
        files={p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))},
    )
    (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out} ({times['total_s']:.0f} s): " + ", ".join(f"{k} {v / 1e6:.2f} MB"
                                                            for k, v in record["files"].items()))
    import jax

    rows = [
        ("device", f"{jax.devices()[0].device_kind} (jax {jax.__version__})"),
        ("scenes", f"{len(images)} x {args.size}x{args.size} ({times['data_s']:.0f} s)"),
        ("autoencoder", f"{train_info['ae_steps_run']} / {args.ae_steps} steps, batch {args.ae_batch}, "
                        f"{times['ae_s']:.0f} s, reconstruction mean |err| {rec_err:.4f}"
         if ae_losses else f"reused {args.ae}"),
        ("DiT", f"{len(dit_losses)} / {args.steps} steps, batch {args.batch}, {times['dit_s']:.0f} s, "
                f"loss first/last 100 {np.mean(dit_losses[:100]):.4f} / {np.mean(dit_losses[-100:]):.4f}"),
        ("samples", f"{times['sample_s']:.0f} s (cfg {train_info.get('cfg_scale', 1.0)} and 1.0)"),
        ("total", f"{times['total_s']:.0f} s"),
    ]
    print("\n".join(f"{k:<12} {v}" for k, v in rows), flush=True)
    return 0


def _left(budget_s: float | None, t_start: float, frac: float) -> float | None:
    """Seconds a phase may still run so that it ends by ``frac`` of the budget (None: no budget)."""
    if budget_s is None:
        return None
    return max(1.0, frac * budget_s - (time.perf_counter() - t_start))


def _reconstruction_error(ae, images: np.ndarray, latents: np.ndarray) -> float:
    from permuquant_jax.train.autoencoder import decode_latents

    rec = np.asarray(decode_latents(ae, jnp.asarray(latents)))
    return float(np.mean(np.abs(rec - (images.astype(np.float32) / 127.5 - 1.0))))


if __name__ == "__main__":
    raise SystemExit(main())
