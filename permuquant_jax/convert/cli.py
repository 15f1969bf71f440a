"""`python -m permuquant_jax.convert`: FLUX.1 checkpoint -> calibrated, permuted, quantized model directory."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  python -m permuquant_jax.convert --out flux-tiny-nvfp4            # the embedded tiny model
  python -m permuquant_jax.convert flux1-dev.safetensors --calib prompts.npz --out flux1-dev-nvfp4
  python -m permuquant_jax.convert FLUX.1-dev/ --calib prompts.npz --dry-run

SRC is a Black Forest Labs single file (flux1-dev.safetensors, flux1-schnell.safetensors), a diffusers
transformer/ folder or a full diffusers pipeline folder. --calib takes an .npz with 'txt' [N, S, 4096]
(T5 embeddings) and 'y' [N, 768] (CLIP pooled vectors). Set PERMUQUANT_DEBUG=1 to see tracebacks.
"""

METHODS = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h")
TOY_PARAMS = 100_000_000  # below this, synthetic calibration is allowed (the embedded tiny model)


class UsageError(ValueError):
    """Invalid combination of command-line options."""


def build_parser() -> argparse.ArgumentParser:
    from permuquant_jax.quant.flux_plan import FLUX_KEEP

    p = argparse.ArgumentParser(
        prog="python -m permuquant_jax.convert",
        description="Import a FLUX.1 checkpoint, calibrate it on sampling trajectories, choose channel "
        "permutations (PermuQuant) and write a quantized model directory (orbax checkpoint + permuquant.json).",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    d = " (default: %(default)s)"
    p.add_argument("src", nargs="?", default=None, metavar="SRC",
                   help="checkpoint file or folder; omitted: the tiny FLUX-architecture model shipped in the package")
    p.add_argument("--out", metavar="DST", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--format", default="nvfp4", help="quantization format, a registry name such as nvfp4, "
                   "nvfp4-w4a16, mxfp4, int4-g64, int3-g64-w3a3" + d)
    p.add_argument("--method", default="permuquant", choices=METHODS, help="quantization method" + d)
    p.add_argument("--alpha", default="0,0.25,0.5,0.75,1", metavar="A[,A...]",
                   help="PermuQuant candidate alphas of the joint criterion, comma-separated" + d)
    p.add_argument("--tau", type=float, default=0.0,
                   help="accept a permutation only if it lowers the calibration error by more than this "
                   "fraction" + d)
    p.add_argument("--calib", metavar="NPZ|synthetic", default=None,
                   help="text conditioning for calibration: an .npz with 'txt' and 'y', or 'synthetic' "
                   "(random embeddings, toy models only); default: synthetic for toy models, required otherwise")
    p.add_argument("--calib-samples", type=int, default=4, metavar="N",
                   help="number of sampling trajectories (prompts x seeds) used for calibration" + d)
    p.add_argument("--heldout-samples", type=int, default=1, metavar="N",
                   help="extra trajectories kept apart to report the quantized model's output error" + d)
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="sampling steps of the trajectories (default: 50 for guidance-distilled models "
                   "such as FLUX.1-dev, 4 otherwise)")
    p.add_argument("--timesteps", type=int, default=8, metavar="N",
                   help="timesteps per trajectory at which DiT inputs are recorded, spread over the "
                   "schedule" + d)
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="calibration image size in pixels, square (default: 1024; 256 for toy models)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale for guidance-distilled models" + d)
    p.add_argument("--hadamard-block", type=int, default=64, metavar="B",
                   help="block size of the Hadamard rotation (methods hadamard, permuquant-h)" + d)
    p.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant migration strength" + d)
    p.add_argument("--act-scale", default="static", choices=("static", "dynamic"),
                   help="activation global scale: calibrated once (static) or computed per call" + d)
    p.add_argument("--keep-bf16", nargs="*", default=list(FLUX_KEEP), metavar="PATTERN",
                   help="module-path patterns (fnmatch, or re:REGEX) left in 16 bits (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the float model and of the unquantized parts" + d)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and synthetic text" + d)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (layers, sites, bytes before/after) and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _parse_alphas(text: str) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise UsageError(f"--alpha must be comma-separated numbers in [0, 1], found {text!r}") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise UsageError(f"--alpha values must lie in [0, 1], found {text!r}")
    return alphas


