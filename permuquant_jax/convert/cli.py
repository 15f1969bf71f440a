"""`python -m permuquant_jax.convert`: FLUX.1 checkpoint -> calibrated, permuted, quantized model directory."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from permuquant_jax.convert.atomic import Interrupted, acknowledge
from permuquant_jax.convert.validate import UsageError

EPILOG = """\
examples:
  python -m permuquant_jax.convert --out flux-tiny-nvfp4            # the embedded tiny model
  python -m permuquant_jax.convert flux1-dev.safetensors --calib prompts.npz --out flux1-dev-nvfp4
  python -m permuquant_jax.convert FLUX.1-dev/ --out flux1-dev-nvfp4   # calibrates on the built-in prompts
  python -m permuquant_jax.convert flux1-dev.safetensors --text-encoders FLUX.1-dev/ --prompts my.txt --out DST
  python -m permuquant_jax.convert --prompts my.txt --out tiny-nvfp4   # the embedded tiny pipeline, real prompts
  python -m permuquant_jax.convert FLUX.1-dev/ --calib prompts.npz --dry-run

SRC is a Black Forest Labs single file (flux1-dev.safetensors, flux1-schnell.safetensors), a diffusers
transformer/ folder or a full diffusers pipeline folder. --calib takes an .npz with 'txt' [N, S, 4096]
(T5 embeddings) and 'y' [N, 768] (CLIP pooled vectors), as `python -m permuquant_jax.generate --export-calib`
writes them. Without --calib, a source with text encoders (a pipeline folder, or --text-encoders DIR) is
calibrated on prompts (--prompts FILE, default: the built-in prompt set) encoded by its own T5 and CLIP.
Set PERMUQUANT_DEBUG=1 to see tracebacks.
"""

METHODS = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h", "auto")
ACCEPT_LEVELS = ("layer", "block", "model")
SCHEDULES = ("sequential", "parallel")
HADAMARD_BLOCKS = (16, 32, 64, 128)
TOY_PARAMS = 100_000_000  # below this, synthetic calibration is allowed (the embedded tiny model)
# model-level acceptance: Euler steps per accepting batch. 0 by measurement on the embedded tiny model (1 and 2
# took 1.3x and 2.3x the CPU time of the conversion and did not lower the held-out error: README)
DEFAULT_ROLLOUT = 0
MAX_SEED = 2**32 - 1 - 10_000  # held-out trajectories use seed + 10_000; numpy seeds are < 2**32


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line ends with one `error: ...` line (exit 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m permuquant_jax.convert` (add options here, check them in `_validate`)."""
    from permuquant_jax.quant.flux_plan import FLUX_KEEP

    p = _Parser(
        prog="python -m permuquant_jax.convert",
        description="Import a FLUX.1 checkpoint, calibrate it on sampling trajectories, choose channel "
        "permutations (PermuQuant) and write a quantized model directory (orbax checkpoint + permuquant.json).",
        epilog=EPILOG,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
    )
    d = " (default: %(default)s)"
    p.add_argument("src", nargs="?", default=None, metavar="SRC",
                   help="checkpoint file or folder; omitted: the tiny FLUX-architecture model shipped in the package")
    p.add_argument("--out", metavar="DST", help="output directory (must not exist unless --overwrite; never "
                   "SRC or a folder holding or inside an input)")
    p.add_argument("--format", default="nvfp4", help="quantization format, a registry name such as nvfp4, "
                   "nvfp4-w4a16, mxfp4, int4-g64, int3-g64-w3a3" + d)
    p.add_argument("--method", default="permuquant", choices=METHODS, help="quantization method" + d)
    p.add_argument("--alpha", default="0,0.25,0.5,0.75,1", metavar="A[,A...]",
                   help="PermuQuant candidate alphas of the joint criterion, comma-separated, each in [0, 1]" + d)
    p.add_argument("--tau", type=float, default=0.0,
                   help="minimum relative gain on the held-out half of the calibration data for a candidate to be "
                   "kept (finite, >= 0)" + d)
    p.add_argument("--accept", default=None, choices=ACCEPT_LEVELS,
                   help="what a candidate must lower: its layer's output, the enclosing double/single block's "
                   "outputs, or the DiT output (other layers quantized, validated on held-out samples); default: "
                   "model for toy models (< 100M parameters), block otherwise (model level costs hours at full size)")
    p.add_argument("--top-k", type=int, default=3, metavar="N",
                   help="candidates per site (best by layer error) measured downstream, >= 1" + d)
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="channel-swap moves tried per site, each kept only if the measured error falls, >= 0" + d)
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="sequential: decide stacked blocks one after another; parallel: a site at every layer of a "
                   "stack at once (depth x cheaper, block level only); default: sequential for toy models, "
                   "parallel otherwise")
    p.add_argument("--rollout", type=int, default=None, metavar="K",
                   help="model-level acceptance: measure each candidate on K-step Euler rollouts of the quantized "
                   f"model from the held-out trajectory states (0: one step; default {DEFAULT_ROLLOUT} at model level, "
                   "off at block level, which cannot use it)")
    p.add_argument("--calib", metavar="NPZ|synthetic", default=None,
                   help="text conditioning for calibration: an .npz with 'txt' and 'y', or 'synthetic' "
                   "(random embeddings, toy models only); default: synthetic for toy models, required otherwise")
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="calibrate on these prompts (a text file, one prompt a line), encoded by the source's "
                   "text encoders (a pipeline folder or --text-encoders); default for such sources: the built-in "
                   "prompt set. Without SRC: the embedded tiny pipeline")
    p.add_argument("--text-encoders", metavar="DIR", default=None,
                   help="T5/CLIP encoders and tokenizers for --prompts when SRC has none: a diffusers FLUX "
                   "pipeline folder, or a folder with clip_l*.safetensors, t5xxl*.safetensors and tokenizer_2/")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="L",
                   help="T5 prompt length in tokens for --prompts (default: 512 for guidance-distilled models "
                   "such as FLUX.1-dev, 256 otherwise, as BFL's code)")
    p.add_argument("--calib-samples", type=int, default=4, metavar="N",
                   help="number of sampling trajectories (prompts x seeds) used for calibration, >= 1" + d)
    p.add_argument("--heldout-samples", type=int, default=1, metavar="N",
                   help="extra trajectories kept apart to report the quantized model's output error, >= 0" + d)
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="sampling steps of the trajectories, >= 1 (default: 50 for guidance-distilled models "
                   "such as FLUX.1-dev, 4 otherwise)")
    p.add_argument("--timesteps", type=int, default=8, metavar="N",
                   help="timesteps per trajectory at which DiT inputs are recorded, spread over the "
                   "schedule, >= 1" + d)
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="calibration image size in pixels, square, a multiple of 16 (default: 1024; 256 for "
                   "toy models)")
    p.add_argument("--guidance", type=float, default=3.5, help="guidance scale for guidance-distilled models" + d)
    p.add_argument("--hadamard-block", type=int, default=64, metavar="B",
                   help="block size of the Hadamard rotation (methods hadamard, permuquant-h): 16, 32, 64 or "
                   "128, dividing the model's widths" + d)
    p.add_argument("--hadamard-start", default="none", choices=("none", "block"),
                   help="permuquant-h / auto: each linear's Hadamard choice starts from no rotation (none) or "
                   "from --hadamard-block (block); a change is kept only if it lowers the held-out error" + d)
    p.add_argument("--fixed-hadamard", action="store_true",
                   help="permuquant-h / auto: rotate every linear by --hadamard-block instead of choosing a "
                   "block size (or none) per linear")
    p.add_argument("--guard", type=float, default=0.01, metavar="FRAC",
                   help="block / model acceptance: a block ending more than FRAC worse than RTN on the held-out "
                   "data has its decisions undone, >= 0" + d)
    p.add_argument("--no-guard", action="store_true", help="no guard (decisions may trade a block's error for "
                   "a lower output error)")
    p.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant migration strength in [0, 1]" + d)
    p.add_argument("--act-scale", default="static", choices=("static", "dynamic"),
                   help="activation global scale: calibrated once (static) or computed per call" + d)
    p.add_argument("--keep-bf16", nargs="*", default=None, metavar="PATTERN",
                   help="module-path patterns (fnmatch, or re:REGEX) left in 16 bits; each must match a linear "
                   f"(default: {', '.join(FLUX_KEEP)}, those the model has)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the float model and of the unquantized parts" + d)
    p.add_argument("--seed", type=int, default=0,
                   help=f"seed of the calibration noise and synthetic text, in [0, {MAX_SEED}]" + d)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (layers, sites, bytes before/after) and write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a previous output of this tool (holds permuquant.json) or empty; "
                   "the old one is removed only once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="split calibration and acceptance batches over the first N devices (data parallel, "
                   "jax.sharding; trajectories are sampled N at a time, so fp32 rounding differs from one device and "
                   "near-tied permutation choices can differ); default: 1")
    p.add_argument("--fsdp", action="store_true",
                   help="with --devices N > 1: shard the float DiT's stacked weights over the devices along their "
                   "output axis (for a model that fits no single device) instead of a copy on each")
    p.add_argument("--max-device-memory", type=float, default=None, metavar="GIB",
                   help="device memory this run may use, in GiB. When the float model with 25%% room for the "
                   "passes does not fit, its stacked blocks stay in host memory and every forward streams them "
                   "to the device block by block (same result, slower; the summary says so); default: the "
                   "device's capacity as its allocator reports it (the CPU: no limit)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent XLA compilation cache (default: on, in "
                   "$PERMUQUANT_COMPILE_CACHE or ~/.cache/permuquant_jax/xla; PERMUQUANT_COMPILE_CACHE=off "
                   "also turns it off)")
    p.add_argument("--save-stats", metavar="FILE.npz", default=None,
                   help="save the calibration statistics once the calibration pass is done (atomic write), so a "
                   "later run (e.g. after an interruption, or with another --format/--method) can skip it")
    p.add_argument("--stats", metavar="FILE.npz", default=None,
                   help="reuse statistics saved by --save-stats instead of the calibration pass; the file must "
                   "come from the same checkpoint and calibration settings (checked, one-line error otherwise)")
    p.add_argument("--timings", metavar="FILE.json", default=None,
                   help="write the wall time of every phase, peak device memory and peak host RSS to this JSON "
                   "file (rewritten after every phase, so an interrupted run still tells where time went)")
    return p


