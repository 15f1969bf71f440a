"""`python -m permuquant_jax.generate`: FLUX.1 text to image (float or quantized DiT), and calibration text."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  python -m permuquant_jax.generate --prompt "a red fox in the snow" --out images/     # the embedded tiny pipeline
  python -m permuquant_jax.generate --model FLUX.1-dev/ --prompt "a red fox" --out images/
  python -m permuquant_jax.generate --model FLUX.1-dev/ --quantized flux1-dev-nvfp4/ --release-text-encoders \\
      --prompts prompts.txt --out images/
  python -m permuquant_jax.generate --model flux1-dev.safetensors --ae ae.safetensors --clip clip_l.safetensors \\
      --t5 t5xxl_fp16.safetensors --tokenizers FLUX.1-dev/ --prompt "a red fox" --out images/
  python -m permuquant_jax.generate --model FLUX.1-dev/ --export-calib calib.npz   # built-in prompts -> convert --calib

--model is a diffusers FLUX pipeline folder (transformer/, text_encoder/, text_encoder_2/, vae/, tokenizer/,
tokenizer_2/) or a BFL transformer file with --ae, --clip, --t5 (tokenizers from --tokenizers DIR: its
tokenizer/ and tokenizer_2/, the CLIP one defaulting to the vocabulary shipped in the package). Without
--model the tiny pipeline embedded in the package runs: a DiT and autoencoder trained on captioned
64x64 scenes of coloured shapes ("a red circle above a blue square", "two green triangles"; see
permuquant_jax/train/tiny.py), read through random but fixed tiny T5/CLIP encoders. Its image size,
T5 length, steps and guidance default to what it was trained for (the DiT file's metadata); it is
not guidance-distilled, so --guidance is a true classifier-free guidance scale there (two DiT passes
a step; 1 turns it off).
Image i of a run uses seed --seed + i; its PNG holds the prompt, seed and settings in text chunks.
Set PERMUQUANT_DEBUG=1 to see tracebacks.
"""