def _validate(args: argparse.Namespace) -> None:
    from permuquant_jax.formats.registry import get_format

    if not args.dry_run and not args.out:
        raise UsageError("--out DST is required (or use --dry-run to only print the plan)")
    get_format(args.format)  # raises with the list of known names
    for name in ("calib_samples", "timesteps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.heldout_samples < 0:
        raise UsageError(f"--heldout-samples must be >= 0, found {args.heldout_samples}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, found {args.steps}")
    if args.resolution is not None and (args.resolution < 16 or args.resolution % 16):
        raise UsageError(f"--resolution must be a positive multiple of 16, found {args.resolution}")
    if args.tau < 0:
        raise UsageError(f"--tau must be >= 0, found {args.tau}")
    if args.calib not in (None, "synthetic") and not Path(args.calib).is_file():
        raise UsageError(f"--calib {args.calib}: no such file (expected an .npz with 'txt' and 'y', or 'synthetic')")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def param_bytes(model: Any) -> int:
    """Bytes of every `nnx.Param` of `model` (works on abstract models too)."""
    import numpy as np
    from flax import nnx

    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        if v is not None:
            total += int(v.size) * np.dtype(v.dtype).itemsize
    return total


def dry_run_plan(model: Any, *, method: str, format: str, keep: Sequence[str]) -> dict[str, Any]:
    """`quant.plan_summary` for the FLUX site plan, with the whole model's parameter bytes before/after."""
    from permuquant_jax.quant import flux_sites, plan_summary

    sites = flux_sites(model) if method in ("permuquant", "permuquant-h") else []
    plan = plan_summary(model, sites=sites, keep=keep, format=format)
    if not sites:
        plan["sites"] = []
    before = param_bytes(model)
    plan["model_bytes_before"] = before
    plan["model_bytes_after"] = before - plan["bytes_before"] + plan["bytes_after"]
    return plan


def _dry_run(model: Any, args: argparse.Namespace, src_desc: str) -> int:
    from permuquant_jax.formats.registry import get_format

    fmt = get_format(args.format)
    plan = dry_run_plan(model, method=args.method, format=args.format, keep=args.keep_bf16)
    quant = [lay for lay in plan["layers"] if not lay["keep"]]
    kept = [lay for lay in plan["layers"] if lay["keep"]]
    print(f"source: {src_desc}")
    print(f"method {args.method}, format {fmt.name} ({fmt.bits_per_weight:g} bits per weight)")
    print(f"quantized linears ({len(quant)}; a stacked one holds one linear per block):")
    for lay in quant:
        stack = "x".join(map(str, lay["stack"])) + " x " if lay["stack"] else ""
        print(f"  {lay['path']:40s} {stack}{lay['in_features']} -> {lay['out_features']}  "
              f"{_human(lay['bytes_before'])} -> {_human(lay['bytes_after'])}")
    print(f"kept in {args.dtype} ({len(kept)}): " + ", ".join(lay["path"] for lay in kept))
    if plan["sites"]:
        print(f"permutation sites ({len(plan['sites'])}; each holds one permutation per stacked block):")
        for site in plan["sites"]:
            print(f"  {site['name']:26s} {site['kind']:7s} size {site['size']:<6d} x{site['layers']:<3d} "
                  f"-> {', '.join(site['consumers'])}")
    b0, b1 = plan["model_bytes_before"], plan["model_bytes_after"]
    print(f"parameter bytes: {_human(b0)} -> {_human(b1)} ({b0 / max(b1, 1):.2f}x smaller)")
    print("dry run: nothing written")
    return 0


def _source_sha256(src: Path, progress: bool) -> str:
    """SHA-256 of the files the transformer was read from (not a whole pipeline folder's encoders and VAE)."""
    from permuquant_jax.convert.checkpoint import open_checkpoint
    from permuquant_jax.convert.saved import files_sha256

    source = open_checkpoint(src)
    files = {f.path for f in source.files.values()}
    if source.layout == "diffusers":
        files |= {p for p in source.path.glob("*.json")} if source.path.is_dir() else set()
    return files_sha256(files, root=src if src.is_dir() else src.parent, progress=progress)


def _rel_err(model: Any, batches: Sequence[dict], refs: Sequence[Any]) -> float:
    """Relative L2 error of `model`'s outputs on `batches` against the float outputs `refs`."""
    import jax.numpy as jnp

    from permuquant_jax.quant.flux_plan import flux_forward

    num = den = 0.0
    for b, r in zip(batches, refs, strict=True):
        y = flux_forward(model, b).astype(jnp.float32)
        num += float(jnp.sum((y - r) ** 2))
        den += float(jnp.sum(r**2))
    return (num / max(den, 1e-30)) ** 0.5


def run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    import permuquant_jax
    from permuquant_jax.convert.atomic import atomic_output_dir, check_output_dir
    from permuquant_jax.convert.checkpoint import default_checkpoint_path, load_flux, read_flux_config
    from permuquant_jax.convert.saved import save_quantized
    from permuquant_jax.models.flux import abstract_flux, param_count
    from permuquant_jax.quant.baselines import check_method
    from permuquant_jax.quant.flux_plan import (
        flux_calibration_batches,
        flux_forward,
        load_text_embeddings,
        quantize_flux,
    )

    t0 = time.perf_counter()
    _validate(args)
    alphas = _parse_alphas(args.alpha)
    check_method(args.method, args.hadamard_block)
    if not args.dry_run:
        check_output_dir(args.out, overwrite=args.overwrite)
    progress = not args.no_progress
    src = Path(args.src) if args.src else default_checkpoint_path()
    src_desc = str(src) if args.src else f"{src} (embedded tiny model)"
    if not src.exists():
        raise UsageError(f"SRC {src}: no such file or directory")

    text = None
    if args.calib not in (None, "synthetic"):
        text = load_text_embeddings(args.calib)  # fail on a bad file before the (long) model load

    dtype = jnp.dtype(args.dtype)
    if args.dry_run:  # the plan needs shapes only: read the headers, build the model abstractly
        return _dry_run(abstract_flux(read_flux_config(src), dtype), args, src_desc)
    model = load_flux(src, dtype=dtype, progress=progress)
    if text is not None and (text[0].shape[-1], text[1].shape[-1]) != (model.config.context_in_dim,
                                                                        model.config.vec_in_dim):
        raise UsageError(
            f"--calib {args.calib}: 'txt' has width {text[0].shape[-1]} and 'y' {text[1].shape[-1]}, the model "
            f"expects {model.config.context_in_dim} (T5) and {model.config.vec_in_dim} (CLIP pooled)")
    n_params = param_count(model)
    toy = n_params < TOY_PARAMS

    calib = args.calib
    if calib is None:
        if not toy:
            raise UsageError(
                f"{src} has {n_params / 1e9:.1f}B parameters: calibration needs real text conditioning; pass "
                "--calib FILE.npz with 'txt' [N, S, 4096] T5 and 'y' [N, 768] CLIP embeddings")
        calib = "synthetic"
    if calib == "synthetic":
        if not toy:
            raise UsageError(f"--calib synthetic is only for toy models (< {TOY_PARAMS / 1e6:.0f}M parameters); "
                             f"{src} has {n_params / 1e9:.1f}B: pass --calib FILE.npz")
        _say("WARNING: calibrating on SYNTHETIC random text embeddings (toy model). The permutations and "
             "scales are only as meaningful as that data; use --calib FILE.npz for real models.")
    res = args.resolution or (256 if toy else 1024)
    common = dict(text=text, num_steps=args.steps, calib_steps=args.timesteps, height=res, width=res,
                  guidance=args.guidance, progress=progress)
    _say(f"sampling {args.calib_samples} calibration trajectories at {res}x{res} ...")
    batches = flux_calibration_batches(model, num_samples=args.calib_samples, seed=args.seed, **common)
    heldout = (flux_calibration_batches(model, num_samples=args.heldout_samples, seed=args.seed + 10_000, **common)
               if args.heldout_samples else [])

    refs = [flux_forward(model, b).astype(jnp.float32) for b in heldout]
    before = param_bytes(model)
    model, report = quantize_flux(
        model, batches, method=args.method, format=args.format, alphas=alphas, tau=args.tau,
        keep_bf16=tuple(args.keep_bf16), hadamard_block=args.hadamard_block, smooth_alpha=args.smooth_alpha,
        act_scale=args.act_scale, progress=progress,
    )
    after = param_bytes(model)
    err = _rel_err(model, heldout, refs) if heldout else float("nan")

    metadata = dict(
        format=args.format,
        method=args.method,
        settings=dict(alphas=list(alphas), tau=args.tau, hadamard_block=args.hadamard_block,
                      smooth_alpha=args.smooth_alpha, act_scale=args.act_scale, keep_bf16=list(args.keep_bf16),
                      calib=calib if calib == "synthetic" else str(Path(calib).absolute()),
                      calib_samples=args.calib_samples, steps=args.steps, timesteps=args.timesteps,
                      resolution=res, guidance=args.guidance, seed=args.seed),
        source=dict(path=str(src.absolute()), sha256=_source_sha256(src, progress), embedded=not args.src),
        heldout_rel_error=err,
        permutations=report.permutations,
        act_global_scales={k: v.get("act_global_scale") for k, v in report.layers.items()},
        sites_accepted=report.n_accepted,
        sites_total=report.n_sites,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _say(f"writing {args.out} ...")
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        save_quantized(model, tmp, metadata=metadata, report=report)
    wall = time.perf_counter() - t0

    rows = [
        ("source", src_desc),
        ("method / format", f"{args.method} / {args.format}"),
        ("parameters", f"{n_params / 1e6:.2f}M"),
        ("parameter bytes", f"{_human(before)} -> {_human(after)} ({before / max(after, 1):.2f}x smaller)"),
        ("sites accepted", f"{report.n_accepted} / {report.n_sites} (layer-sites, stacked blocks counted per layer)"),
        ("held-out rel. error", f"{err:.4f} (quantized vs float output, {len(heldout)} batches)"),
        ("wall time", f"{wall:.1f} s"),
        ("output", str(Path(args.out).absolute())),
        ("versions", f"permuquant-jax {permuquant_jax.__version__}, jax {jax.__version__}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from permuquant_jax.convert.atomic import OutputError
    from permuquant_jax.convert.safetensors_io import CheckpointError

    try:
        return run(args)
    except KeyboardInterrupt:
        _say("interrupted: nothing was written")
        return 130
    except (CheckpointError, OutputError, UsageError, ValueError, OSError) as e:
        if os.environ.get("PERMUQUANT_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        _say(f"error: {msg}")
        return 2