def _validate(args: argparse.Namespace) -> None:
    """Every option on its own (ranges, finiteness, patterns); no file is read. Raises UsageError."""
    from permuquant_jax.convert.validate import (
        MAX_IMAGE_SIDE,
        UsageError,
        compile_patterns,
        require_finite,
        require_int_range,
        require_multiple,
    )
    from permuquant_jax.formats.registry import get_format

    if not args.dry_run and not args.out:
        raise UsageError("--out DST is required (or use --dry-run to only print the plan)")
    try:
        get_format(args.format)
    except (ValueError, KeyError) as e:
        raise UsageError(f"--format {args.format!r}: {' '.join(str(e).split())}") from None
    if args.calib is not None and (args.prompts or args.text_encoders):
        raise UsageError("--calib gives precomputed embeddings; it cannot be combined with --prompts or "
                         "--text-encoders (choose one)")
    if args.prompts and not Path(args.prompts).is_file():
        raise UsageError(f"--prompts {args.prompts}: no such file (expected a text file, one prompt a line)")
    if args.text_encoders and not Path(args.text_encoders).is_dir():
        raise UsageError(f"--text-encoders {args.text_encoders}: not a folder (expected a FLUX pipeline folder, or "
                         "one with clip_l*.safetensors, t5xxl*.safetensors and tokenizer_2/)")
    for name, lo in (("calib_samples", 1), ("timesteps", 1), ("steps", 1), ("heldout_samples", 0), ("devices", 1),
                     ("max_seq_len", 2), ("top_k", 1), ("refine", 0), ("rollout", 0)):
        require_int_range(name, getattr(args, name), lo)
    require_int_range("seed", args.seed, 0, MAX_SEED)
    require_multiple("resolution", args.resolution, 16, most=MAX_IMAGE_SIDE)
    require_finite("tau", args.tau, lo=0.0)
    if args.max_device_memory is not None:
        require_finite("max_device_memory", args.max_device_memory, lo=0.0)
        if args.max_device_memory <= 0:
            raise UsageError(f"--max-device-memory must be a positive number of GiB, found {args.max_device_memory:g}")
    require_finite("guard", args.guard, lo=0.0)
    require_finite("guidance", args.guidance)
    require_finite("smooth_alpha", args.smooth_alpha, lo=0.0, hi=1.0)
    if args.schedule == "parallel" and args.accept not in (None, "block"):
        raise UsageError(f"--schedule parallel needs --accept block, found --accept {args.accept}")
    if args.hadamard_block not in HADAMARD_BLOCKS:
        raise UsageError(f"--hadamard-block must be a power of two in {', '.join(map(str, HADAMARD_BLOCKS))}, "
                         f"found {args.hadamard_block}")
    compile_patterns("keep_bf16", args.keep_bf16 or ())
    if args.stats and not Path(args.stats).is_file():
        raise UsageError(f"--stats {args.stats}: no such file (expected statistics written by --save-stats)")
    if args.save_stats:
        parent = Path(args.save_stats).absolute().parent
        if not parent.is_dir():
            raise UsageError(f"--save-stats {args.save_stats}: folder {parent} does not exist; create it first")
        if Path(args.save_stats).is_dir():
            raise UsageError(f"--save-stats {args.save_stats}: is a folder, expected a file name such as stats.npz")
        if args.stats and Path(args.save_stats).absolute() == Path(args.stats).absolute():
            raise UsageError("--save-stats and --stats name the same file; drop --save-stats when reusing statistics")
    args.alphas = _parse_alphas(args.alpha)


