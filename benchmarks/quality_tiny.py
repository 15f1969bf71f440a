"""Picture quality of the quantization methods on the trained tiny FLUX pipeline (the embedded default).

    python benchmarks/quality_tiny.py [--quick] [--methods rtn,...] [--formats nvfp4,...] \
        [--out benchmarks/results/quality_tiny.md] [--grid benchmarks/results/quality_tiny.png]
    python benchmarks/quality_tiny.py --workers 20 --budget 320 ...   # every row in its own process (one GPU)

The embedded pipeline (``permuquant_jax/train/tiny.py``: a ``FluxConfig.tiny()`` DiT and the tiny FLUX
autoencoder trained on 64x64 captioned scenes of coloured shapes) generates fixed prompts from fixed
seeds with its bf16 DiT: the reference pictures. Each method x format quantizes a copy of that DiT
with the library's ``quantize_flux`` (defaults: model-level acceptance; Hadamard block 64; embedders
and the final projection kept bf16), calibrated on the DiT inputs along sampling trajectories of the
pipeline's calibration prompts (``calibration_prompts.txt``: training-grammar captions, none of them
evaluated here), then generates the same prompts from the same noise (classifier-free guidance at the
pipeline's default scale, the pipeline's default steps, one jitted Euler step per call so every step's
latents are kept). ``rtn-recal`` (not a default row) is RTN calibrated on other captions of that file:
the pictures' noise floor, what a change that should not matter does to every metric.

``--workers N`` runs each (format, method) row in a process of its own, N at a time, on one device
(no preallocation, 0.9/N of the GPU's memory each; rows still running at ``--budget`` seconds are
stopped), and merges their JSON / pictures (``--merge`` does the same for files of earlier runs).

Columns, all against the bf16 pictures of the same prompt and seed:
- PSNR (dB, uint8 pixels, peak 255) and SSIM (``skimage.metrics.structural_similarity``, RGB), mean
  over the pictures;
- latent err: relative L2 error of the final (packed) latents, over all pictures;
- block err mean / worst: each transformer block (the final layer stays bf16) run on the bf16 model's
  input to it (``quant.downstream.block_errors``; held-out trajectories of other prompts and seeds), relative
  squared error of its outputs (residual streams); mean over blocks (stacked ones counted one by one)
  and the worst one. (Single linears are not comparable across methods: see ``layer_errors``.)
- colour / shape: the semantic check. A classifier trained on the scene renderer's pictures (the
  generator's training distribution: ``train.data``; colour from the foreground's mean RGB, shape from
  the foreground's fill ratio and its 16x16 resampled mask, scikit-learn logistic regressions) reads
  the pictures of the single-shape prompts ("a red circle"); accuracy against the prompt. The bf16 row
  is the float model's own score (its errors are the model's, not the quantizer's);
- agree: fraction of those pictures where the classifier's (colour, shape) equals its reading of the
  bf16 picture;
- accepted: permutation sites accepted / sites; time: wall seconds of ``quantize_flux``.
Below the table: per-phase wall times of each row; the latents' relative error after steps k of the
trajectory (which steps diverge); and PermuQuant / PermuQuant-H (and ``rtn-recal``) against RTN, with
the paired per-picture PSNR difference and its standard error. The JSON adds per-block and per-picture
errors, the accepted sites, the Hadamard choices and ``quantize_flux``'s own fake-quant errors.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from permuquant_jax import quant  # noqa: E402
from permuquant_jax.generate.pipeline import (  # noqa: E402
    FluxPipeline,
    calibration_prompts_path,
    embedded_transformer_path,
    read_prompts,
    to_uint8,
)
from permuquant_jax.models.frozen import frozen_jit  # noqa: E402
from permuquant_jax.train import data as D  # noqa: E402

FORMATS = ("nvfp4", "nvfp4-w4a16", "int4-g64", "int3-g64-w3a3")
METHODS = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h")
CONTROLS = ("rtn-recal",)  # RTN calibrated on other captions: the pictures' noise floor (not in the default rows)
FORMAT_LABELS = {"nvfp4": "NVFP4 W4A4", "nvfp4-w4a16": "NVFP4 W4A16", "int4-g64": "INT4-g64 W4A4",
                 "int3-g64-w3a3": "INT3-g64 W3A3"}
HADAMARD_BLOCK = 64
SINGLE = D.EVAL_SINGLE  # every plain single-shape caption
OTHER = D.EVAL_OTHER  # relations / counts / sizes
_SINGLE_RE = re.compile(r"^a (\w+) (\w+)$")


# ---------------------------------------------------------------------------------------------- semantic check


def foreground(img: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Pixels far (L1 over RGB) from the scenes' background colour."""
    return np.abs(img.astype(np.float32) - np.asarray(D.BACKGROUND, np.float32)).sum(-1) > threshold


