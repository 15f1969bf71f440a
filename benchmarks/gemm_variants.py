"""Kernel versions side by side on the GPU, correctness first (issue 10):

    PYTHONPATH=. python3 benchmarks/gemm_variants.py [--shapes all|quick] [--no-sweep]

Per FLUX.1-dev shape, on fresh random data (activations with outlier channels, weights with outlier
columns), first the checks, then the times (medians of back-to-back calls inside one jit over
distinct input copies, as benchmarks/gemm.py):
- activation quantization v1 (2-D tiles) vs v2 (3-D tiles, magic rounding): fp16 values and packed
  codes/scales bit-identical; times and % of the measured HBM copy bandwidth;
- weight decode: XLA table ("lut", today's), XLA bit placement ("bits"), the Pallas kernel: bit-identical;
- Triton matmul, today's config with the former "div" K-offsets vs aligned "mul" offsets:
  bit-identical outputs (same tiles, same summation order) and relative error vs the fp32 reference;
- decode + cuBLAS with each decoder; the whole W4A4 path (act quant + GEMM); cuBLAS bf16 as the base.
Then (unless --no-sweep) tile sweeps of the aligned Triton kernel, the GEMV, act quant v2 and the decode
kernel. Prints the table last; writes $OUT/gemm_variants.json (and the table) as it goes.
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
import numpy as np

from permuquant_jax.formats import nvfp4
from permuquant_jax.kernels import act_quant as aq
from permuquant_jax.kernels import decode as dec
from permuquant_jax.kernels import dispatch, reference, tuning
from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig, nvfp4_matmul, prepack

SHAPES = [
    ("modulation GEMV", 1, 3072, 18432),
    ("probe", 128, 3072, 9216),
    ("probe", 256, 3072, 9216),
    ("txt qkv", 512, 3072, 9216),
    ("img qkv", 4096, 3072, 9216),
    ("img fc2", 4096, 12288, 3072),
    ("single linear1", 4608, 3072, 21504),
    ("single linear2", 4608, 15360, 3072),
]
OUT = os.environ.get("OUT")
# CPU smoke test of this script: kernels in interpret mode (GEMM_VARIANTS_INTERPRET=1 --shapes tiny)
I = os.environ.get("GEMM_VARIANTS_INTERPRET") == "1"
LOG: dict = {"checks": [], "times": [], "sweeps": []}
HBM = {"copy_tbs": None}


def save() -> None:
    if OUT:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "gemm_variants.json"), "w") as f:
            json.dump(LOG, f, indent=1, default=str)


def bench(fn, arg_sets, reps: int = 10) -> float:
    f = jax.jit(lambda sets: [fn(*a) for a in sets])
    jax.block_until_ready(f(arg_sets))
    jax.block_until_ready(f(arg_sets))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(arg_sets))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) / len(arg_sets)


def copies(a, n: int):
    return [jax.tree.map(lambda t: jnp.array(t, copy=True), a) for _ in range(n)]


def activations(key, m, k):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (m, k), jnp.float32)
    mult = jnp.where(jax.random.uniform(k2, (k,)) < 0.01, jax.random.uniform(k3, (k,), minval=20, maxval=100), 1.0)
    return (x * mult).astype(jnp.bfloat16)


def weights(key, n, k):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (n, k), jnp.float32) * 0.02
    w = w * jnp.where(jax.random.uniform(k2, (k,)) < 0.005, 8.0, 1.0)
    return jax.jit(nvfp4.quantize)(w)


def check(name, ok, **info):
    LOG["checks"].append({"check": name, "ok": bool(ok), **info})
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    print(f"{'PASS' if ok else 'FAIL'} {name} {extra}", flush=True)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def copy_bandwidth() -> float:
    x = copies(jax.random.normal(jax.random.key(3), (8192, 65536), jnp.float32), 2)
    t = bench(lambda a: a * 1.0 + 0.0, [(xi,) for xi in x], reps=10)
    return 2 * x[0].size * 4 / t / 1e12


def legacy(cfg: MatmulConfig) -> MatmulConfig:
    return dataclasses.replace(cfg, index="div")


def shape_run(key, name, m, k, n, act_cfg1, act_cfg2):
    inner = 16 if m <= 16 else (8 if m <= 1024 else 4)
    act_cfg2 = act_cfg2 or tuning.act_quant_config(m, k)
    kx, kw = jax.random.split(key)
    x = activations(kx, m, k)
    wq = weights(kw, n, k)
    wpc = prepack(wq, "canonical")
    wpk = prepack(wq, "chunk128")
    gs = aq.act_global_scale_rows(x)
    row = {"name": name, "m": m, "k": k, "n": n}
    tag = f"{m}x{k}x{n}"
    # --- checks -------------------------------------------------------------------------------
    v1 = aq.act_quant(x, gs, out="values", impl="v1", **act_cfg1, interpret=I)
    v2 = aq.act_quant(x, gs, out="values", impl="v2", **act_cfg2, interpret=I)
    p1 = aq.act_quant(x, gs, out="packed", impl="v1", **act_cfg1, interpret=I)
    p2 = aq.act_quant(x, gs, out="packed", impl="v2", **act_cfg2, interpret=I)
    same_v = bool(np.array_equal(np.asarray(v1).view(np.uint16), np.asarray(v2).view(np.uint16)))
    same_p = bool(np.array_equal(np.asarray(p1[0]), np.asarray(p2[0]))) and bool(
        np.array_equal(np.asarray(p1[1]).view(np.uint8), np.asarray(p2[1]).view(np.uint8))
    )
    check(f"act_quant v2 == v1 (values, packed) {m}x{k}", same_v and same_p, values=same_v, packed=same_p)
    lut = np.asarray(dispatch.decode_weight(wpc, jnp.bfloat16, "lut", interpret=I)).view(np.uint16)
    for d in ("bits", "pallas"):
        got = np.asarray(dispatch.decode_weight(wpc, jnp.bfloat16, d, interpret=I)).view(np.uint16)
        check(f"decode {d} == lut (bf16) {n}x{k}", np.array_equal(got, lut))
    got16 = np.asarray(dispatch.decode_weight(wpc, jnp.float16, "pallas", interpret=I), np.float32)
    check(f"decode pallas fp16 exact {n}x{k}", np.array_equal(got16, lut.view(jnp.bfloat16).astype(np.float32)))
    del lut, got16
    xq = nvfp4.NVFP4Tensor(codes=p2[0], scales=p2[1], global_scale=gs[:, None])
    ref4 = np.asarray(reference.nvfp4_matmul_ref(xq, wq, out_dtype=jnp.float32))
    ref16 = np.asarray(reference.nvfp4_matmul_ref(x, wq, out_dtype=jnp.float32))
    tuned = tuning.matmul_config(m, n, k)
    tuned_div = legacy(tuned)
    mm = {
        "triton_div": lambda a, s, c=tuned_div: nvfp4_matmul(
            a, wpk, s, None, config=c, out_dtype=jnp.float32, interpret=I
        ),
        "triton_mul": lambda a, s, c=tuned: nvfp4_matmul(a, wpk, s, None, config=c, out_dtype=jnp.float32, interpret=I),
        "dq_lut": lambda a, s: dispatch.dequant_dot(a, wpc, s, None, out_dtype=jnp.float32, decoder="lut", interpret=I),
        "dq_pallas": lambda a, s: dispatch.dequant_dot(
            a, wpc, s, None, out_dtype=jnp.float32, decoder="pallas", interpret=I
        ),
    }
    if m <= 8:
        g = MatmulConfig(block_n=64, num_warps=4, num_stages=3, split_k=2, kind="gemv", decode="asm")
        g_div = legacy(g)
        mm["gemv_div"] = lambda a, s, c=g_div: nvfp4_matmul(
            a, wpk, s, None, config=c, out_dtype=jnp.float32, interpret=I
        )
        mm["gemv_mul"] = lambda a, s, c=g: nvfp4_matmul(a, wpk, s, None, config=c, out_dtype=jnp.float32, interpret=I)
    outs = {}
    for mode, xin, xs, ref in (("w4a4", v2, gs, ref4), ("w4a16", x, None, ref16)):
        for vn, f in mm.items():
            y = np.asarray(f(xin, xs))
            outs[(mode, vn)] = y
            r = rel(y, ref)
            check(f"{mode} {vn} {tag}", np.isfinite(y).all() and r <= 2e-5, rel_f32=r)
        same = np.array_equal(outs[(mode, "triton_div")], outs[(mode, "triton_mul")])
        check(f"{mode} triton mul bit-identical to div {tag}", same)
    del outs, ref4, ref16
    # --- times --------------------------------------------------------------------------------
    xs_ = copies(x, inner)
    t = {}
    wb = copies(nvfp4.dequantize(wq, jnp.bfloat16), inner)
    dot_nt = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))  # noqa: E731
    t["cublas_bf16"] = bench(dot_nt, list(zip(xs_, wb, strict=True)))
    del wb
    t["aq_v1"] = bench(
        lambda a: aq.act_quant(a, gs, out="values", impl="v1", **act_cfg1, interpret=I), [(a,) for a in xs_]
    )
    t["aq_v2"] = bench(
        lambda a: aq.act_quant(a, gs, out="values", impl="v2", **act_cfg2, interpret=I), [(a,) for a in xs_]
    )
    wcs, wks = copies(wpc, inner), copies(wpk, inner)
    for d in ("lut", "bits", "pallas"):
        t[f"decode_{d}"] = bench(
            lambda w, d=d: dispatch.decode_weight(w, jnp.bfloat16, d, interpret=I), [(w,) for w in wcs]
        )
    dcfg1 = {**tuning.decode_config(n, k), "impl": "v1", "block_n": 32, "block_k": 1024}
    t["decode_pallas_v1"] = bench(
        lambda w: dec.decode_weight_pallas(w, jnp.bfloat16, **dcfg1, interpret=I), [(w,) for w in wcs]
    )
    vs = copies(v2, inner)
    bf = jnp.bfloat16
    for vn in mm:
        for mode, xin, xs in (("w4a4", vs, gs), ("w4a16", xs_, None)):
            if vn.startswith("dq_"):
                d = vn[3:]
                fn = lambda a, w, d=d, s=xs: dispatch.dequant_dot(a, w, s, None, out_dtype=bf, decoder=d, interpret=I)  # noqa: E731
                ws = wcs
            else:
                base = tuned if vn.startswith("triton") else g
                c = legacy(base) if vn.endswith("div") else base
                fn = lambda a, w, c=c, s=xs: nvfp4_matmul(a, w, s, None, config=c, out_dtype=bf, interpret=I)  # noqa: E731
                ws = wks
            t[f"{mode}_{vn}"] = bench(fn, list(zip(xin, ws, strict=True)))

    def total(a, w):
        v = aq.act_quant(a, gs, out="values", impl="v2", **act_cfg2, interpret=I)
        return dispatch.dequant_dot(v, w, gs, None, out_dtype=bf, decoder="pallas", interpret=I)

    t["w4a4_total_aq2_dq_pallas"] = bench(total, list(zip(xs_, wcs, strict=True)))

    def total_old(a, w):
        v = aq.act_quant(a, gs, out="values", impl="v1", **act_cfg1, interpret=I)
        return dispatch.dequant_dot(v, w, gs, None, out_dtype=bf, decoder="lut", interpret=I)

    t["w4a4_total_aq1_dq_lut"] = bench(total_old, list(zip(xs_, wcs, strict=True)))
    row.update({kk: v for kk, v in t.items()})
    LOG["times"].append(row)
    save()
    print(f"times {tag}: " + ", ".join(f"{kk} {v * 1e6:.0f}" for kk, v in t.items()), flush=True)
    return row


def sweeps(key):
    """Tile sweeps of the new versions at one representative shape per class."""
    res = []
    cls = {
        "small": (
            (1, 3072, 18432),
            [
                MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=4, split_k=4, decode="asm"),
                MatmulConfig(block_n=128, block_m=16, num_warps=4, num_stages=4, split_k=4, decode="asm"),
                MatmulConfig(block_n=32, block_m=16, num_warps=4, num_stages=4, split_k=4, decode="asm"),
                MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=3, split_k=2, decode="asm"),
                MatmulConfig(block_n=64, num_warps=4, num_stages=3, split_k=4, kind="gemv", decode="asm"),
                MatmulConfig(block_n=32, num_warps=4, num_stages=3, split_k=4, kind="gemv", decode="asm"),
                MatmulConfig(block_n=128, num_warps=8, num_stages=3, split_k=2, kind="gemv", decode="asm"),
                MatmulConfig(block_n=32, num_warps=2, num_stages=4, split_k=2, kind="gemv", decode="asm"),
            ],
        ),
    }
    for c, ((m, k, n), cfgs) in cls.items():
        inner = 16 if m <= 16 else (8 if m <= 1024 else 4)
        kx, kw = jax.random.split(key)
        xs = copies(activations(kx, m, k), inner)
        wq = weights(kw, n, k)
        wks = copies(prepack(wq, "chunk128"), inner)
        for cfg in cfgs:
            try:
                tt = bench(
                    lambda a, w, c=cfg: nvfp4_matmul(a, w, None, None, config=c, out_dtype=jnp.bfloat16, interpret=I),
                    list(zip(xs, wks, strict=True)),
                    reps=7,
                )
            except Exception as e:  # record and go on
                print(f"sweep {c} {cfg}: ERROR {str(e)[:300]}", flush=True)
                continue
            r = {"sweep": c, "shape": [m, k, n], "config": dataclasses.asdict(cfg), "s": tt}
            res.append(r)
            LOG["sweeps"].append(r)
            print(f"sweep {c} {m}x{k}x{n} {cfg}: {tt * 1e6:.1f} us", flush=True)
        del xs, wks
    for m, k in ((4608, 3072),):
        xs = copies(activations(key, m, k), 4)
        gs = aq.act_global_scale_rows(xs[0])
        for acfg in (
            {"block_m": 32, "block_k": 256, "num_warps": 8},
            {"block_m": 64, "block_k": 256, "num_warps": 8},
            {"block_m": 32, "block_k": 128, "num_warps": 4},
            {"block_m": 64, "block_k": 128, "num_warps": 8},
            {"block_m": 16, "block_k": 512, "num_warps": 8},
        ):
            try:
                tt = bench(
                    lambda a, c=acfg, gs=gs: aq.act_quant(a, gs, out="values", impl="v2", **c, interpret=I),
                    [(a,) for a in xs],
                )
            except Exception as e:
                print(f"act sweep {acfg}: ERROR {str(e)[:300]}", flush=True)
                continue
            gbs = 4 * m * k / tt / 1e9
            r = {"sweep": "act_quant_v2", "shape": [m, k], "config": acfg, "s": tt, "GBps": gbs}
            LOG["sweeps"].append(r)
            print(f"act sweep {m}x{k} {acfg}: {tt * 1e6:.1f} us {gbs:.0f} GB/s", flush=True)
        del xs
    wcs = copies(prepack(weights(key, 21504, 3072), "canonical"), 4)
    for dcfg in (
        {"block_n": 32, "block_k": 1024, "num_warps": 8},
        {"block_n": 64, "block_k": 512, "num_warps": 8},
        {"block_n": 16, "block_k": 1024, "num_warps": 4},
        {"block_n": 32, "block_k": 2048, "num_warps": 8},
        {"block_n": 64, "block_k": 1024, "num_warps": 8},
        {"block_n": 128, "block_k": 512, "num_warps": 8},
        {"block_n": 32, "block_k": 1024, "num_warps": 8, "impl": "v1"},
    ):
        try:
            tt = bench(
                lambda w, c=dcfg: dec.decode_weight_pallas(w, jnp.bfloat16, **c, interpret=I), [(w,) for w in wcs]
            )
        except Exception as e:
            print(f"decode sweep {dcfg}: ERROR {str(e)[:300]}", flush=True)
            continue
        gbs = dec.decoded_bytes(21504, 3072) / tt / 1e9
        r = {"sweep": "decode", "shape": [21504, 3072], "config": dcfg, "s": tt, "GBps": gbs}
        LOG["sweeps"].append(r)
        print(f"decode sweep {dcfg}: {tt * 1e6:.1f} us {gbs:.0f} GB/s", flush=True)
    save()
    return res


def table(rows, hbm) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# kernel versions on {jax.devices()[0].device_kind}, JAX {jax.__version__}, {now}; copy {hbm:.2f} TB/s",
        "# us (ratio to cuBLAS bf16); act quant and decode: us (% of copy bandwidth)",
        "| shape | cuBLAS | aq v1 | aq v2 | dec lut | dec pallas v1 / v2 | W4A4 triton div / mul "
        "| W4A16 triton div / mul | W4A4 dq lut / pallas | W4A16 dq lut / pallas | W4A4 total old / new "
        "| gemv div / mul (W4A16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["cublas_bf16"]
        m, k, n = r["m"], r["k"], r["n"]

        def c(key, r=r, b=b):
            return f"{r[key] * 1e6:.0f} ({r[key] / b:.2f})" if key in r else "-"

        def bw(key, nbytes, r=r):
            return f"{r[key] * 1e6:.0f} ({nbytes / r[key] / 1e12 / hbm * 100:.0f}%)"

        ab = 4 * m * k
        db = dec.decoded_bytes(n, k)
        lines.append(
            f"| {r['name']} {m}x{k}x{n} | {b * 1e6:.0f} | {bw('aq_v1', ab)} | {bw('aq_v2', ab)} | "
            f"{bw('decode_lut', db)} | {bw('decode_pallas_v1', db)} / "
            f"{bw('decode_pallas', db)} | {c('w4a4_triton_div')} / {c('w4a4_triton_mul')} | "
            f"{c('w4a16_triton_div')} / {c('w4a16_triton_mul')} | {c('w4a4_dq_lut')} / {c('w4a4_dq_pallas')} | "
            f"{c('w4a16_dq_lut')} / {c('w4a16_dq_pallas')} | {c('w4a4_total_aq1_dq_lut')} / "
            f"{c('w4a4_total_aq2_dq_pallas')} | {c('w4a16_gemv_div')} / {c('w4a16_gemv_mul')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all", choices=["all", "quick", "tiny"])
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    dispatch.filter_triton_deprecation()
    LOG.update(device=jax.devices()[0].device_kind, jax=jax.__version__)
    t0 = time.time()
    hbm = copy_bandwidth()
    LOG["copy_tbs"] = hbm
    print(f"copy bandwidth {hbm:.2f} TB/s", flush=True)
    act1 = {"block_m": 8, "block_k": 512, "num_warps": 4, "num_stages": 1}  # v1's tuned config (H100)
    act2 = None  # per shape: tuning.act_quant_config
    key = jax.random.key(int(time.time()))
    shapes = {"all": SHAPES, "quick": SHAPES[::2], "tiny": [("tiny", 1, 256, 128), ("tiny", 40, 384, 256)]}[args.shapes]
    rows = []
    for name, m, k, n in shapes:
        key, sub = jax.random.split(key)
        try:
            rows.append(shape_run(sub, name, m, k, n, act1, act2))
        except Exception as e:
            print(f"{name} {m}x{k}x{n}: ERROR {str(e)[:1500]}", flush=True)
        print(f"[{time.time() - t0:.0f} s]", flush=True)
    text = table(rows, hbm)
    print(text, flush=True)
    if OUT:
        with open(os.path.join(OUT, "gemm_variants_table.md"), "w") as f:
            f.write(text + "\n")
    if not args.no_sweep:
        sweeps(key)
    n_fail = sum(not c["ok"] for c in LOG["checks"])
    print(f"\n{len(LOG['checks']) - n_fail}/{len(LOG['checks'])} checks passed; {time.time() - t0:.0f} s")
    print(text)


if __name__ == "__main__":
    main()