def rollout_for(args: argparse.Namespace, accept: str, config: Any) -> int:
    """The rollout length for this run: --rollout, else DEFAULT_ROLLOUT at model-level acceptance and 0 at
    block level (which cannot use rollouts); refused past the end of the calibration schedule."""
    from permuquant_jax.quant.flux_plan import default_num_steps

    steps = args.steps or default_num_steps(config)
    if args.rollout is None:
        return min(DEFAULT_ROLLOUT, steps) if accept == "model" else 0
    if args.rollout and accept != "model":
        why = "" if args.accept else " (the default above 100M parameters)"
        raise UsageError(f"--rollout {args.rollout} needs model-level acceptance, and this run uses --accept "
                         f"{accept}{why}; pass --accept model, or drop --rollout")
    if args.rollout > steps:
        raise UsageError(f"--rollout {args.rollout} is longer than the {steps}-step calibration schedule; use "
                         f"--rollout <= {steps} (or more --steps)")
    return args.rollout


def _parse_alphas(text: str) -> tuple[float, ...]:
    from permuquant_jax.convert.validate import parse_unit_floats

    return parse_unit_floats("alpha", text)


def source_paths(args: argparse.Namespace, src: Path) -> list[tuple[str, Path]]:
    """Every input path of this run, labelled; DST may be none of them, contain or lie inside one.
    (Options that read more inputs, e.g. prompt files or encoder folders, add theirs here.)"""
    out = [("SRC", src)]
    if args.calib not in (None, "synthetic"):
        out.append(("--calib", Path(args.calib)))
    if args.prompts:
        out.append(("--prompts", Path(args.prompts)))
    if args.text_encoders:
        out.append(("--text-encoders", Path(args.text_encoders)))
    if getattr(args, "stats", None):
        out.append(("--stats", Path(args.stats)))
    return out


def _file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _trained_defaults(args: argparse.Namespace, src: Path) -> None:
    """A DiT trained by ``permuquant_jax.train.tiny`` (the embedded pipeline's) records its image size, T5
    length and sampling steps: calibrate where it was trained unless the user said otherwise. Calibrated
    on prompts (no --calib, no --prompts; text encoders at hand), it calibrates on captions of its training
    grammar (``generate.pipeline.calibration_prompts_path``) rather than the general built-in set."""
    from permuquant_jax.generate.pipeline import calibration_prompts_path, trained_defaults

    trained = trained_defaults(src)
    for arg, key in (("max_seq_len", "max_seq_len"), ("resolution", "image_size"), ("steps", "sample_steps")):
        if getattr(args, arg) is None and key in trained:
            setattr(args, arg, int(trained[key]))
    on_prompts = getattr(args, "text_encoders", None) or not getattr(args, "src", None) or _has_text_encoders(src)
    if trained and on_prompts and getattr(args, "prompts", None) is None and getattr(args, "calib", None) is None:
        captions = calibration_prompts_path(src)
        if captions is not None:
            args.prompts = str(captions)


def stats_identity(args: argparse.Namespace, config: Any, calib: str, src_sha: str) -> dict[str, Any]:
    """What calibration statistics depend on: the checkpoint (its sha256), the model config and dtype,
    and every setting of the calibration trajectories (text conditioning by content hash)."""
    if calib == "prompts":
        text = dict(prompts=_file_sha256(args.prompts) if args.prompts else "built-in",
                    text_encoders=str(Path(args.text_encoders).absolute()) if args.text_encoders else "source",
                    max_seq_len=args.max_seq_len or (512 if config.guidance_embed else 256))
    elif calib == "synthetic":
        text = "synthetic"
    else:
        text = dict(npz_sha256=_file_sha256(calib))
    return dict(source_sha256=src_sha, config=config.to_dict(), dtype=args.dtype, text=text,
                calib_samples=args.calib_samples, steps=args.steps, timesteps=args.timesteps,
                resolution=args.resolution, guidance=args.guidance, seed=args.seed)


def load_stats_for(file: str, identity: dict[str, Any]) -> Any:
    """`CalibrationStats` from `file`, refused (UsageError, one line) unless they were saved for the same
    `identity` (checkpoint, config, calibration settings)."""
    from permuquant_jax.quant.calibrate import CalibrationStats

    try:
        stats = CalibrationStats.load(file)
    except ValueError as e:
        raise UsageError(f"--stats {e}") from None
    saved = stats.meta.get("identity")
    if not isinstance(saved, dict):
        raise UsageError(f"--stats {file}: saved without the converter's settings (not written by --save-stats); "
                         "recalibrate")
    for key in identity:
        if saved.get(key) != identity[key]:
            what = {"source_sha256": "another checkpoint", "config": "another model config",
                    "text": "other text conditioning"}.get(key, f"--{key.replace('_', '-')} {saved.get(key)}")
            raise UsageError(f"--stats {file}: computed for {what}, this run has "
                             f"{str(identity[key])[:80] if key not in ('config', 'text') else 'different ones'}; "
                             "use the same settings or recalibrate (drop --stats)")
    return stats


def _has_text_encoders(src: Path) -> bool:
    """A diffusers pipeline folder with its T5 and CLIP (the converter can then calibrate on prompts)."""
    return src.is_dir() and (src / "text_encoder").is_dir() and (src / "text_encoder_2").is_dir()