class UsageError(ValueError):
    """Invalid command-line input."""


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m permuquant_jax.generate` (a bad flag ends with one `error: ...` line, exit 2,
    as convert's does)."""
    from permuquant_jax.convert.cli import _Parser

    p = _Parser(
        prog="python -m permuquant_jax.generate",
        description="Generate images with FLUX.1 in JAX (float or quantized DiT), or export the T5/CLIP "
        "embeddings of prompts for `python -m permuquant_jax.convert --calib`.",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    d = " (default: %(default)s)"
    p.add_argument("--model", metavar="PATH", help="diffusers FLUX pipeline folder or BFL transformer file; "
                   "omitted: the embedded tiny pipeline")
    p.add_argument("--ae", metavar="FILE", help="autoencoder (BFL ae.safetensors or a vae/ folder)")
    p.add_argument("--clip", metavar="FILE", help="CLIP text encoder (clip_l.safetensors or a text_encoder/ folder)")
    p.add_argument("--t5", metavar="FILE", help="T5 text encoder (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn."
                   "safetensors or a text_encoder_2/ folder)")
    p.add_argument("--tokenizers", metavar="DIR", help="folder with tokenizer/ (CLIP) and tokenizer_2/ (T5, "
                   "tokenizer.json), e.g. a FLUX.1 diffusers folder")
    p.add_argument("--quantized", metavar="DST", help="a quantized DiT directory from python -m "
                   "permuquant_jax.convert (encoders and autoencoder from --model)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="sampling steps (default: the trained DiT's, else 28 for guidance-distilled models such "
                   "as dev, 4 for schnell)")
    p.add_argument("--guidance", type=float, default=None, metavar="G",
                   help="guidance scale: guidance-distilled models (default 3.5), or classifier-free guidance for "
                   "DiTs trained with caption dropout (default: the trained one's, 3.0 for the embedded pipeline)")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i" + d)
    p.add_argument("--height", type=int, default=None, metavar="PX",
                   help="image height, a multiple of 16 (default: the size the DiT was trained at, 64 for the "
                   "embedded pipeline; else 1024)")
    p.add_argument("--width", type=int, default=None, metavar="PX",
                   help="image width, a multiple of 16 (default: as --height)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="prompts per batch (one compile per size)" + d)
    p.add_argument("--max-seq-len", type=int, default=None, metavar="L",
                   help="T5 prompt length in tokens (default: the trained DiT's, 24 for the embedded pipeline; "
                   "else 512 for dev, 256 for schnell, as BFL's code)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the float parts (encoders, autoencoder, float DiT)" + d)
    p.add_argument("--release-text-encoders", action="store_true",
                   help="encode every prompt first, free the text encoders, then load the DiT (lower peak memory)")
    p.add_argument("--tile", type=int, default=None, metavar="T",
                   help="decode the autoencoder in T x T latent tiles (large images; not bit-equal)")
    p.add_argument("--out", metavar="DIR", help="output folder for the PNGs (created if missing)")
    p.add_argument("--export-calib", metavar="FILE.npz",
                   help="write the T5/CLIP embeddings of the prompts (default: the built-in prompt set) as the "
                   ".npz that convert --calib reads")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs / .npz")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# --------------------------------------------------------------------------- checks at the door


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt (lowercase ASCII words joined by '-')."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:limit].strip("-")
    return out or "image"


def png_name(index: int, prompt: str, seed: int) -> str:
    """The file name of image ``index``: ``0003-a-red-fox-in-the-snow-s3.png``."""
    return f"{index:04d}-{slug(prompt)}-s{seed}.png"


def _check_out_dir(out: str, names: Sequence[str], overwrite: bool) -> Path:
    """Check that --out can take the images, creating nothing (a refused run leaves no empty folder)."""
    from permuquant_jax.convert.atomic import OutputError

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path}: exists and is not a directory")
    probe_dir = path
    while not probe_dir.exists():  # the nearest existing ancestor must let us create the folder
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"--out {path}: {probe_dir} is not a directory")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"--out {path}: the directory {probe_dir} is not writable")
    if not overwrite and path.is_dir():
        taken = [n for n in names if (path / n).exists()]
        if taken:
            more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
            raise OutputError(f"--out {path}: {taken[0]}{more} already exists; pass --overwrite to replace")
    return path


def _make_out_dir(path: Path) -> Path:
    """Create --out (after every check has passed) and prove it takes a file."""
    from permuquant_jax.convert.atomic import OutputError

    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".permuquant-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out {path}: cannot write there ({e.strerror or e})") from None
    return path


def _check_npz_target(target: str, overwrite: bool) -> Path:
    from permuquant_jax.convert.atomic import OutputError

    path = Path(target)
    if path.suffix != ".npz":
        raise UsageError(f"--export-calib {target}: the file name must end in .npz")
    if path.is_dir():
        raise OutputError(f"--export-calib {path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"--export-calib {path}: already exists; pass --overwrite to replace it")
    parent = path.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--export-calib {path}: the directory {parent} is missing or not writable")
    return path


def _validate(args: argparse.Namespace) -> None:
    for name in ("steps", "batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name} must be >= 1, found {v}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 16 or v % 16):
            raise UsageError(f"--{name} must be a positive multiple of 16, found {v}")
    if args.max_seq_len is not None and not 2 <= args.max_seq_len <= 4096:
        raise UsageError(f"--max-seq-len must lie in [2, 4096], found {args.max_seq_len}")
    if args.tile is not None and (args.tile < 2 or args.tile % 2):
        raise UsageError(f"--tile must be an even number >= 2 (latents), found {args.tile}")
    if args.guidance is not None and (not (args.guidance == args.guidance) or abs(args.guidance) == float("inf")):
        raise UsageError(f"--guidance must be a finite number, found {args.guidance}")
    if args.out is None and args.export_calib is None:
        raise UsageError("nothing to do: pass --out DIR (images) and/or --export-calib FILE.npz (embeddings)")
    if args.model is None and any(getattr(args, n) for n in ("ae", "clip", "t5")):
        raise UsageError("--ae, --clip and --t5 go with --model (a BFL transformer file); without --model the "
                         "embedded tiny pipeline runs")


def _prompts(args: argparse.Namespace) -> list[str] | None:
    from permuquant_jax.generate.pipeline import read_prompts

    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if any(not p.strip() for p in prompts):
        raise UsageError("--prompt must not be empty")
    return prompts or None


# --------------------------------------------------------------------------- writing


def png_metadata(settings: dict[str, Any]) -> Any:
    """PNG text chunks: one per setting, plus ``parameters`` (all of them as JSON)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in settings.items():
        info.add_itxt(k, str(v))
    info.add_itxt("parameters", json.dumps(settings, sort_keys=True, ensure_ascii=False))
    return info


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_png(path: Path, image: Any, settings: dict[str, Any], *, overwrite: bool) -> None:
    """Write a PNG atomically: a temporary file beside it, then a rename (no partial PNG ever)."""
    from PIL import Image

    from permuquant_jax.convert.atomic import OutputError

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=png_metadata(settings))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a PNG gets the usual permissions
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name was taken meanwhile: never overwrite
            except FileExistsError:
                raise OutputError(f"{path} appeared while generating; pass --overwrite to replace it") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise OutputError(f"{path} already exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import permuquant_jax
    from permuquant_jax.generate.pipeline import (
        FluxPipeline,
        builtin_prompts,
        calibration_text,
        peak_device_memory,
        resolve_source,
        save_calibration_npz,
    )

    t0 = time.perf_counter()
    _validate(args)
    prompts = _prompts(args)
    if args.out is not None and prompts is None:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    npz = _check_npz_target(args.export_calib, args.overwrite) if args.export_calib else None
    source = resolve_source(args.model, ae=args.ae, clip=args.clip, t5=args.t5, tokenizers=args.tokenizers,
                            quantized=args.quantized)
    progress = not args.no_progress
    dtype = jnp.dtype(args.dtype)
    pipe = FluxPipeline.from_source(source, dtype=dtype, max_seq_len=args.max_seq_len, progress=progress)
    size = pipe.default_size() if pipe.trained.get("image_size") else (256 if source.embedded else 1024)
    height, width = args.height or size, args.width or size
    pipe.check_size(height, width)
    steps = args.steps or pipe.default_steps()
    guidance = pipe.default_guidance() if args.guidance is None else args.guidance
    names: list[str] = []
    out = None
    if args.out is not None:
        names = [png_name(i, p, args.seed + i) for i, p in enumerate(prompts)]
        out = _check_out_dir(args.out, names, args.overwrite)

    pipe.load_text_encoders()  # width checks against the DiT before any long work
    if out is not None:
        pipe.check_memory(height, width, args.batch, guidance)
        _make_out_dir(out)
    rows: list[tuple[str, str]] = [("pipeline", source.description)]
    if npz is not None:
        calib_prompts = prompts or builtin_prompts()
        _say(f"encoding {len(calib_prompts)} prompts for calibration ...")
        txt, y = calibration_text(pipe, calib_prompts, batch_size=args.batch, progress=progress)
        save_calibration_npz(npz, txt, y, calib_prompts, half=dtype != jnp.float32, overwrite=args.overwrite)
        rows.append(("calibration text", f"{npz} (txt {list(txt.shape)}, y {list(y.shape)})"))

    if out is not None:
        base = dict(model=str(source.transformer or ""), quantized=str(source.quantized or ""),
                    steps=steps, guidance=guidance, height=height, width=width, max_seq_len=pipe.max_seq_len,
                    dtype=args.dtype, software=f"permuquant-jax {permuquant_jax.__version__}")
        if source.embedded:
            base["model"] = "embedded tiny pipeline"
        bar = tqdm(total=len(prompts), desc="generating", unit="img", disable=not progress)
        try:
            for i, prompt, seed, image in pipe.iter_images(
                prompts, height=height, width=width, steps=steps, guidance=guidance, seed=args.seed,
                batch=args.batch, release_text_encoders=args.release_text_encoders, tile=args.tile,
            ):
                settings = dict(prompt=prompt, seed=seed, **base)
                write_png(out / names[i], image, settings, overwrite=args.overwrite)
                bar.update(1)
        finally:
            bar.close()
        st = pipe.stats
        first, later = st.per_step()
        per_step = f"{first * 1e3:.1f} ms first batch (incl. compile)"
        if later is not None:
            per_step += f", {later * 1e3:.1f} ms later batches"
        cfg = f", classifier-free guidance {guidance:g}" if pipe.uses_cfg(guidance) else ""
        rows += [
            ("images", f"{len(prompts)} x {height}x{width}, {steps} steps{cfg}, batch {args.batch} -> {out}"),
            ("time per step", per_step),
            ("encode / denoise / decode", f"{st.encode_s:.2f} s / {sum(st.denoise_s):.2f} s / {st.decode_s:.2f} s"),
            ("loading weights", f"{st.load_s:.2f} s"),
        ]
        if args.release_text_encoders:
            rows.append(("text encoders released", _human(st.released_bytes)))
    peak = peak_device_memory()
    rows += [
        ("peak device memory", _human(peak) if peak is not None else f"not reported by {jax.default_backend()}"),
        ("total", f"{time.perf_counter() - t0:.1f} s"),
    ]
    width_ = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width_}}  {v}" for k, v in rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from permuquant_jax.convert.atomic import OutputError
    from permuquant_jax.convert.cli import enable_compile_cache
    from permuquant_jax.convert.safetensors_io import CheckpointError

    if argv is None:  # the process's own command line: reuse compiled programs across runs (as convert)
        enable_compile_cache()
    try:
        return run(args)
    except KeyboardInterrupt:
        _say("interrupted: images written so far are complete; no partial file was left")
        return 130
    except (CheckpointError, OutputError, UsageError, ValueError, OSError) as e:
        if os.environ.get("PERMUQUANT_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        _say(f"error: {msg}")
        return 2
