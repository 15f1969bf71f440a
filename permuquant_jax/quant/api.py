"""`quantize_model`: calibrate, choose, accept, fold and quantize any Flax NNX model.

Pipeline (each pass is one jitted step per batch, see `calibrate.run_passes`):
1. targets: every float linear not matching a `keep` pattern; sites: the given plan, completed by a
   `gather` site for each target it does not cover (with no plan every target gets one);
2. calibration pass: per-channel E[x^2], max |x|, counts and amax of every target input;
3. candidates per site and layer (method-specific, see `baselines`);
4. acceptance pass: per site, layer and candidate, the relative output error of each quantized consumer
   against float on the calibration batches, summed over the site's consumers; the rule of `permute.accept`;
5. folding (smoothing, then permutations) into the float model, whose function is unchanged;
6. every target becomes a `QuantLinear` (weights quantized after folding and rotation; static activation
   global scale from the amax of its transformed input, measured in the acceptance pass).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.quant.acceptance import EvalObserver, EvalPart, EvalStat
from permuquant_jax.quant.baselines import (
    check_method,
    smoothquant_scales,
    uses_hadamard,
    uses_permutation,
)
from permuquant_jax.quant.batches import Batches, can_split_samples, materialize, split_batches, split_samples
from permuquant_jax.quant.calibrate import (
    CalibrationStats,
    Forward,
    calibrate,
    default_forward,
    restore,
    run_passes,
    substitute,
)
from permuquant_jax.quant.downstream import ACCEPT_LEVELS
from permuquant_jax.quant.fold import GatheredNorm, fold_permutation, fold_smoothing, runtime_smoothing
from permuquant_jax.quant.linear import QuantLinear
from permuquant_jax.quant.paths import (
    Path,
    find_linears,
    get_node,
    match_any,
    path_str,
    set_node,
    skipped_modules,
    stack_shape,
    warn_unmatched_keep,
)
from permuquant_jax.quant.permute import DEFAULT_ALPHAS, Candidate, make_candidates
from permuquant_jax.quant.plan import apply_structure, plan_sites, plan_summary  # noqa: F401 - re-exported
from permuquant_jax.quant.report import QuantReport, SiteReport
from permuquant_jax.quant.sites import Ref, Site

# The default acceptance level, chosen by measurement (`benchmarks/methods_tiny.py --model flux-digits`,
# NVFP4 W4A4, held-out output error: RTN 0.2096, layer 0.2018, block 0.2078, model 0.2000): the model
# output is the error that matters, and block-level decisions did not lower it as much.
DEFAULT_ACCEPT = "model"



@dataclasses.dataclass(frozen=True)
class CFGForward:
    """A `forward` for models sampled with classifier-free guidance: each batch is the doubled batch the
    sampler feeds the model (conditional samples first, the same samples unconditional second, along the
    leading axis); the output is the guided velocity `v_u + scale * (v_c - v_u)`, the error that the
    sampler integrates. Hashable (one compilation per scale)."""

    scale: float

    def __call__(self, model: nnx.Module, batch: Any) -> jax.Array:
        pred = default_forward(model, batch).astype(jnp.float32)
        b = pred.shape[0] // 2
        if pred.shape[0] != 2 * b:
            raise ValueError(f"CFGForward: the batch holds {pred.shape[0]} samples; expected [cond; uncond] "
                             "(an even number)")
        return pred[b:] + self.scale * (pred[:b] - pred[b:])


@dataclasses.dataclass(frozen=True)
class RolloutForward:
    """A `forward` that runs `k` Euler steps of the sampler from a trajectory state and returns the distance
    travelled, `x_k - x_0`: acceptance then measures the error the sampler integrates over k steps (the
    quantized model's own trajectory), not one step on the float model's inputs.

    A batch is the model's keyword arguments for ONE state plus `sigmas` ([k+1] float: the schedule from
    that state on): `img` is the state x_0 (`[n, L, C]`, conditional samples only); with `scale` (CFG) the
    other arrays hold the doubled batch [cond; uncond] (`2n` rows) and each step runs the model on
    `[x; x]` and integrates `v_u + scale (v_c - v_u)`; `scale=None` integrates the model output itself.
    `timesteps` is set per step (every sample at `sigmas[i]`); a step of zero length (`sigmas` padded with its
    last value, a rollout cut at the end of the schedule) runs no model call. The steps run under `lax.scan`, so the
    compiled program does not grow with k; variables the model writes (observers, probes) are carried.
    Hashable (one compilation per scale)."""

    scale: float | None = None

    def __call__(self, model: nnx.Module, batch: dict) -> jax.Array:
        if not isinstance(batch, dict) or "sigmas" not in batch or "img" not in batch:
            raise ValueError("RolloutForward: a batch must be a dict with 'img' (the state) and 'sigmas' ([k+1] "
                             f"schedule); found {sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        sig = jnp.asarray(batch["sigmas"], jnp.float32)
        if sig.ndim != 1 or sig.shape[0] < 2:
            raise ValueError(f"RolloutForward: 'sigmas' must be [k+1] with k >= 1; found shape {sig.shape}")
        x0 = batch["img"].astype(jnp.float32)
        rest = {k: v for k, v in batch.items() if k not in ("img", "sigmas", "timesteps")}
        graphdef, state = nnx.split(model)
        dtype = batch["img"].dtype
        rows = 2 * x0.shape[0] if self.scale is not None else x0.shape[0]

        def euler(x, st, i):
            m = nnx.merge(graphdef, st)
            xin = (jnp.concatenate([x, x]) if self.scale is not None else x).astype(dtype)
            t = jnp.full((rows,), sig[i], jnp.float32)
            pred = default_forward(m, dict(rest, img=xin, timesteps=t)).astype(jnp.float32)
            if self.scale is not None:
                b = x.shape[0]
                pred = pred[b:] + self.scale * (pred[:b] - pred[b:])
            return x + (sig[i + 1] - sig[i]) * pred, nnx.state(m)

        def step(carry, i):
            # a zero-length step (padding past the end of the schedule) moves nothing: skip its model call
            return jax.lax.cond(sig[i + 1] != sig[i], euler, lambda x, st, i: (x, st), *carry, i), None

        (x, state), _ = jax.lax.scan(step, (x0, state), jnp.arange(sig.shape[0] - 1))
        nnx.update(model, state)
        return x - x0


def rollout_batches(states: Sequence[jax.Array], sigmas: Sequence[float] | np.ndarray, starts: Sequence[int],
                    k: int, **common: Any) -> list[dict]:
    """Batches for `RolloutForward`: one per start step `i` in `starts`, the state `states[i]` and the
    schedule `sigmas[i : i + k + 1]`; `common` are the other model arguments (txt, y, ids; doubled for CFG).
    Every batch has the same shapes (one compilation)."""
    sig = np.asarray(sigmas, np.float64)
    out = []
    for i in starts:
        if i < 0 or i + k >= sig.size:
            raise ValueError(f"rollout start {i} with k={k} runs past the schedule of {sig.size - 1} steps; "
                             f"use starts <= {sig.size - 1 - k}")
        out.append(dict(common, img=states[i], sigmas=jnp.asarray(sig[i : i + k + 1], jnp.float32)))
    return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _weight_moments(kernel, start, size):
    """Per input row of kernel[..., start:start+size, :]: sum of squares and max |w| (on the device)."""
    k = kernel[..., start : start + size, :].astype(jnp.float32)
    return jnp.sum(k * k, axis=-1), jnp.max(jnp.abs(k), axis=-1)


def _site_moments(model, site: Site, consumers: Sequence[Ref], stats: CalibrationStats):
    """Site-level E[x^2], max|x| (activations) and mean W^2, max|W| (weights), each `[*stack, size]`."""
    n = site.size
    sumsq = cnt = amx = None
    wsq = wmax = None
    n_out = 0
    for r in consumers:
        st = stats[r.path]
        sl = slice(r.start, r.start + n)
        s_sq = st.sumsq[..., sl].astype(np.float64)
        s_cnt = st.count.astype(np.float64)[..., None]
        s_ax = st.absmax[..., sl]
        kernel = get_node(model, r.path).kernel.get_value()
        w2, wm = (np.asarray(a, np.float64) for a in _weight_moments(kernel, r.start, n))
        sumsq = s_sq if sumsq is None else sumsq + s_sq
        cnt = s_cnt if cnt is None else cnt + s_cnt
        amx = s_ax if amx is None else np.maximum(amx, s_ax)
        wsq = w2 if wsq is None else wsq + w2
        wmax = wm if wmax is None else np.maximum(wmax, wm)
        n_out += kernel.shape[-1]
    return sumsq / np.maximum(cnt, 1.0), amx, wsq / n_out, wmax


def _candidates_for(method, mu_a, mu_w, amx, wmax, *, site, alphas, group, hadamard_block, smooth_alpha):
    """Candidate lists per layer (same length for every layer of the stack)."""
    stack = mu_a.shape[:-1]
    out = {}
    for idx in np.ndindex(stack):
        if uses_permutation(method) or method == "auto":
            cands = make_candidates(
                mu_a[idx], mu_w[idx], alphas=alphas, segments=site.segments, group=group,
                deal_block=hadamard_block if method == "permuquant-h" else None, dedup=False,
                act_absmax=amx[idx], weight_absmax=wmax[idx], deal_groups=True,
            )
            if method == "auto":
                s = smoothquant_scales(amx[idx], wmax[idx], smooth_alpha)
                cands.insert(1, Candidate(f"smooth(a={smooth_alpha:g})", np.arange(site.size, dtype=np.int32), s))
        elif method == "smoothquant":
            s = smoothquant_scales(amx[idx], wmax[idx], smooth_alpha)
            cands = [Candidate(f"smooth(a={smooth_alpha:g})", np.arange(site.size, dtype=np.int32), s)]
        else:
            cands = [Candidate("identity", np.arange(site.size, dtype=np.int32))]
        out[idx] = cands
    return out


def _stack_candidates(cands: dict, stack: tuple[int, ...], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """perms `[*stack, C, n]` and scales `[*stack, C, n]` (ones where a candidate has none; None if none has)."""
    rows = [cands[idx] for idx in np.ndindex(stack)]
    perms = np.stack([np.stack([c.perm for c in r]) for r in rows]).reshape(*stack, len(rows[0]), n)
    if all(c.scale is None for r in rows for c in r):
        return perms.astype(np.int32), None
    one = np.ones(n, np.float32)
    scales = np.stack([np.stack([one if c.scale is None else c.scale for c in r]) for r in rows])
    return perms.astype(np.int32), scales.reshape(*stack, len(rows[0]), n).astype(np.float32)


def _noop_mask(cands: dict, stack: tuple[int, ...], group: int) -> np.ndarray:
    """[*stack, C]: True where a candidate (without scales) puts the same channels in every group as identity."""
    from permuquant_jax.quant.downstream import group_signature

    rows = [cands[idx] for idx in np.ndindex(stack)]
    out = np.zeros((len(rows), len(rows[0])), bool)
    for li, r in enumerate(rows):
        ident = group_signature(np.arange(r[0].perm.size), group)
        for ci, c in enumerate(r):
            out[li, ci] = c.scale is None and group_signature(c.perm, group) == ident
    return out.reshape(*stack, len(rows[0]))


def check_finite_batches(batches: Sequence[Any], what: str = "calibration_batches") -> None:
    """Refuse batches holding NaN or Inf in a floating-point array (the statistics and every error measured
    on them would be NaN, and the chosen scales meaningless); one reduction per array, on its device."""
    for i, batch in enumerate(batches):
        leaves = jax.tree_util.tree_leaves_with_path(batch)
        for path, leaf in leaves:
            if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.inexact):
                continue
            if not bool(jnp.isfinite(leaf).all()):
                where = jax.tree_util.keystr(path) or "the array"
                raise ValueError(f"{what}[{i}] holds NaN or Inf values (in {where}): clean or drop that batch")


def quantize_model(
    model: nnx.Module,
    calibration_batches: Batches,
    *,
    method: str = "permuquant",
    format: str = "nvfp4",
    sites: Sequence[Site] | None = None,
    keep: Sequence[str] = (),
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tau: float = 0.0,
    hadamard_block: int | None = 64,
    smooth_alpha: float = 0.5,
    act_scale: str = "static",
    stats: CalibrationStats | None = None,
    forward: Forward = default_forward,
    backend: str = "auto",
    progress: bool = False,
    accept: str = DEFAULT_ACCEPT,
    accept_batches: Batches | None = None,
    split: str | Sequence[Hashable] | Callable[[Any], Hashable] | None = None,
    blocks: Sequence[str | Path] | None = None,
    top_k: int = 3,
    refine: int = 0,
    schedule: str = "sequential",
    hadamard_sizes: bool = True,
    hadamard_start: str = "none",
    guard: float | None = 0.01,
    act_amax: str | None = None,
) -> tuple[nnx.Module, QuantReport]:
    """Quantize every linear of `model` (in place) with `method`; returns `(model, report)`.

    calibration_batches: a list of batches, a callable returning a fresh iterable, or a generator (read
      once and kept), each passed to `forward(model, batch)` (default: a dict as keyword arguments, a
      tuple as positional ones, else one argument; `forward` must return the model output).
    method: rtn | smoothquant | hadamard | permuquant | permuquant-h | auto (per site the best of RTN,
      smoothing and the orders, and per linear whether a block Hadamard helps). format: a registry name.
    sites: a site plan (e.g. `flux_plan.flux_sites(model)`); None gives every linear a gather site.
    keep: module-path patterns (fnmatch, or `re:` regex) of linears left in float; a pattern matching
      no linear warns, naming the closest module paths.
    alphas: the joint order's alphas. tau: a candidate is kept only if it lowers the held-out error by
      more than this fraction.
    accept: what a candidate must lower: "layer" (the site's consumers' outputs), "block" (the enclosing
      block's outputs: FLUX's residual streams), "model" (the model output). Block and model are
      measured with every other layer quantized, block by block (see `downstream`).
    accept_batches: held-out batches for acceptance; None splits the calibration batches by `split`:
      "samples" (even / odd samples of every batch), a label per batch or a function batch -> label
      (e.g. the trajectory), None: "samples" when every array of every batch has one leading sample
      axis of >= 2 entries, else batch by batch (alternating).
    blocks: the enclosing block paths (None: detected: list elements, stacked modules).
    top_k: candidates (best layer-local error first) measured downstream per site and layer.
    schedule: "sequential" (block by block, layer by layer of a stack: layer l's inputs come from the
      decided layers < l) or "parallel" (block level: a site is decided at every layer of a stacked block
      in the same passes, depth times fewer passes; layers see their neighbours' trial candidates).
    refine: swap moves tried on the best order per site and layer (each kept only if the measured
      downstream error falls; bounded and deterministic); 0: none.
    hadamard_block: block size for hadamard / permuquant-h / auto. smooth_alpha: SmoothQuant strength.
    hadamard_sizes: PermuQuant-H (downstream acceptance) chooses per linear among `hadamard_block`, the
      other block sizes aligned with the format's groups and the linear's column parts, and none; False:
      `hadamard_block` everywhere. hadamard_start: where that choice starts, "none" (RTN is the reference,
      as for every other decision) or "block" (plain Hadamard is); a change is kept only if it lowers the
      held-out error by more than `tau`.
    guard (block / model acceptance): once every decision is made, a block (a layer of a stack) whose
      held-out error exceeds the starting state's (RTN) by more than this fraction has its decisions undone,
      and if the model output is still worse than RTN's, every decision is (`downstream._guard`; two
      held-out passes per round). None: no guard.
    act_scale: "static" (calibrated activation global scale, NVFP4) or "dynamic" (per call).
    act_amax: where static scales come from: "quantized" (the inputs each linear sees in the fake-quantized
      model over the calibration batches, what block / model acceptance ends with; one more pass for methods
      that do not run it), "float" (the float model's inputs, from the layer pass; not with block / model
      acceptance); None: "quantized" with block / model acceptance, else "float". Give every method of a
      comparison the same value, so that its static scales come from the same data.
    Copy the model first (`nnx.clone`) to keep the float one.
    """
    from permuquant_jax.formats.nvfp4 import global_scale_from_amax
    from permuquant_jax.formats.registry import get_format

    method = check_method(method, hadamard_block)
    fmt = get_format(format)
    if act_scale not in ("static", "dynamic"):
        raise ValueError(f"act_scale must be 'static' or 'dynamic', found {act_scale!r}")
    if not (isinstance(tau, int | float) and math.isfinite(tau)) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, found {tau}")
    if accept not in ACCEPT_LEVELS:
        raise ValueError(f"accept must be one of {ACCEPT_LEVELS}, found {accept!r}")
    if schedule not in ("sequential", "parallel"):
        raise ValueError(f"schedule must be 'sequential' or 'parallel', found {schedule!r}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, found {type(model).__name__}; for a Linen model, port it "
                        "to NNX (flax.nnx.bridge) first")
    if calibration_batches is None:
        raise ValueError("calibration_batches is None: pass a list of batches, a callable returning an iterable, "
                         "or a generator")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, found {top_k!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (swap moves per site; 0: off), found {refine!r}")
    if guard is not None and (not math.isfinite(guard) or guard < 0):
        raise ValueError(f"guard must be a finite number >= 0 or None, found {guard}")
    if hadamard_start not in ("none", "block"):
        raise ValueError(f"hadamard_start must be 'none' or 'block', found {hadamard_start!r}")
    if act_amax not in (None, "quantized", "float"):
        raise ValueError(f"act_amax must be 'quantized', 'float' or None, found {act_amax!r}")
    hb = hadamard_block if uses_hadamard(method) else None
    t_start = time.perf_counter()

    linears = find_linears(model)
    warn_unmatched_keep(keep, linears)
    targets = [p for p in linears if not match_any(p, keep)]
    del linears  # a {path: module} dict would keep every float Linear alive while quantizing
    if not targets:
        done = [path_str(tuple(p)) for p, n in nnx.iter_graph(model) if isinstance(n, QuantLinear)]
        if done:
            raise ValueError(f"the model is already quantized ({len(done)} QuantLinear layers, e.g. {done[0]!r}); "
                             "quantize a float copy (nnx.clone the float model before quantize_model)")
        raise ValueError("no linear layer to quantize: " + ("every linear matches a keep pattern" if keep else
                         "the model has no flax.nnx.Linear (or permuquant Linear) layers"))
    if () in targets:
        raise ValueError("the model is itself a linear layer, which cannot be replaced in place: wrap it in a "
                         "module (e.g. nnx.Sequential(linear)) and quantize that")
    target_set = set(targets)
    for p in targets:
        k = get_node(model, p).kernel.get_value().shape[-2]
        if k % fmt.group or (hb and k % hb):
            raise ValueError(
                f"{path_str(p)!r} has {k} input channels, not a multiple of the {fmt.name} group "
                f"{fmt.group}" + (f" and Hadamard block {hb}" if hb else "") + "; add it to keep"
            )
    plan = plan_sites(model, targets, sites)

    notes: list[str] = []
    batches = materialize(calibration_batches, notes)
    check_finite_batches(batches, "calibration_batches")
    chooses = uses_permutation(method) or method == "auto"
    if not chooses:  # nothing is chosen: no held-out half is needed
        choose_b = held_b = batches
    elif accept_batches is not None:
        choose_b, held_b = batches, materialize(accept_batches, notes)
        check_finite_batches(held_b, "accept_batches")
    elif split == "samples" or (split is None and can_split_samples(batches)):
        if not can_split_samples(batches):
            raise ValueError("split='samples' needs every array of every batch to share a leading sample axis of "
                             "at least 2; pass split=None (batch by batch) or labels")
        choose_b, held_b = split_samples(batches)
        batches = choose_b + held_b
        notes.append("choosing / accepting batches: the even / odd samples of every batch")
    else:
        ci, hi = split_batches(batches, split)
        if ci == hi:
            choose_b = held_b = batches
            notes.append("one batch group only: candidates are chosen and accepted on the same batches")
        else:
            choose_b, held_b = [batches[i] for i in ci], [batches[i] for i in hi]

    if stats is None:
        stats = calibrate(model, batches, targets, forward=forward, progress=progress)
    else:
        stats.check_model(model, targets)

    # ---- candidates per site
    site_cands: dict[int, dict] = {}
    site_q: dict[int, list[Ref]] = {}
    for i, s in enumerate(plan):
        q_cons = [r for r in s.consumers if r.path in target_set]
        if not q_cons:
            continue
        site_q[i] = q_cons
        if hb and any(r.start % hb or s.size % hb for r in q_cons):
            raise ValueError(f"site {s.name!r}: Hadamard block {hb} does not divide its columns")
        mu_a, amx, mu_w, wmax = _site_moments(model, s, q_cons, stats)
        site_cands[i] = _candidates_for(
            method, mu_a, mu_w, amx, wmax, site=s, alphas=alphas, group=fmt.group, hadamard_block=hb,
            smooth_alpha=smooth_alpha,
        )

    # ---- layer-local pass: one EvalPart per (site, quantized consumer), on choosing then held-out batches
    parts_of: dict[Path, list[tuple[int, EvalPart]]] = {}
    arrays_of: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for i, cands in site_cands.items():
        s = plan[i]
        stack = stack_shape(model, site_q[i][0].path)
        arrays_of[i] = _stack_candidates(cands, stack, s.size)
        for r in site_q[i]:
            parts_of.setdefault(r.path, []).append((i, EvalPart(r.start, s.size, *arrays_of[i])))

    def read_results():
        res = {}
        for p in parts_of:
            obs = get_node(model, p)
            for (i, _), part in zip(parts_of[p], obs.parts, strict=True):
                res[(i, p)] = (np.asarray(part.err[...], np.float64), np.asarray(part.ref[...], np.float64),
                               np.asarray(part.amax[...]))
        return res

    originals = substitute(
        model, list(parts_of),
        lambda p, m: EvalObserver(m, [part for _, part in parts_of[p]], fmt.name, hb),
    )
    try:
        run_passes(model, choose_b, forward=forward, variables=EvalStat, desc="layer errors", progress=progress)
        res_c = read_results()
        res_all = res_c
        if held_b is not choose_b:
            run_passes(model, held_b, forward=forward, variables=EvalStat, desc="layer errors (held out)",
                       progress=progress)
            res_all = read_results()
    finally:
        restore(model, originals)
        originals.clear()  # nor keep the substituted modules (and their float weights) referenced
    t_layer = time.perf_counter()

    def rel(i, idx, which):
        """Relative squared layer error (no bias) per candidate `[C]`, summed over the site's consumers."""
        tot = 0.0
        for r in site_q[i]:
            ec, rc, _ = res_c[(i, r.path)]
            ea, ra, _ = res_all[(i, r.path)]
            if which == "choose":
                e, d = ec[idx], rc[idx]
            elif which == "held":
                e, d = (ea[idx] - ec[idx], ra[idx] - rc[idx]) if held_b is not choose_b else (ec[idx], rc[idx])
            else:
                e, d = ea[idx], ra[idx]
            tot = tot + e / max(float(d), 1e-30)
        return np.asarray(tot, np.float64)

    # ---- choose
    downstream = chooses and accept != "layer"
    report = QuantReport(method=method, format=fmt.name, config={
        "alphas": list(map(float, alphas)), "tau": tau, "hadamard_block": hadamard_block if method == "auto" else hb,
        "smooth_alpha": smooth_alpha, "act_scale": act_scale, "keep": list(keep),
        "calibration_batches": stats.batches, "accept": accept if chooses else None, "top_k": top_k,
        "schedule": schedule, "refine": refine,
        "hadamard_sizes": hadamard_sizes, "hadamard_start": hadamard_start, "guard": guard,
        "choose_batches": len(choose_b), "accept_batches": len(held_b) if held_b is not choose_b else 0,
        "notes": notes,
    })
    hb_of: dict[Path, int | None] = {p: hb for p in targets}
    amax_of: dict[Path, np.ndarray] = {}
    chosen: dict[int, dict] = {i: {} for i in site_cands}
    ds_info: dict = {}
    noop = {i: _noop_mask(site_cands[i], stack_shape(model, site_q[i][0].path), fmt.group) for i in site_cands}
    if downstream:
        from permuquant_jax.quant.downstream import SiteTrial, decide

        trials = {}
        for i in site_cands:
            stack = stack_shape(model, site_q[i][0].path)
            lc = np.stack([rel(i, idx, "choose") for idx in np.ndindex(stack)]).reshape(*stack, -1)
            labels = [[c.label for c in site_cands[i][idx]] for idx in np.ndindex(stack)]
            perms, scales = arrays_of[i]
            nm, slot, score = noop[i], None, None
            if refine and uses_permutation(method) or (refine and method == "auto"):
                # a free slot for refined orders (starts as the identity; never in the top-k)
                slot = perms.shape[-2]
                perms = np.concatenate([perms, perms[..., :1, :]], axis=-2)
                if scales is not None:
                    scales = np.concatenate([scales, np.ones_like(scales[..., :1, :])], axis=-2)
                lc = np.concatenate([lc, np.full((*stack, 1), np.inf)], axis=-1)
                nm = np.concatenate([nm, np.ones((*stack, 1), bool)], axis=-1)
                labels = [lb + ["refined"] for lb in labels]
                mu_a, _, mu_w, _ = _site_moments(model, plan[i], site_q[i], stats)
                score = np.log(np.maximum(mu_a, 1e-30)) + np.log(np.maximum(mu_w, 1e-30))
            trials[i] = SiteTrial(i, plan[i].name, labels, perms, scales, lc, nm, score=score,
                                  segments=plan[i].segments, group=fmt.group, refine_slot=slot)
        hadamard = {}
        for p in targets:
            k = get_node(model, p).kernel.get_value().shape[-2]
            if method == "auto" and hadamard_block and k % hadamard_block == 0 and all(
                    (st % hadamard_block == 0) for i, part in parts_of[p] for st in (part.start, part.size)):
                hadamard[p] = ((0, int(hadamard_block)), 0)
            else:
                hadamard[p] = ((hb or 0,), 0)
        ds = decide(
            model, targets=targets,
            parts_of={p: [(i, part.start, part.size) for i, part in lst] for p, lst in parts_of.items()},
            trials=trials, format=fmt.name, hadamard=hadamard, choose_hadamard=method == "auto",
            level=accept, top_k=top_k, tau=tau, blocks=blocks, forward=forward, choose_batches=choose_b,
            held_batches=held_b, all_batches=batches, refine=refine, progress=progress, schedule=schedule,
            hadamard_sizes=hadamard_sizes, hadamard_start=hadamard_start, guard=guard,
        )
        chosen = ds["chosen"]
        for (i, idx), (label, perm) in ds["refined"].items():
            site_cands[i][idx] = site_cands[i][idx] + [Candidate(label, perm.astype(np.int32))]
            chosen[i][idx] = len(site_cands[i][idx]) - 1
        ds_info = ds["info"]
        hb_of = dict(ds["hadamard"])
        amax_of = ds["amax"]
        report.config["downstream"] = {
            "forwards": ds["forwards"], "seconds": round(ds["seconds"], 3), "blocks": ds["blocks"],
            "hadamard": ds["hadamard_info"], "model_error_fake_quant": ds["model_error"],
            "block_errors_fake_quant": ds["block_errors"], "guard": ds.get("guard"),
        }
    for i, cands in site_cands.items():
        s = plan[i]
        stack = stack_shape(model, site_q[i][0].path)
        for idx in np.ndindex(stack):
            rc, rh = rel(i, idx, "choose"), rel(i, idx, "held")
            labels = [c.label for c in cands[idx]]
            info = ds_info.get((i, idx), {})
            if downstream:
                c = chosen[i][idx]
                accepted = bool(info.get("accepted", False))
                hb_, hbe = info.get("heldout_before"), info.get("heldout_best")
                gain = (hb_ - hbe) / hb_ if hb_ and hbe is not None else 0.0
            elif chooses:
                ok = ~noop[i][idx]
                ok[0] = True
                masked = np.where(ok, rc, np.inf)
                best = int(np.argmin(masked))
                gain = (rh[0] - rh[best]) / rh[0] if rh[0] > 0 else 0.0
                accepted = best != 0 and gain > tau
                c = best if accepted else 0
                info = {"level": "layer", "best": labels[best], "choose_before": float(rc[0]),
                        "choose_best": float(rc[best]), "heldout_before": float(rh[0]),
                        "heldout_best": float(rh[best]), "accepted": bool(accepted),
                        "note": "" if ok[1:].any() else
                        "skipped: no candidate changes which channels share a quantization group"}
            else:
                c, accepted, gain = 0, method == "smoothquant", 0.0
            chosen[i][idx] = c
            report.sites.append(SiteReport(
                site=s.name, kind=s.kind, layer=tuple(int(j) for j in idx),
                consumers=[path_str(r.path) for r in site_q[i]],
                candidates=[{"label": lb, "error": float(e), "heldout_error": float(h)}
                            for lb, e, h in zip(labels[: len(rc)], rc, rh, strict=True)]
                + [{"label": lb, "error": None, "heldout_error": None} for lb in labels[len(rc):]],
                chosen=labels[c], accepted=bool(accepted), gain=float(gain), decision=_plain(info),
            ))

    if act_amax == "float" and downstream:
        raise ValueError(f"act_amax='float' cannot be used with accept={accept!r} (its decisions end with the "
                         "quantized model's amax); pass act_amax='quantized' or None")
    static = act_scale == "static" and fmt.uses_global_scale and fmt.act_bits is not None
    if act_amax == "quantized" and not downstream and static:
        from permuquant_jax.quant.downstream import quantized_amax

        amax_of = quantized_amax(
            model, targets=targets,
            parts_of={p: [(i, part.start, part.size) for i, part in lst] for p, lst in parts_of.items()},
            sites={i: (*arrays_of[i], chosen[i]) for i in site_cands}, hadamard=hb_of, format=fmt.name,
            forward=forward, batches=batches, progress=progress,
        )
    report.config["act_amax"] = None if not static else ("quantized" if amax_of else "float")

    # ---- fold: smoothing, then permutations (both leave the float function unchanged)
    perms_out: dict[str, list] = {}
    for i, cands in site_cands.items():
        s = plan[i]
        stack = stack_shape(model, site_q[i][0].path)
        sel = [cands[idx][chosen[i][idx]] for idx in np.ndindex(stack)]
        if any(c.scale is not None for c in sel):
            scale = np.stack([np.ones(s.size, np.float32) if c.scale is None else c.scale
                              for c in sel]).reshape(*stack, s.size)
            if not fold_smoothing(model, s, scale):
                runtime_smoothing(model, s, scale)
        perm = np.stack([c.perm for c in sel]).reshape(*stack, s.size)
        if np.any(perm != np.arange(s.size)):
            fold_permutation(model, s, perm)
            perms_out[s.name] = perm.tolist()

    # ---- quantize every target
    for p in targets:
        stack = stack_shape(model, p)
        amax = amax_of.get(p)
        if amax is None:
            for i, _part in parts_of.get(p, []):
                a = res_all[(i, p)][2]
                pick = np.array([a[idx][chosen[i][idx]] for idx in np.ndindex(stack)]).reshape(stack)
                amax = pick if amax is None else np.maximum(amax, pick)
        gs = None
        if act_scale == "static" and fmt.uses_global_scale and fmt.act_bits is not None and amax is not None:
            gs = np.asarray(global_scale_from_amax(jnp.asarray(amax)))
            gs = np.where(amax > 0, gs, 1.0).astype(np.float32)
        lin = get_node(model, p)
        q = QuantLinear.from_linear(lin, format=fmt.name, hadamard_block=hb_of[p], act_global_scale=gs,
                                    name=path_str(p), backend=backend)
        set_node(model, p, q)
        kernel = lin.kernel.get_value()
        report.layers[path_str(p)] = {
            "format": fmt.name,
            "in_features": int(kernel.shape[-2]),
            "out_features": int(kernel.shape[-1]),
            "stack": list(kernel.shape[:-2]),
            "use_bias": getattr(lin, "bias", None) is not None,
            "param_dtype": jnp.dtype(kernel.dtype).name,
            "hadamard_block": hb_of[p],
            "act_global_scale": None if gs is None else np.asarray(gs).tolist(),
            "gather": q.gather.get_value() is not None,
            "smooth": q.smooth.get_value() is not None,
        }
    report.permutations = perms_out
    report.gather_indices = {
        path_str(s.norm.gather): list(np.shape(get_node(model, s.norm.gather).get_value()))
        for s in plan if s.norm is not None and get_node(model, s.norm.gather).get_value() is not None
    }
    for s in plan:  # adaln sites: the GatheredNorm's index (apply_structure wraps the norm again)
        if s.adaln is not None and isinstance(get_node(model, s.adaln.norm), GatheredNorm):
            idx = get_node(model, s.adaln.norm).index.get_value()
            if idx is not None:
                report.gather_indices[path_str(s.adaln.norm) + ".index"] = list(np.shape(idx))
    report.skipped = skipped_modules(model, keep)
    report.config["seconds"] = {"layer_pass": round(t_layer - t_start, 3),
                                "total": round(time.perf_counter() - t_start, 3)}
    return model, report


def _plain(d: dict) -> dict:
    """JSON-safe copy (numpy scalars to floats)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, list):
            v = [_plain(x) if isinstance(x, dict) else x for x in v]
        out[k] = v
    return out