def _prompt_text(args: argparse.Namespace, src: Path, config: Any, progress: bool) -> tuple[Any, Any]:
    """T5/CLIP embeddings of the calibration and held-out prompts: (calibration (txt, y), held-out (txt, y)).

    The prompts (--prompts, else the built-in set) are shuffled by --seed; the first --calib-samples
    calibrate, the next --heldout-samples are held out (other prompts than calibration's)."""
    import jax.numpy as jnp
    import numpy as np

    from permuquant_jax.generate.pipeline import builtin_prompts, calibration_text, read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else builtin_prompts()
    order = np.random.default_rng(args.seed).permutation(len(prompts))
    need = args.calib_samples + args.heldout_samples
    chosen = [prompts[i] for i in np.resize(order, need)]  # fewer prompts than samples: reused in turn
    encoders = args.text_encoders or (str(src) if args.src else None)
    max_seq_len = args.max_seq_len or (512 if config.guidance_embed else 256)
    txt, y = calibration_text(encoders, chosen, max_seq_len, dtype=jnp.dtype(args.dtype), progress=progress)
    c = args.calib_samples
    return (txt[:c], y[:c]), ((txt[c:], y[c:]) if args.heldout_samples else None)


def _validate_for_model(args: argparse.Namespace, src: Path) -> dict[str, Any]:
    """Options against the checkpoint's config, read from the headers only (no weights): --keep-bf16
    patterns, widths vs format group and Hadamard block, synthetic calibration, the --calib file."""
    from permuquant_jax.convert.checkpoint import read_flux_config
    from permuquant_jax.convert.validate import UsageError, check_widths, effective_keep, linear_paths, load_calib_npz
    from permuquant_jax.formats.registry import get_format
    from permuquant_jax.models.flux import abstract_flux, param_count
    from permuquant_jax.quant.baselines import uses_hadamard
    from permuquant_jax.quant.flux_plan import FLUX_KEEP

    config = read_flux_config(src)
    abstract = abstract_flux(config, args.dtype)
    widths = linear_paths(abstract)
    keep = effective_keep(args.keep_bf16, FLUX_KEEP, widths)
    fmt = get_format(args.format)
    hb = args.hadamard_block if uses_hadamard(args.method) or args.method == "auto" else None
    check_widths(widths, keep, group=fmt.group, format=fmt.name, hadamard_block=hb,
                 segment_widths=(config.hidden_size, config.mlp_hidden_dim))
    n_params = param_count(abstract)
    toy = n_params < TOY_PARAMS
    calib = args.calib
    if calib is None and (args.prompts or args.text_encoders or _has_text_encoders(src)):
        calib = "prompts"
    if calib is None:
        if not toy:
            raise UsageError(
                f"{src} has {n_params / 1e9:.1f}B parameters: calibration needs real text conditioning; pass "
                f"--calib FILE.npz with 'txt' [N, S, {config.context_in_dim}] T5 and 'y' [N, {config.vec_in_dim}] "
                "CLIP embeddings")
        calib = "synthetic"
    if calib == "synthetic" and not toy:
        raise UsageError(f"--calib synthetic is only for toy models (< {TOY_PARAMS / 1e6:.0f}M parameters); "
                         f"{src} has {n_params / 1e9:.1f}B: pass --calib FILE.npz")
    text = None
    if calib not in ("synthetic", "prompts"):
        text = load_calib_npz(calib, txt_width=config.context_in_dim, y_width=config.vec_in_dim)
    return dict(config=config, abstract=abstract, keep=keep, toy=toy, n_params=n_params, calib=calib, text=text)


_phase = ["starting"]
PHASE_LABELS = {"compiling": "trajectories (calibration, incl. compile)", "sampling": "trajectories (held out)",
                "calibrating": "calibration", "quantizing": "folding + quantization",
                "evaluating": "held-out error", "loading": "load", "saving": "save"}


class PhaseClock:
    """Wall time per phase of a run (phases entered with `_enter`), optionally written to a JSON file
    after every phase: {"phases": {name: seconds}, "current": name, "peak_device_bytes", ...}."""

    def __init__(self, file: str | None = None):
        self.file = file
        self.t0 = self.t_phase = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.current = "starting"
        self.extra: dict[str, Any] = {}
        self._lock = __import__("threading").Lock()
        self._watch: Any = None

    def watch_memory(self, step_bytes: int = 512 * 2**20, every_s: float = 0.2, limit: int = 300) -> None:
        """Start a daemon thread that polls device 0's allocator and, each time its high-water mark rose by
        `step_bytes`, records {t, peak, in_use, phase, the active progress bars} in `peak_steps` (at most
        `limit`): the timeline says which pass set the peak. No-op without a timings file or memory stats."""
        if not self.file or self._watch is not None or _device_memory().get("peak_device_bytes") is None:
            return
        import threading

        steps = self.extra.setdefault("peak_steps", [])
        stop = threading.Event()

        def poll():
            last, last_write = 0, time.perf_counter()
            while not stop.wait(every_s):
                try:
                    import jax

                    st = jax.devices()[0].memory_stats() or {}
                except Exception:  # noqa: BLE001 - the backend went away (interpreter exit)
                    return
                peak = st.get("peak_bytes_in_use") or 0
                if peak >= last + step_bytes and len(steps) < limit:
                    last = peak
                    steps.append(dict(t=round(time.perf_counter() - self.t0, 2), peak=peak,
                                      in_use=st.get("bytes_in_use"), phase=self.current, bars=_active_bars()))
                    if time.perf_counter() - last_write > 10:
                        last_write = time.perf_counter()
                        self.write()

        self._watch = stop
        threading.Thread(target=poll, name="permuquant-memory-watch", daemon=True).start()

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[self.current] = round(self.phases.get(self.current, 0.0) + now - self.t_phase, 3)
        peak = _device_memory().get("peak_device_bytes")
        if peak is not None:  # the high-water mark when the phase ended (it includes earlier phases)
            self.extra.setdefault("peak_device_bytes_after", {})[self.current] = peak
        self.extra.setdefault("peak_host_rss_after", {})[self.current] = _peak_rss()
        self.current, self.t_phase = phase, now
        self.write()

    def split(self, phase: str, parts: dict[str, float]) -> None:
        """Replace the finished `phase` by its named parts (seconds measured inside it); the rest keeps
        the phase's name."""
        total = self.phases.pop(phase, 0.0)
        for k, v in parts.items():
            self.phases[k] = round(self.phases.get(k, 0.0) + v, 3)
        rest = total - sum(parts.values())
        if rest > 0.0005:
            self.phases[phase] = round(rest, 3)

    def summary(self) -> dict[str, Any]:
        out = dict(phases=dict(self.phases), current=self.current,
                   elapsed_s=round(time.perf_counter() - self.t0, 3), peak_host_rss_bytes=_peak_rss())
        out.update(_device_memory())
        out.update(self.extra)
        return out

    def write(self) -> None:
        if not self.file:
            return
        import json

        with self._lock:
            tmp = f"{self.file}.tmp{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump(self.summary(), fh, indent=1)
            os.replace(tmp, self.file)


