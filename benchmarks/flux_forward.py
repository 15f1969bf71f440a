"""Forward latency of the bf16 FLUX.1-dev DiT (random weights) on the default device, cuDNN vs XLA attention.

    python benchmarks/flux_forward.py [--res 1024] [--txt 512] [--iters 10] [--depth 19 38] [--out FILE]

Weights are drawn on the device (N(0, 0.02^2), bf16), so nothing is read from disk. For each
attention implementation: lowering + compile time, then the median of ``--iters`` back-to-back
forwards (batch 1). The outputs of the implementations are compared (relative L2 difference).
The embedded tiny checkpoint is also loaded and run with both, as a smoke test of that path.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.convert import load_flux
from permuquant_jax.models.flux import FluxConfig, abstract_flux, param_count


def random_model(cfg: FluxConfig, seed: int = 0):
    model = abstract_flux(cfg, jnp.bfloat16)
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        sds = var.get_value()
        var.set_value(
            jax.jit(lambda k, s=sds: (0.02 * jax.random.normal(k, s.shape)).astype(s.dtype))(jax.random.fold_in(key, i))
        )
    return model


def inputs(cfg: FluxConfig, res: int, n_txt: int, seed: int = 1):
    h = w = res // 16
    rng = np.random.default_rng(seed)
    ids = np.zeros((1, h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return (
        jnp.asarray(rng.standard_normal((1, h * w, cfg.in_channels)), jnp.bfloat16),
        jnp.asarray(ids.reshape(1, h * w, 3)),
        jnp.asarray(rng.standard_normal((1, n_txt, cfg.context_in_dim)), jnp.bfloat16),
        jnp.zeros((1, n_txt, 3), jnp.float32),
        jnp.asarray([0.7], jnp.float32),
        jnp.asarray(rng.standard_normal((1, cfg.vec_in_dim)), jnp.bfloat16),
        jnp.asarray([3.5], jnp.float32) if cfg.guidance_embed else None,
    )


def time_forward(model, args, impl: str, iters: int):
    model.attention_impl = impl
    graphdef, state = nnx.split(model)

    def fwd(state, *a):
        return nnx.merge(graphdef, state)(*a)

    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(state, *args).compile()
    t_compile = time.perf_counter() - t0
    out = compiled(state, *args).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        compiled(state, *args).block_until_ready()
        times.append(time.perf_counter() - t)
    return out, t_compile, float(np.median(times))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--depth", type=int, nargs=2, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)

    tiny = load_flux(None, jnp.bfloat16)
    targs = inputs(tiny.config, 256, 16)
    outs = {impl: time_forward(tiny, targs, impl, 2)[0] for impl in ("xla", "auto")}
    tiny_diff = rel(outs["auto"], outs["xla"])
    print(f"tiny checkpoint, bf16: auto vs xla attention rel diff {tiny_diff:.2e}", flush=True)

    cfg = FluxConfig(depth=args.depth[0], depth_single_blocks=args.depth[1])
    model = random_model(cfg)
    fargs = inputs(cfg, args.res, args.txt)
    rows, results = [], {}
    impls = ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",)
    for impl in impls:
        out, tc, tm = time_forward(model, fargs, impl, args.iters)
        results[impl] = out
        rows.append(f"| {impl} | {tc:.1f} s | {tm * 1e3:.1f} ms |")
        print(rows[-1], flush=True)
    diff = rel(results["cudnn"], results["xla"]) if "cudnn" in results else float("nan")
    table = "\n".join(["| attention | lower+compile | forward (median) |", "|---|---|---|", *rows])
    summary = (
        f"FLUX.1-dev architecture ({param_count(model) / 1e9:.2f}B params, depth {cfg.depth}+"
        f"{cfg.depth_single_blocks}), bf16, batch 1, {args.res}x{args.res} "
        f"({(args.res // 16) ** 2} image + {args.txt} text tokens); cuDNN vs XLA output rel diff "
        f"{diff:.2e}; tiny checkpoint auto vs XLA rel diff {tiny_diff:.2e}"
    )
    print(table + "\n" + summary)
    if args.out:
        header = (
            f"\n## {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
            f"- command: `python benchmarks/flux_forward.py {' '.join(sys.argv[1:])}`\n"
            f"- device: {dev.device_kind}; versions: Python {platform.python_version()}, jax {jax.__version__}, "
            f"flax {__import__('flax').__version__}\n- {summary}\n\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