def features(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colour features: mean foreground RGB / 255, shape features: fill ratio of the foreground's
    bounding box, its aspect ratio and its 16x16 resampled mask) of a uint8 picture."""
    from PIL import Image

    m = foreground(img)
    if m.sum() < 4:
        return np.zeros(3, np.float32), np.zeros(2 + 256, np.float32)
    ys, xs = np.nonzero(m)
    crop = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = crop.mean()
    aspect = crop.shape[1] / crop.shape[0]
    small = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((16, 16), Image.BILINEAR), np.float32)
    colour = img[m].astype(np.float32).mean(0) / 255.0
    return colour, np.concatenate([[fill, aspect], small.ravel() / 255.0]).astype(np.float32)


class SceneClassifier:
    """Colour and shape of a single-shape picture, learned from the scene renderer's pictures."""

    def __init__(self, size: int, num: int = 1500, seed: int = 12345):
        from sklearn.linear_model import LogisticRegression

        # scenes 0..num-1 of the seed; only the single-shape ones are rendered (drawing is the slow part)
        scenes = [sc for sc in (D.make_scene(seed, i, size) for i in range(num)) if _SINGLE_RE.match(sc.caption)]
        keep = range(len(scenes))
        labels = [_SINGLE_RE.match(sc.caption).groups() for sc in scenes]
        feats = [features(D.render(sc)) for sc in scenes]
        cut = int(0.8 * len(keep))
        xc, xs = np.stack([f[0] for f in feats]), np.stack([f[1] for f in feats])
        yc, ys = np.array([lab[0] for lab in labels]), np.array([lab[1] for lab in labels])
        self.colour = LogisticRegression(max_iter=2000).fit(xc[:cut], yc[:cut])
        self.shape = LogisticRegression(max_iter=2000, C=1.0).fit(xs[:cut], ys[:cut])
        self.heldout = (float(self.colour.score(xc[cut:], yc[cut:])), float(self.shape.score(xs[cut:], ys[cut:])))
        self.n_train = cut

    def predict(self, images: np.ndarray) -> list[tuple[str, str]]:
        feats = [features(im) for im in images]
        c = self.colour.predict(np.stack([f[0] for f in feats]))
        s = self.shape.predict(np.stack([f[1] for f in feats]))
        return list(zip(c.tolist(), s.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------- metrics


def psnr_ssim(images: np.ndarray, refs: np.ndarray, each: bool = False):
    """Mean PSNR (dB, capped at 100) and SSIM of ``images`` against ``refs``; ``each``: also the per-picture lists."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p, s = [], []
    for a, b in zip(images, refs, strict=True):
        p.append(min(peak_signal_noise_ratio(b, a, data_range=255), 100.0) if not np.array_equal(a, b) else 100.0)
        s.append(structural_similarity(b, a, channel_axis=-1, data_range=255))
    out = float(np.mean(p)), float(np.mean(s))
    return (*out, [float(v) for v in p], [float(v) for v in s]) if each else out


def _jsonable(x):
    """``x`` with str keys, lists for tuples/arrays and floats for numpy scalars (for the JSON of a row)."""
    if isinstance(x, dict):
        return {k if isinstance(k, str) else ".".join(map(str, k)) if isinstance(k, tuple) else str(k): _jsonable(v)
                for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, np.generic):
        return x.item()
    return x


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def layer_errors(ref: nnx.Module, q: nnx.Module, batches) -> dict[str, float]:
    """Relative squared output error of each transformer block of ``q`` run on the float model's input to it
    (``quant.downstream.block_errors``; stacked blocks one by one: ``name[i]``).
    Blocks, not single linears: a folded permutation reorders a linear's outputs (rows/heads sites) or
    inputs (norm sites), and SmoothQuant rescales its inputs, so only block outputs (residual streams) are
    comparable across methods."""
    from permuquant_jax.quant.downstream import block_errors

    errs = block_errors(ref, q, batches)
    out = {}
    for name, v in errs.items():
        v = np.atleast_1d(np.asarray(v, np.float64))
        for i, e in enumerate(v.ravel()):
            out[f"{name}[{i}]" if v.size > 1 else name] = float(e)
    return out


# ---------------------------------------------------------------------------------------------- the bench


@frozen_jit
def _cfg_step(dit, x, img_ids2, txt2, txt_ids2, y2, t, dt, scale):
    """One Euler step with classifier-free guidance (``generate.pipeline``'s: the conditional and empty-prompt
    velocities in one DiT call on the doubled batch, ``v = v_u + scale * (v_c - v_u)``)."""
    b = x.shape[0]
    pred = dit(jnp.concatenate([x, x]), img_ids2, txt2, txt_ids2, jnp.full((2 * b,), t, jnp.float32), y2,
               None).astype(jnp.float32)
    return x + dt * (pred[b:] + scale * (pred[:b] - pred[b:]))


class Bench:
    """The embedded pipeline, its prompts' embeddings and noise, the bf16 references and calibration data."""

    def __init__(self, quick: bool, seeds: int, log, pipeline: str | None = None, steps: int | None = None,
                 accept: str | None = None, calib: str = "cond"):
        if calib not in ("cond", "cfg"):
            raise SystemExit(f"--calib must be cond or cfg, found {calib!r}")
        self.quick, self.accept, self.calib_mode = quick, accept, calib
        t0 = self.t0 = time.time()
        if pipeline is None:
            self.pipe = FluxPipeline.embedded(dtype=jnp.bfloat16)
        else:  # a folder in the embedded layout (e.g. the output of python -m permuquant_jax.train.tiny)
            d = Path(pipeline)
            self.pipe = FluxPipeline.from_pretrained(d / "flux1-tiny.safetensors", ae=d / "ae.safetensors",
                                                     clip=d / "clip_l.safetensors", t5=d / "t5xxl_fp16.safetensors",
                                                     tokenizers=d, dtype=jnp.bfloat16)
        p = self.pipe
        dit_file = embedded_transformer_path() if pipeline is None else Path(pipeline) / "flux1-tiny.safetensors"
        self.calib_file = calibration_prompts_path(dit_file)
        if self.calib_file is None:
            raise SystemExit(f"{dit_file}: not a DiT trained by permuquant_jax.train.tiny (no training record)")
        self.size, self.steps, self.cfg = p.default_size(), steps or p.default_steps(), p.default_guidance()
        single = SINGLE[::6] if quick else SINGLE
        self.prompts = [s for s in single for _ in range(seeds)] + (OTHER[:2] if quick else OTHER)
        self.seeds = [1000 + i for i in range(len(self.prompts))]
        self.n_single = len(single) * seeds
        parts, tp = {}, time.time()

        def lap(name: str) -> None:
            nonlocal tp
            parts[name] = round(time.time() - tp, 2)
            tp = time.time()

        txt, txt_ids, y = p.encode_prompts(self.prompts)
        self.text = (txt, txt_ids, y)
        self.noise = p.noise(self.seeds, self.size, self.size)
        p.unconditional(len(self.prompts))
        self.dit = p.dit
        lap("load + encode")
        self.ref_latents, self.ref_images = self.generate(self.dit)
        lap("bf16 references")
        self.ref_trajectory = self.last_trajectory
        # Calibration / held-out text: the pipeline's calibration prompts (training-grammar captions, none of
        # them evaluated here), in a seeded order: the first n_cal calibrate, the next n_held are held out.
        pool = read_prompts(self.calib_file)
        if set(pool) & set(self.prompts):
            raise SystemExit(f"{self.calib_file}: holds evaluated prompts {sorted(set(pool) & set(self.prompts))}")
        pick = np.random.default_rng(7).permutation(len(pool))
        # the same batch shape: one trajectory compile for both (quick: the pictures' too, 4 prompts). Even: the
        # even / odd sample split of a doubled CFG batch [cond; uncond] then keeps every cond with its uncond.
        n_cal, n_held = (len(self.prompts),) * 2 if quick else (16, 16)
        if calib == "cfg" and n_cal % 2:
            raise SystemExit(f"--calib cfg needs an even number of calibration captions, found {n_cal}")
        calib_caps = [pool[i] for i in pick[:n_cal]]
        held_caps = [pool[i] for i in pick[n_cal : n_cal + n_held]]
        self.k = 2 if quick else 6  # recorded steps per trajectory, spread over the schedule
        self.calib = self.trajectories(calib_caps, seed=1)
        self.held = self.trajectories(held_caps, seed=2)
        self.calib_captions, self.held_captions = calib_caps, held_caps
        # the noise control "rtn-recal": RTN calibrated on the next n_cal captions (made when first needed)
        self._alt = lambda: self.trajectories([pool[i] for i in pick[n_cal + n_held : 2 * n_cal + n_held]], seed=3)
        lap("calibration + held-out trajectories")
        self.classifier = SceneClassifier(self.size, num=600 if quick else 1500)
        self.ref_pred = self.classifier.predict(self.ref_images[: self.n_single])
        lap("classifier")
        self.init_s, self.init_parts = time.time() - t0, parts
        log(f"bf16 references: {len(self.prompts)} pictures {self.size}x{self.size}, {self.steps} steps, cfg "
            f"{self.cfg:g}; {len(self.calib)} calibration / {len(self.held)} held-out batches; classifier "
            f"held-out accuracy colour {self.classifier.heldout[0]:.3f} shape {self.classifier.heldout[1]:.3f} "
            f"({time.time() - t0:.0f} s)")

    def trajectories(self, captions: Sequence[str], seed: int) -> list[dict]:
        """DiT inputs at ``self.k`` steps of the float DiT's sampling trajectories of ``captions`` (one batch a
        step, all captions in it). ``calib_mode`` "cond": ``quant.flux_calibration_batches`` (conditional
        trajectories, no guidance: what ``convert`` calibrates on); "cfg": the pictures' own sampler, the
        doubled batch ``[cond; uncond]`` of classifier-free guidance along the guided trajectory."""
        p = self.pipe
        txt, txt_ids, y = p.encode_prompts(list(captions))
        n = len(captions)
        if self.calib_mode == "cond":
            return quant.flux_calibration_batches(
                self.dit, text=(np.asarray(txt), np.asarray(y)), num_samples=n, calib_steps=self.k, seed=seed,
                batch_size=n, num_steps=self.steps, height=self.size, width=self.size, txt_len=p.max_seq_len)
        from permuquant_jax.models.sampling import get_schedule, pack_latents, prepare_img_ids

        x = pack_latents(p.noise([10_000 * seed + i for i in range(n)], self.size, self.size))
        hl = self.size // 16
        img_ids = prepare_img_ids(n, 2 * hl, 2 * hl)
        txt_u, y_u = p.unconditional()
        txt2 = jnp.concatenate([txt, jnp.broadcast_to(jnp.asarray(txt_u), txt.shape)])
        y2 = jnp.concatenate([y, jnp.broadcast_to(jnp.asarray(y_u), y.shape)])
        ids2, txt_ids2 = jnp.concatenate([img_ids, img_ids]), jnp.concatenate([txt_ids, txt_ids])
        sched = np.asarray(get_schedule(self.steps, x.shape[1], **p.schedule), np.float64)
        pick = {int(i) for i in np.unique(np.linspace(0, self.steps - 1, self.k).round())}
        out = []
        for i in range(max(pick) + 1):
            if i in pick:
                out.append(dict(img=jnp.concatenate([x, x]), img_ids=ids2, txt=txt2, txt_ids=txt_ids2,
                                timesteps=jnp.full((2 * n,), sched[i], jnp.float32), y=y2, guidance=None))
            if i < max(pick):
                x = _cfg_step(self.dit, x, ids2, txt2, txt_ids2, y2, jnp.float32(sched[i]),
                              jnp.float32(sched[i + 1] - sched[i]), jnp.float32(self.cfg))
        return out

    def setup(self) -> dict:
        """What the table's header says about this run (JSON-able)."""
        return dict(pictures=len(self.prompts), n_single=self.n_single, size=self.size, steps=self.steps,
                    cfg=self.cfg, accept=self.accept, calib_mode=self.calib_mode,
                    seeds=f"{self.seeds[0]}..{self.seeds[-1]}",
                    calib=len(self.calib), calib_captions=len(self.calib_captions), held=len(self.held),
                    held_captions=len(self.held_captions), clf_train=self.classifier.n_train,
                    clf_heldout=list(self.classifier.heldout), wall_s=time.time() - self.t0,
                    calib_file=self.calib_file.name, init_s=self.init_s, init_parts=self.init_parts,
                    device=jax.devices()[0].device_kind,
                    backend=jax.default_backend(), jax=jax.__version__,
                    ref_sha256=hashlib.sha256(np.ascontiguousarray(self.ref_latents).tobytes()).hexdigest()[:16])

    def generate(self, dit: nnx.Module) -> tuple[np.ndarray, np.ndarray]:
        """(final packed latents, uint8 pictures) of every prompt; ``self.last_trajectory``: the latents
        after each step ``[steps, B, seq, 64]``. The pipeline's Euler loop with classifier-free guidance
        (``FluxPipeline.sample``'s maths, its schedule), one jitted step per call (one compile per DiT)."""
        from permuquant_jax.models.sampling import get_schedule, pack_latents, prepare_img_ids

        p = self.pipe
        txt, txt_ids, y = (jnp.asarray(a) for a in self.text)
        b = self.noise.shape[0]
        x = pack_latents(jnp.asarray(self.noise, jnp.float32))
        img_ids = prepare_img_ids(b, self.noise.shape[1], self.noise.shape[2])
        sched = np.asarray(get_schedule(self.steps, x.shape[1], **p.schedule), np.float64)
        txt_u, y_u = p.unconditional()
        txt2 = jnp.concatenate([txt, jnp.broadcast_to(jnp.asarray(txt_u), txt.shape)])
        y2 = jnp.concatenate([y, jnp.broadcast_to(jnp.asarray(y_u), y.shape)])
        ids2, txt_ids2 = jnp.concatenate([img_ids, img_ids]), jnp.concatenate([txt_ids, txt_ids])
        traj = []
        for t, dt in zip(sched[:-1], np.diff(sched), strict=True):
            x = _cfg_step(dit, x, ids2, txt2, txt_ids2, y2, jnp.float32(t), jnp.float32(dt), jnp.float32(self.cfg))
            traj.append(np.asarray(x, np.float32))
        self.last_trajectory = np.stack(traj)
        images = to_uint8(p.decode(x, self.size, self.size))
        return traj[-1], images

    def semantic(self, images: np.ndarray) -> tuple[float, float, float]:
        pred = self.classifier.predict(images[: self.n_single])
        truth = [_SINGLE_RE.match(p).groups() for p in self.prompts[: self.n_single]]
        colour = float(np.mean([a[0] == t[0] for a, t in zip(pred, truth, strict=True)]))
        shape = float(np.mean([a[1] == t[1] for a, t in zip(pred, truth, strict=True)]))
        agree = float(np.mean([a == r for a, r in zip(pred, self.ref_pred, strict=True)]))
        return colour, shape, agree

    def reference_row(self) -> dict:
        colour, shape, agree = self.semantic(self.ref_images)
        return dict(format="bf16", method="bf16", psnr=float("inf"), ssim=1.0, latent_err=0.0, layer_mean=0.0,
                    step_err=[0.0] * self.steps,
                    layer_worst=0.0, worst_layer="", colour=colour, shape=shape, agree=agree, accepted="",
                    time=0.0)

    def row(self, fmt: str, method: str) -> tuple[dict, np.ndarray]:
        q = nnx.clone(self.dit)
        calib, method_q = self.calib, method
        if method in CONTROLS:  # RTN on other calibration captions: how much the pictures move for nothing
            calib, method_q = self._alt(), "rtn"
        t0 = time.time()
        if self.calib_mode == "cond":
            q, rep = quant.quantize_flux(q, calib, method=method_q, format=fmt, hadamard_block=HADAMARD_BLOCK,
                                         progress=False, accept=self.accept)
        else:  # quantize_flux's call, with the guided velocity as the model output that acceptance measures
            from permuquant_jax.quant.paths import find_linears, match_any

            names = [".".join(map(str, pth)) for pth in find_linears(q)]
            keep = tuple(k for k in quant.FLUX_KEEP if any(match_any(nm, [k]) for nm in names))
            q, rep = quant.quantize_model(q, calib, method=method_q, format=fmt, sites=quant.flux_sites(q),
                                          keep=keep, hadamard_block=HADAMARD_BLOCK, progress=False,
                                          forward=quant.CFGForward(self.cfg),
                                          **({"accept": self.accept} if self.accept else {}))
        wall = time.time() - t0
        lat, images = self.generate(q)
        t_gen = time.time() - t0 - wall
        step_err = [rel_l2(a, b) for a, b in zip(self.last_trajectory, self.ref_trajectory, strict=True)]
        ds = rep.config.get("downstream", {})
        sites = [dict(site=sr.name, chosen=sr.chosen, accepted=bool(sr.accepted), gain=float(sr.gain))
                 for sr in rep.sites]
        ps, ss, ps_each, ss_each = psnr_ssim(images, self.ref_images, each=True)
        lat_each = [rel_l2(a, b) for a, b in zip(lat, self.ref_latents, strict=True)]
        t1 = time.time()
        lerr = layer_errors(self.dit, q, self.held)
        t_blk = time.time() - t1
        worst = max(lerr, key=lerr.get)
        colour, shape, agree = self.semantic(images)
        return dict(format=fmt, method=method, psnr=ps, ssim=ss, latent_err=rel_l2(lat, self.ref_latents),
                    layer_mean=float(np.mean(list(lerr.values()))), layer_worst=lerr[worst], worst_layer=worst,
                    colour=colour, shape=shape, agree=agree, accepted=f"{rep.n_accepted}/{rep.n_sites}",
                    time=wall, layers=lerr, step_err=step_err, sites=sites, psnr_each=ps_each, ssim_each=ss_each,
                    latent_err_each=lat_each,
                    hadamard=_jsonable(ds.get("hadamard")),
                    model_error_fake_quant=_jsonable(ds.get("model_error_fake_quant")),
                    block_errors_fake_quant=_jsonable(ds.get("block_errors_fake_quant")),
                    times=dict(init_s=self.init_s, quantize_s=wall, generate_s=t_gen, block_errors_s=t_blk,
                               downstream_s=ds.get("seconds"), downstream_forwards=ds.get("forwards"))), images


# ---------------------------------------------------------------------------------------------- output


def write_grid(rows: list[tuple[str, np.ndarray]], path: Path, scale: int = 2) -> None:
    """Labelled picture grid: one row per (label, uint8 images [N, H, W, 3])."""
    from PIL import Image, ImageDraw

    n, h, w = rows[0][1].shape[:3]
    label_w, pad = 150, 2
    grid = Image.new("RGB", (label_w + n * (w * scale + pad), len(rows) * (h * scale + pad)), "white")
    d = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y0 = r * (h * scale + pad)
        d.text((4, y0 + h * scale // 2 - 6), label, fill="black")
        for c, img in enumerate(images):
            grid.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST),
                       (label_w + c * (w * scale + pad), y0))
    grid.save(path)


def _f(v: float, nd: int = 4) -> str:
    return "inf" if v == float("inf") else f"{v:.{nd}f}"


def markdown(b: dict, rows: list[dict], cmd: str, wall: float, grid: str | None, note: str = "") -> str:
    lines = [
        "# Picture quality of the quantization methods on the trained tiny FLUX pipeline", "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
        + (f", {wall / 60:.1f} min wall" if wall else "") + f". Machine: {platform.machine()} {platform.system()}, "
        + (f"JAX {b['jax']} on {b['backend']} ({b['device']}).  " if "backend" in b else
           f"JAX {jax.__version__} on {jax.default_backend()}.  "),
        f"Pictures: {b['pictures']} ({b['n_single']} of single-shape prompts, the rest relations / counts / sizes), "
        f"{b['size']}x{b['size']}, {b['steps']} Euler steps, classifier-free guidance {b['cfg']:g}, acceptance "
        f"{b['accept'] or 'library default'}, seeds {b['seeds']}. Calibration "
        f"({b.get('calib_mode', 'cond')} trajectories): {b['calib']} batches "
        f"({b['calib_captions']} training captions not evaluated, one trajectory each); block errors on "
        f"{b['held']} held-out batches of {b['held_captions']} other captions. Semantic classifier: "
        f"{b['clf_train']} rendered scenes, held-out accuracy colour {b['clf_heldout'][0]:.3f}, shape "
        f"{b['clf_heldout'][1]:.3f}.  ",
        *(["Init of a process: " + ", ".join(f"{k} {v:.1f} s" for k, v in b["init_parts"].items()) + ".  "]
          if b.get("init_parts") else []),
        "Columns: see the docstring of `benchmarks/quality_tiny.py`." + (f" Picture grid: `{grid}`." if grid else ""),
        *([f"  \n{note}"] if note else []),
        "",
        "| format | method | PSNR (dB) | SSIM | latent err | block err mean | worst (block) | colour | shape | "
        "agree | accepted | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {FORMAT_LABELS.get(r['format'], r['format'])} | {r['method']} | {_f(r['psnr'], 2)} "
            f"| {_f(r['ssim'], 3)} "
            f"| {_f(r['latent_err'])} | {_f(r['layer_mean'])} | {_f(r['layer_worst'])}"
            f"{' (' + r['worst_layer'] + ')' if r['worst_layer'] else ''} | {r['colour']:.2f} | {r['shape']:.2f} "
            f"| {r['agree']:.2f} | {r['accepted']} | {r['time']:.1f} |")
    timed = [r for r in rows if r.get("times")]
    if timed:
        lines += ["", "Where a row's time goes (wall s; init: the process's pipeline load, bf16 references, "
                  "calibration trajectories and classifier, once per process; generate includes the sampler's "
                  "compile):", "",
                  "| format | method | init | quantize | generate | block errors |", "|---|---|---|---|---|---|"]
        for r in timed:
            t = r["times"]
            lines.append(f"| {FORMAT_LABELS.get(r['format'], r['format'])} | {r['method']} | "
                         f"{t.get('init_s', float('nan')):.1f} | {t['quantize_s']:.1f} | {t['generate_s']:.1f} | "
                         f"{t['block_errors_s']:.1f} |")
    stepped = [r for r in rows if r.get("step_err") and r["method"] != "bf16"]
    if stepped:
        n = len(stepped[0]["step_err"])
        at = sorted({k for k in (1, 2, 3, 5, 8, 12, 16, n) if 1 <= k <= n})
        lines += ["", "Which steps diverge: relative L2 error of the latents after step k (all pictures) against the "
                  "bf16 trajectory:", "", "| format | method | " + " | ".join(f"k={k}" for k in at) + " |",
                  "|---|---|" + "---|" * len(at)]
        for r in stepped:
            lines.append(f"| {FORMAT_LABELS.get(r['format'], r['format'])} | {r['method']} | "
                         + " | ".join(f"{r['step_err'][k - 1]:.4f}" for k in at if k <= len(r["step_err"])) + " |")
    lines += ["", "PermuQuant / PermuQuant-H vs RTN (PSNR, latent err, block err mean; better = higher / lower / "
              "lower):", ""]
    by = {(r["format"], r["method"]): r for r in rows}
    for fmt in dict.fromkeys(r["format"] for r in rows if r["format"] != "bf16"):
        rtn = by.get((fmt, "rtn"))
        if rtn is None:
            continue
        for m in (*CONTROLS, "permuquant", "permuquant-h"):
            r = by.get((fmt, m))
            if r is None:
                continue
            pairs = [("PSNR", r["psnr"], rtn["psnr"], 1), ("latent err", r["latent_err"], rtn["latent_err"], -1),
                     ("block err", r["layer_mean"], rtn["layer_mean"], -1)]
            pairs = [(n, sign * (a - b) > 0) for n, a, b, sign in pairs if np.isfinite(a) and np.isfinite(b)]
            wins = [w for _, w in pairs]
            verdict = f"beats RTN on all {len(wins)}" if all(wins) else (
                f"worse than RTN on all {len(wins)}" if not any(wins) else "mixed: better on " + ", ".join(
                    n for n, w in pairs if w))
            paired = ""
            if r.get("psnr_each") and rtn.get("psnr_each"):  # per picture: is the PSNR difference more than noise?
                d = np.asarray(r["psnr_each"]) - np.asarray(rtn["psnr_each"])
                le = np.asarray(r["latent_err_each"]) - np.asarray(rtn["latent_err_each"])
                paired = (f" (per picture: PSNR higher on {int((d > 0).sum())} of {d.size}, mean difference "
                          f"{d.mean():+.2f} +- {d.std(ddof=1) / np.sqrt(d.size):.2f} dB (s.e.); latent error lower on "
                          f"{int((le < 0).sum())} of {le.size})")
            what = " (noise floor: RTN, other calibration captions)" if m in CONTROLS else ""
            lines.append(f"- {FORMAT_LABELS.get(fmt, fmt)} {m}{what}: PSNR {r['psnr']:.2f} vs {rtn['psnr']:.2f}, "
                         f"latent {r['latent_err']:.4f} vs {rtn['latent_err']:.4f}, block {r['layer_mean']:.4f} vs "
                         f"{rtn['layer_mean']:.4f}: {verdict}{paired}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced setting (CI): fewer prompts, formats, methods")
    p.add_argument("--methods", default=None, help="comma-separated (default: all five; --quick: rtn,permuquant)")
    p.add_argument("--formats", default=None, help="comma-separated (default: all four; --quick: nvfp4)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per single-shape prompt (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's; quick 2)")
    p.add_argument("--accept", default=None, choices=("layer", "block", "model"),
                   help="quantize_flux's acceptance level (default: the library's; quick: layer)")
    p.add_argument("--calib", default="cond", choices=("cond", "cfg"),
                   help="calibration trajectories: conditional without guidance (as convert), or the pictures' CFG "
                   "sampler (doubled [cond; uncond] batches; acceptance then measures the guided velocity)")
    p.add_argument("--out", default=None, help="markdown results file")
    p.add_argument("--json", default=None, help="all numbers as JSON (per-layer errors included)")
    p.add_argument("--grid", default=None, help="picture grid PNG (bf16 and every method at the grid formats)")
    p.add_argument("--save-images", default=None, metavar="FILE.npz",
                   help="the grid's pictures of this run (for --merge)")
    p.add_argument("--merge", default=None, metavar="A.json,B.json",
                   help="only merge the rows (and, beside each JSON, its --save-images .npz) of runs split by format "
                   "into one table and grid")
    p.add_argument("--note", default="", help="a line added to the markdown")
    p.add_argument("--pipeline", default=None, metavar="DIR",
                   help="a folder in the embedded pipeline's layout instead of the embedded pipeline")
    p.add_argument("--grid-formats", default="nvfp4,int3-g64-w3a3", help="formats shown in the grid")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run every (format, method) row in its own process, N at a time (one GPU shared: no "
                   "preallocation, 0.9/N of its memory each), then merge; 0: all rows in this process")
    p.add_argument("--rows", default=None, metavar="F:M[,F:M...]",
                   help="with --workers: these (format, method) rows instead of --formats x --methods")
    p.add_argument("--budget", type=float, default=None, metavar="S",
                   help="with --workers: stop the rows still running S seconds after the start, merge the rest")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="with --workers: the rows' JSON / npz / logs "
                   "(default: a new temporary folder)")
    p.add_argument("--log", default=None, metavar="FILE", help="with --workers: every row's log, one after another")
    p.add_argument("--worker-xla-flags", default="", metavar="FLAGS",
                   help="with --workers: XLA_FLAGS added for the rows (e.g. --xla_gpu_autotune_level=0: the tiny "
                   "model's GEMMs need no autotuning); dropped, with a note, if a probe process refuses them")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else (["rtn", "permuquant"] if args.quick else list(METHODS))
    formats = args.formats.split(",") if args.formats else (["nvfp4"] if args.quick else list(FORMATS))
    for m in methods:
        if m not in quant.METHODS and m not in CONTROLS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {list(quant.METHODS) + list(CONTROLS)}")
    t_all = time.time()

    def log(s: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)

    shown = _without(sys.argv[1:] if argv is None else argv, ("--note",))  # the note is printed on its own
    cmd = "python benchmarks/quality_tiny.py " + " ".join(shlex.quote(a) for a in shown)
    if args.merge:
        return merge(args.merge.split(","), args, cmd.strip())
    if args.workers:  # this process only starts and merges: it must not take the GPU (its workers do)
        jax.config.update("jax_platforms", "cpu")
        return run_rows(formats, methods, args, argv if argv is not None else sys.argv[1:], cmd.strip(), log)
    bench = Bench(args.quick, args.seeds or (1 if args.quick else 2), log, args.pipeline,
                  steps=args.steps or (2 if args.quick else None),
                  accept=args.accept or ("layer" if args.quick else None), calib=args.calib)
    rows = [bench.reference_row()]
    grid_cols = list(range(0, bench.n_single, max(1, bench.n_single // 6)))[:6] + \
        list(range(bench.n_single, len(bench.prompts)))[:4]
    grid_rows = [("bf16", bench.ref_images[grid_cols])]
    grid_formats = set(args.grid_formats.split(","))
    for fmt in formats:
        for m in methods:
            r, images = bench.row(fmt, m)
            rows.append(r)
            log(f"{fmt:14s} {m:13s} PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.3f}  latent {r['latent_err']:.4f}  block "
                f"{r['layer_mean']:.4f} / {r['layer_worst']:.4f} ({r['worst_layer']})  colour {r['colour']:.2f} shape "
                f"{r['shape']:.2f} agree {r['agree']:.2f}  {r['accepted']}  {r['time']:.0f} s")
            if fmt in grid_formats:
                grid_rows.append((f"{FORMAT_LABELS.get(fmt, fmt)}\n{m}", images[grid_cols]))
            if args.json:  # after every row: a stopped run keeps what it measured
                Path(args.json).write_text(json.dumps(dict(setup=bench.setup(), prompts=bench.prompts,
                                                           seeds=bench.seeds, rows=rows), indent=1))
            if args.save_images:
                np.savez_compressed(args.save_images, labels=np.array([g[0] for g in grid_rows]),
                                    images=np.stack([g[1] for g in grid_rows]))
    if args.grid:
        write_grid(grid_rows, Path(args.grid))
    text = markdown(bench.setup(), rows, cmd.strip(), time.time() - t_all, args.grid, args.note)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(setup=bench.setup(), prompts=bench.prompts, seeds=bench.seeds,
                                                   rows=rows), indent=1))
    print(text)
    return 0


def _order(fmt: str, method: str) -> tuple[int, int]:
    return (-1, -1) if fmt == "bf16" else (
        FORMATS.index(fmt) if fmt in FORMATS else len(FORMATS),
        METHODS.index(method) if method in METHODS else 0.5 if method in CONTROLS else 99)


def merge(paths: Sequence[str], args: argparse.Namespace, cmd: str, wall: float = 0.0, note: str | None = None) -> int:
    """One table, JSON and grid from runs split by format or row (their JSON and --save-images files):
    the bf16 row of the first, every other row once, in the table's format x method order."""
    rows, grid_rows, setups, prompts, seeds = {}, {}, [], None, None
    for path in paths:
        d = json.loads(Path(path).read_text())
        setups.append(d["setup"])
        if prompts is None:
            prompts, seeds = d.get("prompts"), d.get("seeds")
        elif d.get("prompts") != prompts or d.get("seeds") != seeds:
            raise SystemExit(f"--merge: {path} evaluated other prompts or seeds than {paths[0]}")
        for r in d["rows"]:
            r.setdefault("times", {})
            if r["method"] != "bf16":
                r["times"].setdefault("init_s", d["setup"].get("init_s", float("nan")))
            rows.setdefault((r["format"], r["method"]), r)
        npz = Path(path).with_suffix(".npz")
        if npz.is_file():
            z = np.load(npz)
            for lab, img in zip(z["labels"], z["images"], strict=True):
                lab = str(lab)
                key = ("bf16", "bf16") if lab == "bf16" else next(
                    ((f, m) for f in FORMATS for m in (*METHODS, *CONTROLS)
                     if lab == f"{FORMAT_LABELS.get(f, f)}\n{m}"), (lab, ""))
                grid_rows.setdefault(key, (lab, img))
    if not setups:
        raise SystemExit("--merge: no results to merge")
    rows = [rows[k] for k in sorted(rows, key=lambda k: _order(*k))]
    grid = [grid_rows[k] for k in sorted(grid_rows, key=lambda k: _order(*k))]
    setup = dict(setups[0], wall_s=max(s.get("wall_s", 0.0) for s in setups))
    refs = {s.get("ref_sha256") for s in setups}
    if len(setups) > 1 and None not in refs:
        same = (f"The bf16 reference latents were bit-identical in all {len(setups)} processes."
                if len(refs) == 1 else f"The bf16 reference latents DIFFER between processes ({len(refs)} versions): "
                "each row is scored against its own process's references.")
        note = f"{note or args.note}  \n{same}" if (note or args.note) else same
    if args.grid and grid:
        write_grid(grid, Path(args.grid))
    text = markdown(setup, rows, cmd, wall, args.grid, args.note if note is None else note)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(setup=setup, prompts=prompts, seeds=seeds, rows=rows,
                                                   processes=setups), indent=1))
        if grid:  # beside it, as --save-images writes it: the merged files merge again (e.g. with another --note)
            np.savez_compressed(Path(args.json).with_suffix(".npz"), labels=np.array([g[0] for g in grid]),
                                images=np.stack([g[1] for g in grid]))
    print(text)
    return 0