def _active_bars() -> list[str]:
    """'desc n/total' of every open tqdm bar (what a pass is doing right now)."""
    try:
        from tqdm.std import tqdm as _tqdm

        return [f"{b.desc} {b.n}/{b.total}" for b in list(getattr(_tqdm, "_instances", ()))]
    except Exception:  # noqa: BLE001 - the set changed while read: skip this sample's bars
        return []


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux: ru_maxrss is in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _device_memory() -> dict[str, Any]:
    """Peak / limit bytes of device 0 as its allocator reports them (None where it reports nothing, e.g. CPU)."""
    if "jax" not in sys.modules:
        return dict(peak_device_bytes=None, device_bytes_limit=None)
    import jax

    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        st = {}
    return dict(peak_device_bytes=st.get("peak_bytes_in_use"), device_bytes_limit=st.get("bytes_limit"),
                device=str(jax.devices()[0].device_kind))


_clock = [PhaseClock()]


def _enter(phase: str, msg: str | None = None) -> None:
    """Start a phase of the job (named in the message of an interrupted run); a safe point for signals."""
    from permuquant_jax.convert.atomic import check_interrupt

    check_interrupt()
    _phase[0] = phase
    _clock[0].enter(phase)
    if msg:
        _say(msg)


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

    sites = flux_sites(model) if method in ("permuquant", "permuquant-h", "auto") else []
    plan = plan_summary(model, sites=sites, keep=keep, format=format)
    if not sites:
        plan["sites"] = []
    before = param_bytes(model)
    plan["model_bytes_before"] = before
    plan["model_bytes_after"] = before - plan["bytes_before"] + plan["bytes_after"]
    return plan


def _dry_run(model: Any, args: argparse.Namespace, src_desc: str, keep: Sequence[str]) -> int:
    from permuquant_jax.formats.registry import get_format

    fmt = get_format(args.format)
    plan = dry_run_plan(model, method=args.method, format=args.format, keep=keep)
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
    """Relative L2 error of `model`'s outputs on `batches` against the float outputs `refs`; a
    non-finite output is an error naming the first batch where it appears."""
    import jax.numpy as jnp

    from permuquant_jax.convert.validate import check_error_finite
    from permuquant_jax.quant.flux_plan import flux_forward

    num = den = 0.0
    for i, (b, r) in enumerate(zip(batches, refs, strict=True)):
        y = flux_forward(model, b).astype(jnp.float32)
        num += float(jnp.sum((y - r) ** 2))
        den += float(jnp.sum(r**2))
        check_error_finite(num, f"the held-out error (quantized model's output on held-out batch {i} of "
                           f"{len(batches)})")
    return (num / max(den, 1e-30)) ** 0.5


