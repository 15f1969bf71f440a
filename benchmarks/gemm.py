"""NVFP4 GEMM benchmark at the FLUX.1-dev linear shapes (run on the GPU), one table, side by side:

    cuBLAS bf16 (jnp.dot) | XLA dequantize-then-dot | jax.nn.scaled_matmul (nvfp4) |
    ours W4A16 (bf16 x) | ours W4A4 = activation quantization + matmul (both timed)

    PYTHONPATH=. python3 benchmarks/gemm.py [--sweep] [--shapes all|quick]

Timing: each measured call runs `inner` times inside one jit over distinct copies of its inputs (no
L2 reuse across calls, one dispatch per `inner` calls), after a warm-up; the median over `reps`
repetitions divided by `inner`. `--sweep` first times candidate kernel configs per M class and uses
the fastest (printed, to copy into kernels/tuning.py). Writes everything to $OUT/gemm.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from permuquant_jax.formats import nvfp4
from permuquant_jax.kernels import act_quant as aq
from permuquant_jax.kernels import dispatch, tuning
from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig, nvfp4_matmul, prepack

SHAPES = [
    ("modulation GEMV", 1, 3072, 18432),
    ("modulation GEMV", 1, 3072, 9216),
    ("txt qkv", 512, 3072, 9216),
    ("img qkv", 4096, 3072, 9216),
    ("img fc1", 4096, 3072, 12288),
    ("img fc2", 4096, 12288, 3072),
    ("single linear1", 4608, 3072, 21504),
    ("single linear2", 4608, 15360, 3072),
]
HBM_TBS = {"h100": 2.94, "h200": 3.58}  # measured copies (read + write): H100.md; gemm_variants on the H200

C, K = "chunk128", "canonical"
G = "gemv"
SWEEP = {  # (weight layout, config)
    "small": [  # M <= 16
        (C, MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=4, split_k=4)),
        (C, MatmulConfig(block_n=64, num_warps=4, num_stages=3, split_k=2, kind=G)),
        (C, MatmulConfig(block_n=64, num_warps=4, num_stages=3, split_k=2, kind=G, decode="asm")),
        (C, MatmulConfig(block_n=128, num_warps=4, num_stages=3, split_k=2, kind=G, decode="asm")),
        (C, MatmulConfig(block_n=32, num_warps=4, num_stages=4, split_k=4, kind=G, decode="asm")),
        (C, MatmulConfig(block_n=64, num_warps=8, num_stages=3, split_k=4, kind=G, decode="asm")),
        (C, MatmulConfig(block_n=128, num_warps=8, num_stages=3, split_k=1, kind=G, decode="asm")),
        (C, MatmulConfig(block_n=16, num_warps=2, num_stages=4, split_k=4, kind=G, decode="asm")),
    ],
    "medium": [  # M = 512
        (C, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3)),
        (C, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=2)),
        (C, MatmulConfig(block_n=128, block_m=128, num_warps=4, num_stages=3)),
    ],
    "large": [  # M >= 4096
        (C, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3)),
        (C, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=2)),
        (C, MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3, decode="asm")),
        (C, MatmulConfig(block_n=128, block_m=128, num_warps=4, num_stages=3)),
        (C, MatmulConfig(block_n=256, block_m=128, num_warps=8, num_stages=2)),
    ],
}
ACT_SWEEP = [
    {"block_m": 16, "block_k": 256, "num_warps": 4, "num_stages": 1},
    {"block_m": 8, "block_k": 512, "num_warps": 4, "num_stages": 1},
    {"block_m": 32, "block_k": 256, "num_warps": 8, "num_stages": 1},
    {"block_m": 16, "block_k": 512, "num_warps": 8, "num_stages": 1},
    {"block_m": 4, "block_k": 1024, "num_warps": 4, "num_stages": 1},
]


def m_class(m: int) -> str:
    return "small" if m <= 16 else ("medium" if m <= 1024 else "large")


def bench(fn, arg_sets, reps: int = 15) -> float:
    """Median seconds per call of `fn(*args)`, run once per input set inside one jit."""
    f = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(f(arg_sets))
    jax.block_until_ready(f(arg_sets))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(arg_sets))
        times.append(time.perf_counter() - t)
    return statistics.median(times) / len(arg_sets)


def copies(a, n: int):
    return [jax.tree.map(lambda t: jnp.array(t, copy=True), a) for _ in range(n)]


def make_inputs(key, m, k, n, inner):
    kx, kw = jax.random.split(key)
    x = (jax.random.normal(kx, (m, k), jnp.float32)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (n, k), jnp.float32) * 0.02
    wq = jax.jit(nvfp4.quantize)(w)
    wb = w.astype(jnp.bfloat16)
    return dict(
        x=copies(x, inner),
        wb=copies(wb, inner),
        wq=copies(wq, inner),
        wp=copies(prepack(wq, layout="chunk128"), inner),
        wpc=copies(prepack(wq, layout="canonical"), inner),
    )


def time_shape(key, m, k, n, layout_cfg, act_cfg, with_baselines=True):
    layout, cfg = layout_cfg
    inner = 16 if m <= 16 else (8 if m <= 1024 else 4)
    d = make_inputs(key, m, k, n, inner)
    res = {}
    x, wb, wq = d["x"], d["wb"], d["wq"]
    wp = d["wp"] if layout == "chunk128" else d["wpc"]
    gs = jnp.full((m,), 0.01, jnp.float32)
    if with_baselines:
        dot_nt = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))
        res["cublas_bf16"] = bench(dot_nt, list(zip(x, wb, strict=True)))
        res["xla_dequant_dot"] = bench(
            lambda a, q: dot_nt(a, nvfp4.dequantize(q, jnp.bfloat16)), list(zip(x, wq, strict=True))
        )
        xq = [aq.quantize_act(xi, global_scale=0.01, **act_cfg) for xi in x]

        def smm(a, q):
            av, asc = nvfp4.to_scaled_matmul(a)
            bv, bsc = nvfp4.to_scaled_matmul(q)
            y = jax.nn.scaled_matmul(av[None], bv[None], asc[None], bsc[None], preferred_element_type=jnp.float32)
            return (y[0] * (a.global_scale * q.global_scale)).astype(jnp.bfloat16)

        try:
            res["scaled_matmul"] = bench(smm, list(zip(xq, wq, strict=True)))
        except Exception as e:  # report, keep going
            res["scaled_matmul_error"] = str(e)[:300]
    res["w4a16"] = bench(
        lambda a, p: nvfp4_matmul(a, p, None, None, config=cfg, out_dtype=jnp.bfloat16), list(zip(x, wp, strict=True))
    )
    res["act_quant"] = bench(lambda a: aq.act_quant(a, gs, out="values", **act_cfg), [(xi,) for xi in x])
    xv = [aq.act_quant(xi, gs, out="values", **act_cfg) for xi in x]
    res["w4a4_matmul"] = bench(
        lambda a, p: nvfp4_matmul(a, p, gs, None, config=cfg, out_dtype=jnp.bfloat16), list(zip(xv, wp, strict=True))
    )

    def w4a4(a, p):
        v = aq.act_quant(a, gs, out="values", **act_cfg)
        return nvfp4_matmul(v, p, gs, None, config=cfg, out_dtype=jnp.bfloat16)

    res["w4a4_total"] = bench(w4a4, list(zip(x, wp, strict=True)))
    if m >= 512:  # the dispatch's large-M path: Pallas decode of W to exact fp16/bf16, then cuBLAS
        wpc = d["wpc"]
        res["w4a16_dqdot"] = bench(
            lambda a, p: dispatch.dequant_dot(a, p, None, None, out_dtype=jnp.bfloat16), list(zip(x, wpc, strict=True))
        )

        def w4a4_dq(a, p):
            v = aq.act_quant(a, gs, out="values", **act_cfg)
            return dispatch.dequant_dot(v, p, gs, None, out_dtype=jnp.bfloat16)

        res["w4a4_dqdot_total"] = bench(w4a4_dq, list(zip(x, wpc, strict=True)))
    return res


def sweep(key, out_log):
    """Best Triton config per M class, then the dispatch row: per M class of `tuning.M_CLASSES`, the
    faster of the best Triton config and decode + cuBLAS (W4A4 fp16 values + W4A16 bf16, summed)."""
    best = {}
    row = {}
    reps_shape = {
        "gemv": ("small", (1, 3072, 18432)),
        "small": ("medium", (64, 3072, 9216)),
        "medium": ("medium", (512, 3072, 9216)),
        "large": ("large", (4096, 3072, 9216)),
    }
    for mcls, (cls, (m, k, n)) in reps_shape.items():
        inner = 16 if m <= 16 else (8 if m <= 1024 else 4)
        d = make_inputs(key, m, k, n, inner)
        xv = [xi.astype(jnp.float16) for xi in d["x"]]
        gs = jnp.full((m,), 0.01, jnp.float32)
        rows = []
        for layout, cfg in SWEEP[cls]:
            wps = d["wp"] if layout == "chunk128" else d["wpc"]
            try:
                t = bench(
                    lambda a, p, c=cfg, g=gs: nvfp4_matmul(a, p, g, None, config=c, out_dtype=jnp.bfloat16),
                    list(zip(xv, wps, strict=True)),
                    reps=7,
                )
                tb = bench(
                    lambda a, p, c=cfg: nvfp4_matmul(a, p, None, None, config=c, out_dtype=jnp.bfloat16),
                    list(zip(d["x"], wps, strict=True)),
                    reps=7,
                )
            except Exception as e:
                print(f"sweep {cls} {cfg}: ERROR {str(e)[:400]}", flush=True)
                out_log.append({"sweep": cls, "config": dataclasses.asdict(cfg), "error": str(e)[:2000]})
                continue
            rows.append((t + tb, t, tb, (layout, cfg)))
            print(
                f"sweep {cls} {m}x{k}x{n} {layout} {cfg}: fp16 {t * 1e6:.1f} us, bf16 {tb * 1e6:.1f} us",
                flush=True,
            )
            out_log.append(
                {"sweep": cls, "layout": layout, "config": dataclasses.asdict(cfg), "fp16_s": t, "bf16_s": tb}
            )
        if not rows:
            continue
        top = min((r for r in rows if r[3][1].decode != "noscale"), key=lambda r: r[0])
        if mcls != "small":
            best[cls] = top[3]
        tq = bench(
            lambda a, p, g=gs: dispatch.dequant_dot(a, p, g, None, out_dtype=jnp.bfloat16),
            list(zip(xv, d["wpc"], strict=True)),
            reps=7,
        )
        tqb = bench(
            lambda a, p: dispatch.dequant_dot(a, p, None, None, out_dtype=jnp.bfloat16),
            list(zip(d["x"], d["wpc"], strict=True)),
            reps=7,
        )
        row[mcls] = "triton" if top[0] <= tq + tqb else "decode_cublas"
        print(f"dispatch {mcls} {m}x{k}x{n}: triton {top[0] * 1e6:.1f} us, decode_cublas {(tq + tqb) * 1e6:.1f} us")
        out_log.append({"dispatch": mcls, "triton_s": top[0], "decode_cublas_s": tq + tqb})
    print(f"tuning.DISPATCH_TABLE[{dispatch.device_class()!r}] = {row!r}", flush=True)
    # activation quantization alone at M = 4608, K = 3072
    x = copies(jax.random.normal(key, (4608, 3072), jnp.float32).astype(jnp.bfloat16), 4)
    gs = jnp.full((4608,), 0.01, jnp.float32)
    arows = []
    for acfg in ACT_SWEEP:
        try:
            t = bench(lambda a, c=acfg: aq.act_quant(a, gs, out="values", **c), [(xi,) for xi in x], reps=7)
        except Exception as e:
            print(f"act sweep {acfg}: ERROR {str(e)[:400]}", flush=True)
            continue
        print(f"act sweep {acfg}: {t * 1e6:.1f} us", flush=True)
        arows.append((t, acfg))
        out_log.append({"act_sweep": acfg, "s": t})
    act_best = min(arows, key=lambda r: r[0])[1] if arows else tuning.ACT_QUANT_CONFIG
    return best, act_best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--shapes", default="all", choices=["all", "quick"])
    args = ap.parse_args()
    dispatch.filter_triton_deprecation()
    dev = jax.devices()[0]
    key = jax.random.key(0)
    log: list[dict] = []
    best, act_best = ({}, dict(tuning.ACT_QUANT_CONFIG))
    if args.sweep:
        best, act_best = sweep(key, log)
        print("best configs:", {k: (v[0], dataclasses.asdict(v[1])) for k, v in best.items()}, "act:", act_best)
    shapes = SHAPES if args.shapes == "all" else SHAPES[::3]
    table = []
    for name, m, k, n in shapes:
        cfg = best.get(m_class(m), ("canonical", tuning.matmul_config(m, n, k)))
        try:
            r = time_shape(key, m, k, n, cfg, act_best)
        except Exception as e:
            print(f"{name} {m}x{k}x{n}: ERROR {str(e)[:600]}", flush=True)
            continue
        r.update(name=name, m=m, k=k, n=n, layout=cfg[0], config=dataclasses.asdict(cfg[1]), act_config=act_best)
        table.append(r)
        log.append(r)
        print(f"done {name} {m}x{k}x{n}", flush=True)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# NVFP4 GEMM on {dev.device_kind}, JAX {jax.__version__}, {now}",
        "# command: PYTHONPATH=. python3 benchmarks/gemm.py " + (" ".join(["--sweep"] if args.sweep else [])),
        "# times in us (median); (x) = ratio to cuBLAS bf16 in this run; TFLOP/s for bf16, GB/s for act quant",
        "| shape (M x K x N) | cuBLAS bf16 | XLA deq+dot | scaled_matmul | W4A16 kernel | W4A16 deq+cuBLAS "
        "| W4A4 kernel: act quant + matmul = total | W4A4 act quant + deq+cuBLAS | act quant GB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    hbm = HBM_TBS.get(dispatch.device_class() or "", 2.94)
    for r in table:
        m, k, n = r["m"], r["k"], r["n"]
        base = r["cublas_bf16"]
        tf = 2 * m * k * n / base / 1e12

        def c(key, r=r, base=base):
            if key not in r:
                return "n/a"
            return f"{r[key] * 1e6:.0f} ({r[key] / base:.2f})"

        act_bytes = m * k * 2 + m * k * 2  # read bf16, write fp16 values
        gbs = act_bytes / r["act_quant"] / 1e9
        lines.append(
            f"| {r['name']} {m}x{k}x{n} | {base * 1e6:.0f} ({tf:.0f} TF/s) | {c('xla_dequant_dot')} | "
            f"{c('scaled_matmul')} | {c('w4a16')} | {c('w4a16_dqdot')} | "
            f"{r['act_quant'] * 1e6:.0f} + {r['w4a4_matmul'] * 1e6:.0f} = {c('w4a4_total')} | "
            f"{c('w4a4_dqdot_total')} | {gbs:.0f} ({gbs / hbm / 10:.0f}%) |"
        )
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemm.json"), "w") as f:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "date": now, "log": log}, f, indent=1)
        with open(os.path.join(out, "gemm_table.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