WORKER_DROP = ("--workers", "--budget", "--rows", "--work-dir", "--log", "--out", "--json", "--grid", "--save-images",
               "--note", "--formats", "--methods", "--worker-xla-flags")


def _without(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` less the options ``names`` with their values (``--opt value`` or ``--opt=value``)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=", 1)[0] in names:
            skip = "=" not in a
            continue
        keep.append(a)
    return keep


def worker_args(argv: Sequence[str]) -> list[str]:
    """A row process's options: ``argv`` less the orchestration and output ones (``WORKER_DROP``)."""
    return _without(argv, WORKER_DROP)


def run_rows(formats: Sequence[str], methods: Sequence[str], args: argparse.Namespace, argv: Sequence[str],
             cmd: str, log) -> int:
    """Every (format, method) row in its own process of this script (``--workers`` at a time, slowest
    methods first), stopped at ``--budget``; then :func:`merge` of the rows that finished."""
    t0 = time.time()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="quality_tiny_"))
    work.mkdir(parents=True, exist_ok=True)
    rank = {"permuquant-h": 0, "permuquant": 1, "hadamard": 2, "smoothquant": 3, "rtn": 4, "rtn-recal": 5}
    pairs = [tuple(r.split(":", 1)) for r in args.rows.split(",")] if args.rows else [(f, m) for f in formats
                                                                                        for m in methods]
    for pair in pairs:
        if len(pair) != 2 or pair[1] not in (*quant.METHODS, *CONTROLS):
            raise SystemExit(f"--rows: {':'.join(pair)!r} is not FORMAT:METHOD with a known method")
    tasks = sorted(pairs, key=lambda t: (rank.get(t[1], 0), _order(*t)))
    n = max(1, min(args.workers, len(tasks)))
    keep = worker_args(argv)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / n:.3f}",
               PYTHONUNBUFFERED="1")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # N processes: no BLAS thread pools
        env.setdefault(var, "1")
    notes = [args.note] if args.note else []
    if args.worker_xla_flags:  # an unknown XLA flag aborts every process: try it once first
        flags = f"{env.get('XLA_FLAGS', '')} {args.worker_xla_flags}".strip()
        code = "import jax; (jax.numpy.ones(4) @ jax.numpy.ones(4)).block_until_ready()"
        probe = subprocess.run([sys.executable, "-c", code], env=dict(env, XLA_FLAGS=flags), capture_output=True,
                               text=True, timeout=120)
        if probe.returncode == 0:
            env["XLA_FLAGS"] = flags
            notes.append(f"Rows ran with XLA_FLAGS={flags}.")
        else:
            notes.append(f"XLA_FLAGS {args.worker_xla_flags} refused (exit {probe.returncode}): rows ran without them.")
        log(notes[-1])
    pending, running, finished = list(tasks), {}, {}
    log(f"{len(tasks)} rows in {n} processes at a time; work dir {work}")
    while pending or running:
        while pending and len(running) < n:
            f, m = pending.pop(0)
            stem = work / f"{f}__{m}"
            worker = [sys.executable, str(Path(__file__).resolve()), "--formats", f, "--methods", m, "--json",
                      f"{stem}.json", "--save-images", f"{stem}.npz", *keep]
            out = open(f"{stem}.log", "w")  # noqa: SIM115 - closed when the process ends
            running[(f, m)] = (subprocess.Popen(worker, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True), out, time.time())
        for key, (proc, out, ts) in list(running.items()):
            if proc.poll() is not None:
                out.close()
                finished[key] = (proc.returncode, time.time() - ts)
                del running[key]
                log(f"row {key[0]} {key[1]}: exit {proc.returncode} after {time.time() - ts:.0f} s")
        if args.budget and time.time() - t0 > args.budget and running:
            for key, (proc, _out, ts) in running.items():
                log(f"row {key[0]} {key[1]}: stopped at the budget ({time.time() - ts:.0f} s)")
                os.killpg(proc.pid, signal.SIGTERM)
            for key, (proc, out, ts) in running.items():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                out.close()
                finished[key] = ("stopped", time.time() - ts)
            running = {}
            pending_left = [f"{f} {m}" for f, m in pending]
            if pending_left:
                log("not started (budget): " + ", ".join(pending_left))
            pending = []
        time.sleep(0.5)
    if args.log:
        with open(args.log, "w") as fh:
            for f, m in tasks:
                stem = work / f"{f}__{m}"
                if Path(f"{stem}.log").is_file():
                    fh.write(f"===== {f} {m}: {finished.get((f, m), ('not run', 0))[0]} =====\n")
                    fh.write(Path(f"{stem}.log").read_text(errors="replace"))
    done = [str(work / f"{f}__{m}.json") for f, m in sorted(tasks, key=lambda t: _order(*t))
            if (work / f"{f}__{m}.json").is_file() and finished.get((f, m), (None,))[0] == 0]
    missing = [f"{f} {m} ({finished.get((f, m), ('not run',))[0]})" for f, m in tasks
               if str(work / f"{f}__{m}.json") not in done]
    notes.append(f"Rows in {n} parallel processes (one per row)" + ("; not measured: " + ", ".join(missing)
                                                                     if missing else "."))
    note = "  \n".join(notes)
    if not done:
        log("no row finished")
        return 1
    return merge(done, args, cmd, time.time() - t0, note)


if __name__ == "__main__":
    raise SystemExit(main())