def run(args: argparse.Namespace) -> int:
    """The whole job for parsed `args`; returns the exit code (errors are raised)."""
    import jax
    import jax.numpy as jnp

    import permuquant_jax
    from permuquant_jax.convert import validate as v
    from permuquant_jax.convert.atomic import atomic_output_dir, check_output_dir, deferred_signals
    from permuquant_jax.convert.checkpoint import default_checkpoint_path, load_flux
    from permuquant_jax.convert.saved import save_quantized
    from permuquant_jax.quant import calibrate
    from permuquant_jax.quant.flux_plan import flux_calibration_batches, flux_forward, quantize_flux
    from permuquant_jax.quant.sites import find_linears, match_any

    t0 = time.perf_counter()
    _clock[0] = clock = PhaseClock(getattr(args, "timings", None))
    _validate(args)
    if args.src:
        src, src_desc = Path(args.src), str(args.src)
    elif args.prompts or args.text_encoders:  # real prompts need the embedded pipeline's DiT (its text widths)
        from permuquant_jax.generate.pipeline import embedded_transformer_path

        src = embedded_transformer_path()
        src_desc = f"{src} (embedded tiny pipeline)"
    else:
        src = default_checkpoint_path()
        src_desc = f"{src} (embedded tiny model)"
    if not src.exists():
        raise UsageError(f"SRC {src}: no such file or directory")
    _trained_defaults(args, src)
    sources = source_paths(args, src)
    if not args.dry_run:
        v.check_not_source(args.out, sources)
        check_output_dir(args.out, overwrite=args.overwrite)
    m = _validate_for_model(args, src)
    keep, calib, text = m["keep"], m["calib"], m["text"]
    accept = args.accept or ("model" if m["toy"] else "block")
    rollout = rollout_for(args, accept, m["config"])
    if args.dry_run:  # the plan needs shapes only: read the headers, build the model abstractly
        return _dry_run(m["abstract"], args, src_desc, keep)

    progress = not args.no_progress
    dtype = jnp.dtype(args.dtype)
    with atomic_output_dir(args.out, overwrite=args.overwrite, sources=sources) as tmp:
        heldout_text = text
        if calib == "prompts":  # encode first, so the text encoders are released before the DiT loads
            _enter("encoding prompts", f"encoding {args.calib_samples + args.heldout_samples} calibration "
                   f"prompts ({args.prompts or 'built-in set'}) with the text encoders ...")
            text, heldout_text = _prompt_text(args, src, m["config"], progress)
            v.check_batches_finite([{"txt": text[0], "y": text[1]}], "prompt embeddings")
        src_sha = stats_id = reused = None
        if args.stats or args.save_stats:  # statistics are tied to the checkpoint: hash it first
            _enter("hashing source", f"hashing {src} (statistics are tied to the checkpoint) ...")
            src_sha = _source_sha256(src, progress)
            stats_id = stats_identity(args, m["config"], calib, src_sha)
            if args.stats:
                reused = load_stats_for(args.stats, stats_id)
        n_params, toy = m["n_params"], m["toy"]
        mesh, n_dev = None, args.devices or 1
        memory = device_memory_plan(param_bytes(m["abstract"]), args.max_device_memory, n_dev=n_dev,
                                    fsdp=args.fsdp)
        clock.extra["device_memory_plan"] = memory
        if memory["stream"] and not os.environ.get("PERMUQUANT_STREAM_PASSES_ONLY"):
            broken = streamed_folding_error(args.format)
            if broken:  # refused now rather than after hours of streamed passes
                raise UsageError(
                    f"the float model needs ~{_human(memory['need_bytes'])} of device memory ({memory['why']}); "
                    f"block streaming runs the passes, but folding / quantizing weights kept in host memory is not "
                    f"supported yet ({broken[:80]}...): use a device with more memory")
        _enter("loading", f"loading {src} ..." + (f" (stacked blocks to host memory: {memory['why']})"
                                                  if memory["stream"] else ""))
        clock.watch_memory()
        model = load_flux(src, dtype=dtype, progress=progress, host_blocks=memory["stream"])
        if n_dev > 1:
            from permuquant_jax.quant.sharding import data_mesh, place_model, shard_batch, shard_batches

            try:
                mesh = data_mesh(n_dev)
            except ValueError as e:
                raise UsageError(f"--devices {n_dev}: {e}") from None
            place_model(model, mesh, fsdp=args.fsdp)
            _say(f"{n_dev} devices: trajectories sampled and batches split {n_dev} at a time over them (data parallel)"
                 + ("; float DiT weights sharded (FSDP)" if args.fsdp else "; float DiT replicated"))
        elif args.fsdp:
            raise UsageError("--fsdp needs --devices N with N > 1")
        if calib == "synthetic":
            _say("WARNING: calibrating on SYNTHETIC random text embeddings (toy model). The permutations and "
                 "scales are only as meaningful as that data; use --calib FILE.npz for real models.")
        res = args.resolution or (256 if toy else 1024)
        common = dict(num_steps=args.steps, calib_steps=args.timesteps, height=res, width=res,
                      guidance=args.guidance, progress=progress, batch_size=n_dev,
                      place=None if mesh is None else (lambda b: shard_batch(b, mesh)))  # sampled data parallel
        _enter("compiling", f"sampling {args.calib_samples} calibration trajectories at {res}x{res} "
               "(compiling the model first) ...")
        batches = flux_calibration_batches(model, num_samples=args.calib_samples, seed=args.seed, text=text,
                                           **common)
        _enter("sampling")
        heldout = (flux_calibration_batches(model, num_samples=args.heldout_samples, seed=args.seed + 10_000,
                                            text=heldout_text, **common) if args.heldout_samples else [])
        v.check_batches_finite(batches, "calibration")
        v.check_batches_finite(heldout, "held-out")
        if mesh is not None:  # (the calibration batches keep their record of the schedule, for rollouts)
            batches, heldout = batches.like(shard_batches(batches, mesh)), shard_batches(heldout, mesh)
        refs = [flux_forward(model, b).astype(jnp.float32) for b in heldout]
        for i, r in enumerate(refs):
            hit = v.first_nonfinite({"output": r})
            if hit:
                raise v.NonFiniteError(f"the float model's output on held-out batch {i} holds {hit[2]} at index "
                                       f"{hit[1]}; nothing was written")

        targets = [p for p in find_linears(model) if not match_any(p, keep)]
        if reused is not None:
            _enter("calibrating", f"reusing the calibration statistics of {args.stats} ...")
            try:
                reused.check_model(model, targets)
            except ValueError as e:
                raise UsageError(f"--stats {args.stats}: {' '.join(str(e).split())}") from None
            stats = reused
        else:
            _enter("calibrating", "calibrating ...")
            stats = calibrate(model, batches, targets, progress=progress)
        v.check_stats_finite(stats)
        if args.save_stats:
            stats.save(args.save_stats, meta=dict(identity=stats_id, permuquant_jax=permuquant_jax.__version__))
            _say(f"calibration statistics saved to {args.save_stats}")
        before = param_bytes(model)
        guard = None if args.no_guard else args.guard
        schedule = args.schedule or ("sequential" if toy or accept != "block" else "parallel")
        _enter("quantizing", f"choosing permutations ({accept}-level acceptance"
               + (f", {rollout}-step rollouts" if rollout else "") + ") and quantizing ...")
        try:
            model, report = quantize_flux(
                model, batches, method=args.method, format=args.format, alphas=args.alphas, tau=args.tau,
                keep_bf16=tuple(keep), hadamard_block=args.hadamard_block, smooth_alpha=args.smooth_alpha,
                act_scale=args.act_scale, stats=stats, progress=progress, accept=accept, top_k=args.top_k,
                refine=args.refine, schedule=schedule, hadamard_sizes=not args.fixed_hadamard,
                hadamard_start=args.hadamard_start, guard=guard, rollout=rollout,
            )
        except ValueError as e:
            if not (memory["stream"] and "memory_space" in str(e)):
                raise
            raise UsageError(  # eager folding / quantizing code that mixes host- and device-memory arrays
                f"--max-device-memory: the streamed passes finished, but folding / quantizing the stacked weights "
                f"kept in host memory is not supported yet ({' '.join(str(e).split())[:90]}...); this checkpoint "
                f"needs ~{_human(memory['need_bytes'])} of device memory without streaming") from None
        v.check_report_finite(report)
        after = param_bytes(model)
        _enter("evaluating")
        sec = report.config.get("seconds", {})
        ds_sec = report.config.get("downstream", {}).get("seconds", 0.0)
        clock.split("quantizing", {"candidates + layer errors": sec.get("layer_pass", 0.0),
                                   "acceptance": ds_sec})
        clock.extra.update(forwards=report.config.get("downstream", {}).get("forwards"),
                           accept=accept, rollout=rollout, schedule=schedule, calib_batches=len(batches),
                           heldout_batches=len(heldout), n_params=n_params)
        clock.write()
        err = _rel_err(model, heldout, refs) if heldout else None
        if src_sha is None:
            _enter("hashing source")
            src_sha = _source_sha256(src, progress)

        metadata = dict(
            format=args.format,
            method=args.method,
            settings=dict(alphas=list(args.alphas), tau=args.tau, accept=accept, rollout=rollout, top_k=args.top_k,
                          refine=args.refine, schedule=schedule, hadamard_block=args.hadamard_block,
                          hadamard_sizes=not args.fixed_hadamard, hadamard_start=args.hadamard_start,
                          guard=guard,
                          smooth_alpha=args.smooth_alpha, act_scale=args.act_scale, keep_bf16=list(keep),
                          calib=calib if calib == "synthetic" else
                          (dict(prompts=str(Path(args.prompts).absolute()) if args.prompts else "built-in",
                                text_encoders=str(Path(args.text_encoders).absolute()) if args.text_encoders
                                else ("embedded" if not args.src else str(src.absolute())),
                                max_seq_len=args.max_seq_len or (512 if m["config"].guidance_embed else 256))
                           if calib == "prompts" else str(Path(calib).absolute())),
                          calib_samples=args.calib_samples, heldout_samples=args.heldout_samples,
                          steps=args.steps, timesteps=args.timesteps, resolution=res, guidance=args.guidance,
                          seed=args.seed),
            source=dict(path=str(src.absolute()), sha256=src_sha, embedded=not args.src),
            heldout_rel_error=err,
            permutations=report.permutations,
            act_global_scales={k: val.get("act_global_scale") for k, val in report.layers.items()},
            sites_accepted=report.n_accepted,
            sites_total=report.n_sites,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        _enter("saving", f"writing {args.out} ...")
        if mesh is not None:  # saved from one device, so that it loads on any number of devices
            place_model(model, data_mesh(1))
        with deferred_signals():  # orbax writes with threads: let it finish, then clean up if interrupted
            save_quantized(model, tmp, metadata=metadata, report=report)
    wall = time.perf_counter() - t0
    _enter("done")
    clock.extra["output_bytes"] = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    clock.write()
    mem = _device_memory()

    err_s = "n/a (--heldout-samples 0)" if err is None else f"{err:.4f} (quantized vs float output, " \
        f"{len(heldout)} batches)"
    rows = [
        ("source", src_desc),
        ("method / format", f"{args.method} / {args.format}"),
        ("parameters", f"{n_params / 1e6:.2f}M"),
        ("parameter bytes", f"{_human(before)} -> {_human(after)} ({before / max(after, 1):.2f}x smaller)"),
        ("acceptance", f"{accept} level, " + (f"{rollout}-step rollouts from the held-out trajectory states"
                                              if rollout else "one step")),
        ("sites accepted", f"{report.n_accepted} / {report.n_sites} (layer-sites, stacked blocks counted per layer)"),
        ("held-out rel. error", err_s),
        ("wall time", f"{wall:.1f} s"),
        ("time by phase", ", ".join(f"{PHASE_LABELS.get(k, k)} {val:.1f} s" for k, val in clock.phases.items()
                                    if k not in ("starting", "done") and val >= 0.05)),
        ("device memory", memory["summary"]),
        ("peak memory", f"host RSS {_human(_peak_rss())}" + (
            f", device {_human(mem['peak_device_bytes'])} of {_human(mem['device_bytes_limit'] or 0)}"
            if mem.get("peak_device_bytes") else "")),
        ("output", str(Path(args.out).absolute())),
        ("compile cache", getattr(args, "compile_cache", None) or "off"),
        ("versions", f"permuquant-jax {permuquant_jax.__version__}, jax {jax.__version__}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {val}" for k, val in rows))
    return 0


STREAM_ROOM = 1.25  # the passes need the float weights plus ~13% (FLUX.1-dev: 25.2 GiB programs of 22.2 GiB)


def device_memory_plan(model_bytes: int, max_gib: float | None, *, n_dev: int = 1, fsdp: bool = False
                       ) -> dict[str, Any]:
    """Whether the float model's stacked blocks must stay in host memory and stream to the device.

    The budget is `max_gib` GiB, else the device's capacity as its allocator reports it (None on the CPU:
    no limit). The model streams when its bytes per device (`fsdp`: split over `n_dev`) times
    `STREAM_ROOM` exceed the budget. Returns {"stream", "budget_bytes", "need_bytes", "why", "summary"};
    streaming over several devices is refused (UsageError: use --fsdp or more devices)."""
    per_dev = model_bytes / n_dev if fsdp and n_dev > 1 else model_bytes
    need = int(per_dev * STREAM_ROOM)
    if max_gib is not None:
        budget, source = int(max_gib * 2**30), f"--max-device-memory {max_gib:g}"
    else:
        budget, source = _device_memory().get("device_bytes_limit"), "the device's capacity"
    stream = budget is not None and need > budget
    if stream and n_dev > 1:
        raise UsageError(f"--max-device-memory: the float model needs ~{_human(need)} per device, over "
                         f"{source} ({_human(budget)}); block streaming runs on one device: use --fsdp or more "
                         "devices, or drop --devices")
    if budget is None:
        summary = "whole model on the device (no capacity reported, no --max-device-memory)"
    elif stream:
        summary = (f"STREAMED: the stacked blocks stayed in host memory and were copied to the device block by "
                   f"block in every forward (slower than in-device: the float model {_human(per_dev)} + 25% "
                   f"exceeds {source}, {_human(budget)})")
    else:
        summary = f"whole model on the device (~{_human(need)} needed of {source}, {_human(budget)})"
    why = f"~{_human(need)} needed, {source} is {_human(budget)}" if budget is not None else ""
    return dict(stream=bool(stream), budget_bytes=budget, need_bytes=need, why=why, summary=summary)


def streamed_folding_error(format: str) -> str | None:
    """None when folding a permutation into, and quantizing, a stacked weight kept in host memory work
    (what a streamed run needs once its passes are done); else that error in one line. A probe on a
    [2, 64, 32] array (about a second), so a run that could not finish is refused before its passes."""
    import jax
    import numpy as np
    from flax import nnx

    from permuquant_jax.models.flux import host_sharding
    from permuquant_jax.models.layers import Linear
    from permuquant_jax.quant.fold import permute_consumer
    from permuquant_jax.quant.linear import QuantLinear
    from permuquant_jax.quant.sites import Ref

    class Holder(nnx.Module):
        def __init__(self):
            self.lin = Linear(64, 32, rngs=nnx.Rngs(0))

    host = host_sharding()
    try:
        m = Holder()
        m.lin.kernel.set_value(jax.device_put(np.linspace(-1, 1, 4096, dtype=np.float32).reshape(2, 64, 32), host))
        m.lin.bias.set_value(jax.device_put(np.zeros((2, 32), np.float32), host))
        permute_consumer(m, Ref(("lin",)), 64, np.stack([np.arange(64)[::-1]] * 2))  # what folding does
        QuantLinear.from_linear(m.lin, format=format)
    except (ValueError, TypeError) as e:
        return " ".join(str(e).split())[:160]
    return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _interrupted(signame: str) -> str:
    return f"interrupted by {signame} while {_phase[0]}: nothing was written"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error, 130 SIGINT, 143 SIGTERM).

    `argv` None reads the process's command line and turns on the persistent compilation cache
    (`enable_compile_cache`; --no-compile-cache or PERMUQUANT_COMPILE_CACHE=off: not); a caller's own
    list (tests, scripts) leaves JAX's configuration alone.

    SIGINT and SIGTERM are handled for the whole run (see `atomic`): the temporary output is removed
    and one line says so. Errors of the input print one `error: ...` line (PERMUQUANT_DEBUG=1: the
    traceback).
    """
    import threading

    from permuquant_jax.convert.atomic import interrupt_handlers

    _phase[0] = "starting"
    with interrupt_handlers():
        if threading.current_thread() is not threading.main_thread():
            return _guarded(argv)
        return _run_in_worker(argv)


GRACE_S = 1.0  # after a signal, how long the job may take to reach a safe point before it is abandoned


def _run_in_worker(argv: Sequence[str] | None) -> int:
    """Run the job in a worker thread while the main thread waits, so a signal is answered at once: Python
    runs signal handlers in the main thread only, between bytecodes, hence not while the job's thread sits
    in one long XLA call. After a signal the job gets GRACE_S to stop at a safe point by itself; then the
    main thread removes the temporary output (`atomic.abandon`; not during a save or the final renames,
    which are let finish) and returns the exit code; the caller (`__main__`) ends the process."""
    import threading

    from permuquant_jax.convert import atomic

    box: dict[str, Any] = {}

    def work():
        try:
            box["code"] = _guarded(argv)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            box["error"] = e
        finally:
            box["done"] = True

    worker = threading.Thread(target=work, name="permuquant-convert", daemon=True)
    worker.start()
    signalled: tuple[str, int] | None = None
    t_signal = 0.0
    while True:  # every statement here may be cut by the handler's Interrupted (it retries every 0.25 s)
        try:
            while not box.get("done"):  # polled with sleep: a Thread.join cut by an exception can lose its state
                time.sleep(0.05)
                if signalled and time.perf_counter() - t_signal > GRACE_S and atomic.abandon(worker):
                    acknowledge()
                    _say(_interrupted(signalled[0]))
                    return signalled[1]
            break
        except (Interrupted, KeyboardInterrupt) as e:
            if signalled is None:
                t_signal = time.perf_counter()
                signalled = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
    if "error" in box:
        raise box["error"]
    return box["code"]


def _guarded(argv: Sequence[str] | None) -> int:
    """`_main` with signals and interrupts turned into their exit codes and one line."""
    from permuquant_jax.convert.atomic import was_abandoned

    for _ in range(3):  # a second signal while reporting the first one: report again
        try:
            return _main(argv)
        except Interrupted as e:
            if was_abandoned():  # the main thread has answered already
                return e.exit_code
            acknowledge()
            _say(_interrupted(e.name))
            return e.exit_code
        except KeyboardInterrupt:  # raised by code, not by our handler
            acknowledge()
            _say(_interrupted("SIGINT"))
            return 130
        except SystemError as e:  # our Interrupted raised inside a C callback comes back wrapped
            hit = _interrupt_in_chain(e)
            if hit is None:
                raise
            acknowledge()
            _say(_interrupted(hit.name))
            return hit.exit_code
    return 130


def _interrupt_in_chain(e: BaseException) -> Interrupted | None:
    """The `Interrupted` among `e`'s causes/contexts, if a signal is what really ended the call."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Interrupted):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


