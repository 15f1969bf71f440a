"""One FLUX.1-dev-size DiT step (random weights) on the GPU: our bf16 vs NVFP4 W4A4 vs NVFP4 W4A16, one run.

    PYTHONPATH=. python3 benchmarks/flux_step.py [--res 1024] [--txt 512] [--batch 1 4] [--iters 10] [--tiny]
        [--variants bf16 w4a4 w4a16 w4a4-mosaic w4a16-mosaic w4a4-dd w4a16-dd] [--mosaic-classes large]
        [--mosaic-config $OUT/mosaic_choice.json] [--no-profile]

bf16 weights N(0, 0.02^2) drawn on the device; every linear then quantized with `QuantLinear.from_linear`
(RTN, no permutation: a folded PermuQuant plan has the same runtime structure; a static activation
global scale per layer, so no amax pass), dispatched by `kernels.dispatch` ("auto"). cuDNN attention.
The "-mosaic" / "-dd" variants run the same weights with the tuning table's GEMM choice replaced by the
Mosaic GPU kernel / decode + cuBLAS for the M classes in --mosaic-classes (the step's M: 4096/4608
"large", 512 "medium", 1 "gemv"). --mosaic-config: a JSON file whose "fields" are the MosaicConfig of the
large class for this run (tests/gpu/check_mosaic.py writes one from its measurements).
Quantization time (`QuantLinear.from_linear` of every linear) is printed and recorded.
Per variant and batch: compile time, the median of `--iters` back-to-back steps, parameter bytes, and
(batch 1) a jax.profiler trace of 3 steps whose GPU kernels are attributed to GEMMs (cuBLAS, our matmul
and decode kernels), attention (cuDNN), activation quantization (our kernel) and the rest. Device
peak memory is read after each variant (a high-water mark: it includes what ran before). Prints the
table last; writes $OUT/flux_step.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_forward import inputs, random_model, rel  # noqa: E402

from permuquant_jax.kernels import dispatch, tuning  # noqa: E402
from permuquant_jax.models.flux import FluxConfig  # noqa: E402
from permuquant_jax.quant.linear import (  # noqa: E402
    QuantLinear,
    drop_device_layouts,
    prepare_device_layouts,
)
from permuquant_jax.quant.paths import find_linears, set_node  # noqa: E402

CATEGORIES = ("gemm", "weight_decode", "act_quant", "attention", "rest")
# --variants: key -> (table name, QuantLinear format, GEMM backend for --mosaic-classes, or {M class: backend},
# or None: the table's)
VARIANTS = {
    "bf16": ("bf16", None, None),
    "w4a4": ("nvfp4 W4A4", "nvfp4", None),
    "w4a16": ("nvfp4 W4A16", "nvfp4-w4a16", None),
    "w4a4-mosaic": ("nvfp4 W4A4 mosaic", "nvfp4", "mosaic"),
    "w4a16-mosaic": ("nvfp4 W4A16 mosaic", "nvfp4-w4a16", "mosaic"),
    "w4a4-dd": ("nvfp4 W4A4 decode+cuBLAS", "nvfp4", "decode_cublas"),
    "w4a16-dd": ("nvfp4 W4A16 decode+cuBLAS", "nvfp4-w4a16", "decode_cublas"),
    # the table's dispatch without the stored Mosaic scale layout (converted per call, as before)
    "w4a4-percall": ("nvfp4 W4A4 layout per call", "nvfp4", None),
    # the M = 1-4 modulation linears by the fused XLA GEMV (kernels/gemv.py) instead of the table's
    "w4a4-xgemv": ("nvfp4 W4A4 XLA GEMV", "nvfp4", {"gemv": "xla_gemv"}),
    "w4a16-xgemv": ("nvfp4 W4A16 XLA GEMV", "nvfp4-w4a16", {"gemv": "xla_gemv"}),
}
NO_LAYOUT = {"w4a4-percall"}


def category(name: str) -> str:
    n = name.lower()
    if "nvfp4_act_quant" in n:
        return "act_quant"
    if "nvfp4_decode" in n:
        return "weight_decode"
    if any(s in n for s in ("fmha", "sdpa", "flash", "attention")):  # before "gemm": cuDNN's names hold "sm90"
        return "attention"
    if any(s in n for s in ("gemm", "nvjet", "xmma", "cutlass", "nvfp4_matmul", "gemv", "cublas", "mgpu")):
        return "gemm"
    return "rest"


def quantize_all(model, fmt: str, act_scale: float = 0.05) -> int:
    lins = find_linears(model)
    for p, lin in lins.items():
        set_node(model, p, QuantLinear.from_linear(lin, format=fmt, act_global_scale=act_scale, name=str(p)))
    return len(lins)


def param_bytes(model) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model)) if hasattr(a, "dtype")))


def batched(args, b: int):
    return tuple(None if a is None else jnp.concatenate([a] * b, axis=0) for a in args)


def time_step(model, args, iters: int, profile_dir: str | None):
    model.attention_impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, *args).compile()
    tc = time.perf_counter() - t0
    out = compiled(state, *args).block_until_ready()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        compiled(state, *args).block_until_ready()
        ts.append(time.perf_counter() - t)
    prof = None
    if profile_dir:
        shutil.rmtree(profile_dir, ignore_errors=True)
        jax.profiler.start_trace(profile_dir)
        for _ in range(3):
            compiled(state, *args).block_until_ready()
        jax.profiler.stop_trace()
        prof = attribute(profile_dir, 3)
    return out, tc, float(np.median(ts)), prof


def attribute(profile_dir: str, steps: int) -> dict:
    """GPU kernel time per category (ms per step) from the trace's stream lines."""
    files = glob.glob(os.path.join(profile_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return {"error": "no xplane.pb written"}
    pd = jax.profiler.ProfileData.from_file(files[0])
    cat = collections.Counter()
    top = collections.Counter()
    lines_seen = collections.Counter()
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen[line.name] += 1
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                cat[category(ev.name)] += ev.duration_ns
                top[ev.name[:80]] += ev.duration_ns
    out = {c: cat[c] / 1e6 / steps for c in CATEGORIES}
    out["total_kernels"] = sum(cat.values()) / 1e6 / steps
    out["top"] = [(n, t / 1e6 / steps) for n, t in top.most_common(40)]
    out["lines"] = dict(lines_seen)
    return out


def lower_cuda(model, args) -> None:
    """Trace and lower one step for the cuda platform (on a CPU: catches shape / primitive errors of
    the GPU code path, the Mosaic and Triton kernels included, before device time is spent)."""
    model.attention_impl = "xla"
    graphdef, state = nnx.split(model)
    low = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).trace(state, *args).lower(lowering_platforms=("cuda",))
    text = low.as_text()
    print(f"  lowered: {text.count('mosaic_gpu')} Mosaic GPU calls, {text.count('__gpu$xla.gpu.triton')} Triton calls")


def mem_stats() -> dict:
    s = jax.devices()[0].memory_stats() or {}
    return {k: s.get(k) for k in ("bytes_in_use", "peak_bytes_in_use")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="a small config (CPU smoke test of this script)")
    ap.add_argument("--variants", nargs="+", default=["bf16", "w4a4", "w4a16"], choices=list(VARIANTS))
    ap.add_argument("--mosaic-classes", nargs="+", default=["large"], choices=[c for c, _ in tuning.M_CLASSES])
    ap.add_argument("--mosaic-config", help="JSON file with the large class's MosaicConfig fields")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--lower-cuda", action="store_true",
                    help="CPU check: lower each step for cuda (Pallas kernels, Mosaic layouts forced), no run")
    args = ap.parse_args()
    if args.lower_cuda:  # the H200's dispatch, as on the GPU
        os.environ[dispatch.ENV_BACKEND] = "pallas"
        dispatch.device_class = lambda: "h200"
        tuning.MOSAIC_MIN_N = 0  # every large-M GEMM of a tiny model takes the Mosaic kernel
    dispatch.filter_triton_deprecation()
    dev = jax.devices()[0]
    out_dir = os.environ.get("OUT")
    if args.tiny:
        cfg = FluxConfig(
            hidden_size=256,
            num_heads=2,
            axes_dim=(16, 56, 56),
            depth=1,
            depth_single_blocks=1,
            context_in_dim=256,
            vec_in_dim=64,
        )
    else:
        cfg = FluxConfig()
    log = {"device": dev.device_kind, "jax": jax.__version__, "res": args.res, "txt": args.txt, "rows": []}
    base = random_model(cfg)
    fargs = inputs(cfg, args.res, args.txt)
    ref = {}
    log["mosaic_classes"] = args.mosaic_classes
    if args.mosaic_config:
        try:
            with open(args.mosaic_config) as f:
                tuning.MOSAIC_LARGE = dict(json.load(f)["fields"])
        except (OSError, KeyError, ValueError) as e:
            print(f"--mosaic-config {args.mosaic_config}: {e}; keeping the table's {tuning.MOSAIC_LARGE}", flush=True)
    log["mosaic_large"] = dict(tuning.MOSAIC_LARGE)
    log["quantize_s"] = {}
    t_start = time.time()
    dev_class = dispatch.device_class() or tuning.FALLBACK_CLASS
    saved_table = dict(tuning.DISPATCH_TABLE.get(dev_class, tuning.DISPATCH_TABLE[tuning.FALLBACK_CLASS]))
    quantized: dict = {}
    for key in args.variants:
        vname, fmt, override = VARIANTS[key]
        if fmt is None:
            model = base
        elif fmt in quantized:  # the same weights, another GEMM choice
            model = quantized[fmt]
        else:
            model = nnx.clone(base)
            t0 = time.perf_counter()
            nlin = quantize_all(model, fmt)
            jax.block_until_ready(nnx.state(model))
            log["quantize_s"][key] = time.perf_counter() - t0  # the first one includes the compiles
            print(f"{vname}: quantized {nlin} linears in {log['quantize_s'][key]:.1f} s", flush=True)
            quantized = {fmt: model}  # keep one quantized model at a time
        table = dict(saved_table)
        if isinstance(override, dict):
            table.update(override)
        elif override:
            table.update({c: override for c in args.mosaic_classes})
        tuning.DISPATCH_TABLE[dev_class] = table
        if fmt is not None:
            drop_device_layouts(model)
            pb_canonical = param_bytes(model)
            example = lambda m: m(*fargs)  # batch 1: the layers' rows per call (text stream, modulation: small M)
            prepared = 0 if key in NO_LAYOUT else prepare_device_layouts(model, example, force=args.lower_cuda)
            jax.block_until_ready(nnx.state(model))
            print(f"{vname}: {prepared} linears hold the Mosaic scale layout", flush=True)
        pb = param_bytes(model)
        if args.lower_cuda:
            lower_cuda(model, fargs)
            print(f"{vname}: lowered for cuda", flush=True)
            continue
        for b in args.batch:
            prof_dir = "/tmp/flux_step_prof" if b == 1 and not args.no_profile else None
            a = batched(fargs, b)
            y, tc, tm, prof = time_step(model, a, args.iters, prof_dir)
            if fmt is None:
                ref[b] = y
            row = {
                "variant": vname,
                "key": key,
                "gemm_table": table,
                "mosaic_layouts": 0 if fmt is None else prepared,
                "param_gib_canonical": (pb if fmt is None else pb_canonical) / 2**30,
                "batch": b,
                "compile_s": tc,
                "step_ms": tm * 1e3,
                "param_gib": pb / 2**30,
                "rel_diff_vs_bf16": rel(y, ref[b]) if b in ref else None,
                "finite": bool(np.isfinite(np.asarray(y, np.float32)).all()),
                "mem": mem_stats(),
                "profile": prof,
            }
            log["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            if prof:
                print("  profile ms/step:", {k: round(prof[k], 2) for k in (*CATEGORIES, "total_kernels")}, flush=True)
                print("  top kernels:", [(n, round(t, 2)) for n, t in prof["top"][:8]], flush=True)
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, "flux_step.json"), "w") as f:
                    json.dump(log, f, indent=1, default=str)
        tuning.DISPATCH_TABLE[dev_class] = saved_table
        print(f"[{time.time() - t_start:.0f} s]", flush=True)
    bf = {r["batch"]: r["step_ms"] for r in log["rows"] if r["variant"] == "bf16"}
    lines = [
        f"# FLUX.1-dev-size DiT step, {args.res}x{args.res}, {dev.device_kind}, JAX {jax.__version__}",
        "| variant | batch | step ms (x bf16) | params GiB | GEMM / decode / act quant / attention / rest ms (b=1) "
        "| compile s | rel diff vs bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in log["rows"]:
        p = r["profile"]
        pr = " / ".join(f"{p[c]:.1f}" for c in CATEGORIES) if p and "gemm" in p else "-"
        rd = "-" if r["rel_diff_vs_bf16"] is None or r["variant"] == "bf16" else f"{r['rel_diff_vs_bf16']:.2e}"
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['step_ms']:.1f} ({r['step_ms'] / bf[r['batch']]:.2f}) | "
            f"{r['param_gib']:.2f} | {pr} | {r['compile_s']:.1f} | {rd} |"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "flux_step_table.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
