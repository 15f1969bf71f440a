"""Per-method output error of small quantized DiTs against float, per acceptance level.

    python benchmarks/methods_tiny.py [--model tiny|flux-digits|generic-digits] [--format nvfp4] \
        [--hadamard-block 64] [--runs rtn,permuquant:block] [--out benchmarks/results/methods_tiny.md]

A run is `method[:accept]` (accept: layer | block | model, the level a candidate must lower the error
at; default: the library's). Models: `tiny`, the tiny FLUX (the embedded checkpoint when
`convert.load_flux` can read it, else a seeded random init) with synthetic text embeddings, calibrated
along the sampler's trajectories, held out on other seeds; `flux-digits` / `generic-digits`, the DiTs
trained on scikit-learn's digits (`benchmarks/digits_dit.py`: FLUX architecture; the common research
layout with LayerNorm + separate shift/scale linears, quantized with the `adaln` site plan below),
calibration and held-out trajectories from its loaders. The error is the relative L2 error of the
model output (one sampler step) on the held-out batches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.flux import FluxConfig, FluxDiT
from permuquant_jax.quant.flux_plan import flux_calibration_batches, quantize_flux

DEFAULT_RUNS = ("rtn", "smoothquant", "hadamard", "permuquant:layer", "permuquant:block", "permuquant:model",
                "permuquant-h:block", "auto:block")


def tiny_model() -> tuple[FluxDiT, str]:
    try:
        from permuquant_jax.convert import load_flux

        return load_flux(None, dtype=jnp.float32), "embedded tiny checkpoint"
    except Exception as e:  # noqa: BLE001 - the benchmark still runs on a random init
        return FluxDiT(FluxConfig.tiny(), rngs=nnx.Rngs(0)), f"random init, seed 0 ({type(e).__name__})"


def generic_dit_sites(model) -> list:
    """A site plan for `digits_dit.GenericDiT` (the common research layout): per block, the two adaLN
    norms (LayerNorm + separate shift/scale linears) feeding qkv and the MLP's first linear, V -> proj
    within heads, fc1 -> GELU -> fc2. Everything else gets gather sites."""
    from permuquant_jax.quant.sites import AdaLNRef, Ref, Site

    w, heads = model.config.width, model.config.num_heads
    sites = []
    for i in range(model.config.depth):
        b = ("blocks", i)
        sites += [
            Site(f"blocks.{i}.norm1", "adaln", w, consumers=(Ref((*b, "attn", "qkv")),),
                 adaln=AdaLNRef((*b, "norm1"), (*b, "shift1"), (*b, "scale1")), scalable=True),
            Site(f"blocks.{i}.norm2", "adaln", w, consumers=(Ref((*b, "mlp", "layers", 0)),),
                 adaln=AdaLNRef((*b, "norm2"), (*b, "shift2"), (*b, "scale2")), scalable=True),
            Site(f"blocks.{i}.attn_v", "heads", w, consumers=(Ref((*b, "attn", "proj")),),
                 producers=(Ref((*b, "attn", "qkv"), 2 * w),), segments=(w // heads,) * heads, scalable=True),
            Site(f"blocks.{i}.mlp", "rows", model.config.mlp_ratio * w, consumers=(Ref((*b, "mlp", "layers", 2)),),
                 producers=(Ref((*b, "mlp", "layers", 0)),)),
        ]
    return sites


def load_bench(name: str, args):
    """(model, calibration batches, held-out batches, forward, quantize(model, **kw), description)."""
    if name == "tiny":
        model, source = tiny_model()
        kw = dict(num_steps=args.steps, height=args.size, width=args.size, txt_len=32)
        calib = flux_calibration_batches(model, num_samples=args.samples, seed=0, **kw)
        held = flux_calibration_batches(model, num_samples=2, seed=1, **kw)
        desc = (f"tiny FLUX ({source}); calibration: {args.samples} synthetic trajectories x {args.steps} steps at "
                f"{args.size}x{args.size} ({len(calib)} batches); held-out: 2 trajectories of other seeds")
        return model, calib, held, (lambda m, b: m(**b)), (lambda m, **k: quantize_flux(m, calib, **k)), desc
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import digits_dit

    from permuquant_jax.quant import quantize_model

    n = args.samples
    if name == "flux-digits":
        model, calib, held, _ = digits_dit.load_flux_digits(num_calib=n, num_heldout=n)
        return (model, calib, held, digits_dit.call_model, lambda m, **k: quantize_flux(m, calib, **k),
                f"FLUX-architecture DiT trained on digits (digits_dit.load_flux_digits, {n} + {n} trajectories)")
    model, calib, held, _ = digits_dit.load_generic_digits(num_calib=n, num_heldout=n)

    def quantize(m, **k):
        return quantize_model(m, calib, sites=generic_dit_sites(m), keep=("t_embed.*", "out"),
                              forward=digits_dit.call_model, **k)

    return model, calib, held, digits_dit.call_model, quantize, (
        f"generic adaLN DiT trained on digits (digits_dit.load_generic_digits, {n} + {n} trajectories, "
        "adaln site plan)")


def rel_error(model, batches, refs, call) -> float:
    fwd = nnx.jit(call)
    num = den = 0.0
    for b, r in zip(batches, refs, strict=True):
        d = np.asarray(fwd(model, b), np.float64) - r
        num += float(np.sum(d * d))
        den += float(np.sum(r * r))
    return float(np.sqrt(num / den))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=("tiny", "flux-digits", "generic-digits"))
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--hadamard-block", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4, help="calibration trajectories (digits: also held-out)")
    ap.add_argument("--steps", type=int, default=8, help="tiny: sampling steps per trajectory")
    ap.add_argument("--size", type=int, default=128, help="tiny: image side in pixels (tokens: (size/16)^2)")
    ap.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated method[:accept] runs")
    ap.add_argument("--refine", type=int, default=0, help="refinement swaps per site and layer")
    ap.add_argument("--schedule", default="sequential", choices=("sequential", "parallel"))
    ap.add_argument("--tau", type=float, default=0.0, help="acceptance threshold (relative held-out gain)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()

    model, calib, held, call, quantize, desc = load_bench(args.model, args)
    fwd = nnx.jit(call)
    refs = [np.asarray(fwd(model, b), np.float64) for b in held]

    rows = []
    for run in args.runs.split(","):
        method, _, acc = run.partition(":")
        kw = {"accept": acc} if acc else {}
        t0 = time.time()
        q, report = quantize(nnx.clone(model), method=method, format=args.format,
                             hadamard_block=args.hadamard_block, progress=False, refine=args.refine, tau=args.tau,
                             schedule=args.schedule,
                             **kw)
        wall = time.time() - t0
        err = rel_error(q, held, refs, call)
        ds = report.config.get("downstream", {})
        label = method + (f" ({report.config['accept']})" if report.config.get("accept") else "")
        hk = [p for p, h in ds.get("hadamard", {}).items() if h["kept"]]
        sizes: dict[str, int] = {}
        for lay in report.layers.values():
            key = str(lay.get("hadamard_block") or "none")
            sizes[key] = sizes.get(key, 0) + 1
        rows.append((label, err, report.n_accepted, report.n_sites, wall, ds.get("forwards", 0),
                     ds.get("seconds", 0.0), len(hk)))
        print(f"{label}: Hadamard block per linear {sizes}", flush=True)
        print(f"{label:22s} rel. error {err:.4f}  accepted {report.n_accepted}/{report.n_sites}  ({wall:.1f} s; "
              f"downstream {ds.get('forwards', 0)} passes, {ds.get('seconds', 0):.1f} s; Hadamard kept on "
              f"{len(hk)} linears)", flush=True)

    lines = [
        f"# Quantized DiT vs float: {args.format}, {args.model}",
        "",
        f"{desc}. Hadamard block {args.hadamard_block}, tau {args.tau}, refine {args.refine}, schedule "
        f"{args.schedule}. "
        f"JAX {jax.__version__} on {jax.devices()[0].platform}.",
        "",
        "Accepted: sites (x layers) where a candidate lowered the held-out error at the acceptance level",
        "(calibration batches split by sample into a choosing and an accepting half). Downstream passes:",
        "forward passes over a half of the calibration batches spent on block / model-level decisions.",
        "",
        "| method (acceptance) | rel. L2 error of the output (held-out) | sites (x layers) accepted "
        "| Hadamard kept (linears) | wall time (s) | downstream passes | downstream time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, err, acc, n, wall, fw, dsec, nh in rows:
        lines.append(f"| {label} | {err:.4f} | {acc} / {n} | {nh} | {wall:.1f} | {fw} | {dsec:.1f} |")
    lines += ["", "Wall time: quantize (calibration, layer pass, downstream decisions, folding, weight quantization),",
              "compilation included; on a shared CPU machine it varies with the load of other jobs.",
              "", f"Command: `python benchmarks/methods_tiny.py {' '.join(sys.argv[1:])}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