COMPILE_CACHE_ENV = "PERMUQUANT_COMPILE_CACHE"
CACHE_OFF = ("0", "off", "no", "false", "none")


def enable_compile_cache(disabled: bool = False) -> str | None:
    """Turn on JAX's persistent compilation cache for this process, so that a second run of a CLI skips
    most XLA compilations; returns its folder, or None when off.

    The folder: $PERMUQUANT_COMPILE_CACHE, else $XDG_CACHE_HOME/permuquant_jax/xla (default
    ~/.cache/permuquant_jax/xla); a compilation cache folder already set in JAX's own config
    (JAX_COMPILATION_CACHE_DIR) is kept. `disabled` or PERMUQUANT_COMPILE_CACHE=off|0|none: off."""
    import jax

    value = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if disabled or value.lower() in CACHE_OFF:
        return None
    if not value and "_PERMUQUANT_TEST_JAX_CACHE" in os.environ:
        # inside this project's test session (tests/conftest.py): its own cache or none, never the user's
        # (the signal tests need real compiles; conftest's uncached_env could say PERMUQUANT_COMPILE_CACHE=off)
        return str(jax.config.jax_compilation_cache_dir) if jax.config.jax_compilation_cache_dir else None
    if jax.config.jax_compilation_cache_dir:
        return str(jax.config.jax_compilation_cache_dir)
    folder = value or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                   "permuquant_jax", "xla")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        _say(f"warning: compilation cache {folder}: {e.strerror or e}; running without it (set "
             f"{COMPILE_CACHE_ENV}=DIR to choose another folder, or =off)")
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return folder


