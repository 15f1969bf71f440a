"""Per-method output error of the quantized tiny FLUX DiT against float (synthetic calibration).

    python benchmarks/methods_tiny.py [--format nvfp4] [--hadamard-block 64] \
        [--out benchmarks/results/methods_tiny.md]

Builds the tiny FLUX model (the embedded checkpoint when `convert.load_flux` can read it, else a
seeded random init), draws calibration batches along the sampler's trajectories (synthetic text
embeddings), quantizes a copy with each method and reports the relative L2 error of the DiT output on
held-out trajectories (other seeds) and the number of sites (x layers) accepted.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.flux import FluxConfig, FluxDiT
from permuquant_jax.quant.baselines import METHODS
from permuquant_jax.quant.flux_plan import flux_calibration_batches, quantize_flux


def tiny_model() -> tuple[FluxDiT, str]:
    try:
        from permuquant_jax.convert import load_flux

        return load_flux(None, dtype=jnp.float32), "embedded tiny checkpoint"
    except Exception as e:  # noqa: BLE001 - the benchmark still runs on a random init
        return FluxDiT(FluxConfig.tiny(), rngs=nnx.Rngs(0)), f"random init, seed 0 ({type(e).__name__})"


def rel_error(model, batches, refs) -> float:
    fwd = nnx.jit(lambda m, b: m(**b))
    num = den = 0.0
    for b, r in zip(batches, refs, strict=True):
        d = np.asarray(fwd(model, b), np.float64) - r
        num += float(np.sum(d * d))
        den += float(np.sum(r * r))
    return float(np.sqrt(num / den))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--hadamard-block", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4, help="calibration trajectories")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps per trajectory")
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (tokens: (size/16)^2)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()

    model, source = tiny_model()
    kw = dict(num_steps=args.steps, height=args.size, width=args.size, txt_len=32)
    calib = flux_calibration_batches(model, num_samples=args.samples, seed=0, **kw)
    held = flux_calibration_batches(model, num_samples=2, seed=1, **kw)
    fwd = nnx.jit(lambda m, b: m(**b))
    refs = [np.asarray(fwd(model, b), np.float64) for b in held]

    rows = []
    for method in METHODS:
        t0 = time.time()
        q, report = quantize_flux(
            nnx.clone(model),
            calib,
            method=method,
            format=args.format,
            hadamard_block=args.hadamard_block,
            progress=False,
        )
        err = rel_error(q, held, refs)
        # layer-local: sum over sites of the calibration error of the kept candidate, vs RTN's identity
        local = sum(s.error_chosen for s in report.sites)
        rows.append((method, err, local, report.n_accepted, report.n_sites, time.time() - t0))
        print(
            f"{method:13s} rel. error {err:.4f}  accepted {report.n_accepted}/{report.n_sites}  "
            f"({time.time() - t0:.1f} s)",
            flush=True,
        )

    lines = [
        f"# Quantized tiny FLUX vs float: {args.format}, {source}",
        "",
        f"Calibration: {args.samples} synthetic trajectories x {args.steps} steps at {args.size}x{args.size} "
        f"({len(calib)} batches); held-out: 2 trajectories of other seeds ({len(held)} batches). "
        f"Hadamard block {args.hadamard_block}. JAX {jax.__version__} on {jax.devices()[0].platform}.",
        "",
        "Layer-local error: the sum over sites (x layers) of the calibration-set relative output error of",
        "the site's quantized consumers with the kept candidate (what the acceptance rule minimizes).",
        "",
        "| method | rel. L2 error of DiT output (held-out) | layer-local error (calibration) "
        "| sites (x layers) accepted | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for method, err, local, acc, n, wall in rows:
        lines.append(f"| {method} | {err:.4f} | {local:.4f} | {acc} / {n} | {wall:.1f} |")
    lines += ["", "Wall time: quantize (calibration, acceptance, folding, weight quantization) plus the held-out",
              "evaluation, compilation included; on a shared CPU machine it varies with the load of other jobs."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
