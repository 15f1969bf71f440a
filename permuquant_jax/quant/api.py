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

import functools
from collections.abc import Callable, Iterable, Sequence
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
from permuquant_jax.quant.calibrate import (
    CalibrationStats,
    Forward,
    calibrate,
    default_forward,
    restore,
    run_passes,
    substitute,
)
from permuquant_jax.quant.fold import fold_permutation, fold_smoothing, runtime_smoothing
from permuquant_jax.quant.linear import QuantLinear
from permuquant_jax.quant.paths import Path, find_linears, get_node, match_any, path_str, set_node, stack_shape
from permuquant_jax.quant.permute import DEFAULT_ALPHAS, Candidate, accept, make_candidates
from permuquant_jax.quant.plan import apply_structure, plan_sites, plan_summary  # noqa: F401 - re-exported
from permuquant_jax.quant.report import QuantReport, SiteReport
from permuquant_jax.quant.sites import Ref, Site

Batches = Sequence[Any] | Callable[[], Iterable[Any]]


def _iterate(batches: Batches) -> Iterable[Any]:
    return batches() if callable(batches) else batches


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
        if uses_permutation(method):
            cands = make_candidates(
                mu_a[idx], mu_w[idx], alphas=alphas, segments=site.segments, group=group,
                deal_block=hadamard_block if method == "permuquant-h" else None, dedup=False,
            )
        elif method == "smoothquant":
            s = smoothquant_scales(amx[idx], wmax[idx], smooth_alpha)
            cands = [Candidate(f"smooth(a={smooth_alpha:g})", np.arange(site.size, dtype=np.int32), s)]
        else:
            cands = [Candidate("identity", np.arange(site.size, dtype=np.int32))]
        out[idx] = cands
    return out


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
    progress: bool = True,
) -> tuple[nnx.Module, QuantReport]:
    """Quantize every linear of `model` (in place) with `method`; returns `(model, report)`.

    calibration_batches: a sequence of batches (or a callable returning a fresh iterable), each passed
      to `forward(model, batch)` (default: a dict as keyword arguments, a tuple as positional ones).
      They are run twice (calibration, acceptance); with `stats` given the first pass is skipped.
    method: rtn | smoothquant | hadamard | permuquant | permuquant-h. format: a registry name.
    sites: a site plan (e.g. `flux_plan.flux_sites(model)`); None gives every linear a gather site.
    keep: module-path patterns (fnmatch, or `re:` regex) of linears left in float.
    alphas, tau: PermuQuant's candidate alphas and acceptance threshold.
    hadamard_block: block size for hadamard / permuquant-h. smooth_alpha: SmoothQuant migration strength.
    act_scale: "static" (calibrated activation global scale, NVFP4) or "dynamic" (per call).
    Copy the model first (`nnx.clone`) to keep the float one.
    """
    from permuquant_jax.formats.nvfp4 import global_scale_from_amax
    from permuquant_jax.formats.registry import get_format

    method = check_method(method, hadamard_block)
    fmt = get_format(format)
    if act_scale not in ("static", "dynamic"):
        raise ValueError(f"act_scale must be 'static' or 'dynamic', found {act_scale!r}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, found {tau}")
    hb = hadamard_block if uses_hadamard(method) else None

    targets = [p for p in find_linears(model) if not match_any(p, keep)]
    if not targets:
        raise ValueError("no linear layer to quantize (every linear matches a keep pattern?)")
    target_set = set(targets)
    for p in targets:
        k = get_node(model, p).kernel.get_value().shape[-2]
        if k % fmt.group or (hb and k % hb):
            raise ValueError(
                f"{path_str(p)!r} has {k} input channels, not a multiple of the {fmt.name} group "
                f"{fmt.group}" + (f" and Hadamard block {hb}" if hb else "") + "; add it to keep"
            )
    plan = plan_sites(model, targets, sites)

    if stats is None:
        stats = calibrate(model, _iterate(calibration_batches), targets, forward=forward, progress=progress)
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

    # ---- acceptance pass: one EvalPart per (site, quantized consumer)
    parts_of: dict[Path, list[tuple[int, EvalPart]]] = {}
    for i, cands in site_cands.items():
        s = plan[i]
        stack = stack_shape(model, site_q[i][0].path)
        perms = np.stack([np.stack([c.perm for c in cands[idx]]) for idx in np.ndindex(stack)])
        perms = perms.reshape(*stack, *perms.shape[1:])
        has_scale = cands[next(iter(cands))][0].scale is not None
        scales = None
        if has_scale:
            scales = np.stack([np.stack([c.scale for c in cands[idx]]) for idx in np.ndindex(stack)])
            scales = scales.reshape(*stack, *scales.shape[1:])
        for r in site_q[i]:
            parts_of.setdefault(r.path, []).append((i, EvalPart(r.start, s.size, perms, scales)))

    originals = substitute(
        model, list(parts_of),
        lambda p, m: EvalObserver(m, [part for _, part in parts_of[p]], fmt.name, hb),
    )
    try:
        run_passes(model, _iterate(calibration_batches), forward=forward, variables=EvalStat,
                   desc="acceptance", progress=progress)
        results = {}  # (site, path) -> (err [*stack, C], ref [*stack], amax [*stack, C])
        for p in parts_of:
            obs = get_node(model, p)
            for (i, _), part in zip(parts_of[p], obs.parts, strict=True):
                results[(i, p)] = (
                    np.asarray(part.err[...], np.float64),
                    np.asarray(part.ref[...], np.float64),
                    np.asarray(part.amax[...]),
                )
    finally:
        restore(model, originals)

    # ---- choose
    report = QuantReport(method=method, format=fmt.name, config={
        "alphas": list(map(float, alphas)), "tau": tau, "hadamard_block": hb, "smooth_alpha": smooth_alpha,
        "act_scale": act_scale, "keep": list(keep), "calibration_batches": stats.batches,
    })
    chosen: dict[int, dict] = {}  # site -> {layer idx: candidate index}
    for i, cands in site_cands.items():
        s = plan[i]
        stack = stack_shape(model, site_q[i][0].path)
        chosen[i] = {}
        for idx in np.ndindex(stack):
            rel = sum(
                results[(i, r.path)][0][idx] / max(results[(i, r.path)][1][idx], 1e-30) for r in site_q[i]
            )
            labels = [c.label for c in cands[idx]]
            if uses_permutation(method):
                c, accepted, gain = accept(rel, tau)
            else:
                c, accepted, gain = 0, method == "smoothquant", 0.0
            chosen[i][idx] = c
            report.sites.append(SiteReport(
                site=s.name, kind=s.kind, layer=tuple(int(j) for j in idx),
                consumers=[path_str(r.path) for r in site_q[i]],
                candidates=[{"label": lb, "error": float(e)} for lb, e in zip(labels, rel, strict=True)],
                chosen=labels[c], accepted=bool(accepted), gain=float(gain),
            ))

    # ---- fold: smoothing, then permutations (both leave the float function unchanged)
    perms_out: dict[str, list] = {}
    for i, cands in site_cands.items():
        s = plan[i]
        stack = stack_shape(model, site_q[i][0].path)
        sel = [cands[idx][chosen[i][idx]] for idx in np.ndindex(stack)]
        if sel[0].scale is not None:
            scale = np.stack([c.scale for c in sel]).reshape(*stack, s.size)
            if not fold_smoothing(model, s, scale):
                runtime_smoothing(model, s, scale)
        perm = np.stack([c.perm for c in sel]).reshape(*stack, s.size)
        if np.any(perm != np.arange(s.size)):
            fold_permutation(model, s, perm)
            perms_out[s.name] = perm.tolist()

    # ---- quantize every target
    for p in targets:
        amax = None
        for i, _part in parts_of.get(p, []):
            stack = stack_shape(model, p)
            a = results[(i, p)][2]
            pick = np.array([a[idx][chosen[i][idx]] for idx in np.ndindex(stack)]).reshape(stack)
            amax = pick if amax is None else np.maximum(amax, pick)
        gs = None
        if act_scale == "static" and fmt.uses_global_scale and fmt.act_bits is not None and amax is not None:
            gs = np.asarray(global_scale_from_amax(jnp.asarray(amax)))
            gs = np.where(amax > 0, gs, 1.0).astype(np.float32)
        lin = get_node(model, p)
        q = QuantLinear.from_linear(lin, format=fmt.name, hadamard_block=hb, act_global_scale=gs,
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
            "hadamard_block": hb,
            "act_global_scale": None if gs is None else np.asarray(gs).tolist(),
            "gather": q.gather.get_value() is not None,
            "smooth": q.smooth.get_value() is not None,
        }
    report.permutations = perms_out
    report.gather_indices = {
        path_str(s.norm.gather): list(np.shape(get_node(model, s.norm.gather).get_value()))
        for s in plan if s.norm is not None and get_node(model, s.norm.gather).get_value() is not None
    }
    return model, report