def _main(argv: Sequence[str] | None) -> int:
    from permuquant_jax.convert.atomic import OutputError
    from permuquant_jax.convert.safetensors_io import CheckpointError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a malformed command line (one `error:` line already printed)
        return e.code if isinstance(e.code, int) else 2
    if argv is None and not args.dry_run:  # the process's own command line (not a caller's list)
        args.compile_cache = enable_compile_cache(args.no_compile_cache)
    try:
        return run(args)
    except (CheckpointError, OutputError, UsageError, ValueError, OSError) as e:
        _signal_wins()
        if os.environ.get("PERMUQUANT_DEBUG"):
            raise
        _say(f"error: {_one_line(e)}")
        return 2
    except Exception as e:  # noqa: BLE001 - only out-of-memory is answered here; the rest propagates
        if not _out_of_memory(e) or os.environ.get("PERMUQUANT_DEBUG"):
            raise
        _signal_wins()
        _say(f"error: out of memory while {_phase[0]} ({_one_line(e)[:160]}): nothing was written; lower "
             "--calib-samples, --heldout-samples or --resolution, or pass --max-device-memory GIB")
        return 2


def _out_of_memory(e: BaseException) -> bool:
    """A host allocation failure, or XLA's device/host out-of-memory error."""
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return type(e).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and (
        "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text)


def _signal_wins() -> None:
    """If a signal is pending, raise it (it wins over the error it interrupted)."""
    from permuquant_jax.convert.atomic import check_interrupt

    check_interrupt()
