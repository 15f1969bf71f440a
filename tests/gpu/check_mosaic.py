"""The Mosaic GPU NVFP4 matmul (kernels/nvfp4_matmul_mgpu.py) on an sm_90 GPU: checks first, then times.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tests/gpu/check_mosaic.py [--budget-s 180] [--ptxas]
        [--variants serial_g fenced_g pipelined_g serial_p pipelined_p] [--cpu-smoke]

1. `--ptxas`: Mosaic's ptxas log (registers, spills, wgmma serialization warnings) of every kernel
   compiled in this run, captured from fd 1 into $OUT/ptxas.log (progress goes to stderr then); a
   tiny kernel is compiled first, and the option is dropped if that fails.
2. Correctness per shape (exceptions caught per shape; errors computed on the device): FLUX.1-dev
   shapes and odd ones (M = 1, 7, 77, 1000; K and N not multiples of the tiles; heavy-tailed x), W4A4
   (fp16 block values + per-row scales) and W4A16 (bf16 x): relative L2 error vs the fp32 reference
   (`reference.nvfp4_matmul_ref`) next to the same error of decode + cuBLAS (`dispatch.dequant_dot`,
   identical numerics), the fraction of outputs equal to decode + cuBLAS, finiteness.
3. Times at the FLUX shapes (medians of back-to-back calls inside one jit over distinct input copies):
   cuBLAS bf16, decode + cuBLAS W4A4 / W4A16, the Triton kernel (tuning table config), and each Mosaic
   variant (W4A4; W4A16 for the first two). A variant that failed a check is not timed.
Stops starting new work after --budget-s seconds. Prints a table last; writes $OUT/check_mosaic.json
and $OUT/check_mosaic.md. `--cpu-smoke` (CPU, tiny shapes): lowers every Mosaic call for the cuda
platform instead of running it and runs the rest with the reference, to test this script before a GPU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp

from permuquant_jax.formats import nvfp4
from permuquant_jax.kernels import dispatch, reference, tuning
from permuquant_jax.kernels import nvfp4_matmul_mgpu as mg
from permuquant_jax.kernels.nvfp4_matmul import nvfp4_matmul, prepack

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from gemm_variants import bench, copies  # noqa: E402  (the benchmarks' one timing harness)

FLUX = [  # in order of importance (the budget may stop the run early)
    ("img qkv", 4096, 3072, 9216),
    ("single linear1", 4608, 3072, 21504),
    ("single linear2", 4608, 15360, 3072),
    ("img fc2", 4096, 12288, 3072),
    ("img fc1", 4096, 3072, 12288),
    ("txt qkv", 512, 3072, 9216),
    ("mod GEMV", 1, 3072, 18432),
]
NARROW_N = 8192  # below: --narrow-variants are checked and timed too (the tile count decides the tail)
ODD = [
    ("M=7", 7, 3072, 3072),
    ("M=77 heavy", 77, 3072, 3072),
    ("K=1008 N=200", 77, 1008, 200),
    ("K=12352", 300, 12352, 384),
]
MC = mg.MosaicConfig
VARIANTS = {
    "serial_g": MC(block_m=256, pipeline="serial"),
    "fenced_g": MC(block_m=256, pipeline="fenced"),
    "pipelined_g": MC(block_m=256, pipeline="pipelined"),
    "serial_p": MC(block_m=256, pipeline="serial", persistent=True),
    "pipelined_p": MC(block_m=256, pipeline="pipelined", persistent=True),
    "pipelined_pb": MC(block_m=256, pipeline="pipelined", persistent=True, bf16_decode=True),
    "serial_pb": MC(block_m=256, pipeline="serial", persistent=True, bf16_decode=True),
    "pipelined_pb128": MC(block_m=128, pipeline="pipelined", persistent=True, bf16_decode=True),
    "serial_p128": MC(block_m=128, pipeline="serial", persistent=True),
    "serial_p192": MC(block_m=192, pipeline="serial", persistent=True),
    "pipelined_p192": MC(block_m=192, pipeline="pipelined", persistent=True),
    "pipelined_p128": MC(block_m=128, pipeline="pipelined", persistent=True),
    "pipelined_g128": MC(block_m=128, pipeline="pipelined"),
    "serial_g128": MC(block_m=128, pipeline="serial"),
    "pipelined_p64": MC(block_m=64, pipeline="pipelined", persistent=True),
    "pipelined_p_bk128": MC(block_m=256, block_k=128, stages=2, pipeline="pipelined", persistent=True),
    # diagnostics (wrong numbers, never checked): the kernel's skeleton without the decode arithmetic
    "pipelined_p_nodecode": MC(block_m=256, pipeline="pipelined", persistent=True, decode="none"),
    "serial_g_nodecode": MC(block_m=256, pipeline="serial", decode="none"),
}
OUT = os.environ.get("OUT")
LOG: dict = {"meta": {}, "checks": [], "times": [], "errors": [], "failed_variants": []}
T0 = time.time()
WATCH = {"what": "start", "since": time.time()}
HANG_S = 75.0
ERR = sys.stderr


def say(*a) -> None:
    print(*a, file=ERR, flush=True)


def watchdog() -> None:
    """A kernel that deadlocks blocks the main thread forever: record what hung, save, and exit."""
    while True:
        time.sleep(5)
        if time.time() - WATCH["since"] > HANG_S:
            LOG["errors"].append({"where": WATCH["what"], "type": "hang", "msg": f"no progress for {HANG_S} s"})
            LOG["meta"]["wall_s"] = time.time() - T0
            save()
            say(f"HANG at {WATCH['what']}; partial results saved")
            try:
                say(table())
            finally:
                os._exit(3)


def progress(what: str) -> None:
    WATCH["what"], WATCH["since"] = what, time.time()


def save() -> None:
    if OUT:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "check_mosaic.json"), "w") as f:
            json.dump(LOG, f, indent=1, default=str)
        with open(os.path.join(OUT, "check_mosaic.md"), "w") as f:
            f.write(table() + "\n")


def activations(key, m, k, heavy=False):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.t(k1, 2.0, (m, k), jnp.float32) if heavy else jax.random.normal(k1, (m, k), jnp.float32)
    mult = jnp.where(jax.random.uniform(k2, (k,)) < 0.01, jax.random.uniform(k3, (k,), minval=20, maxval=100), 1.0)
    return (x * mult).astype(jnp.bfloat16)


def weights(key, n, k):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (n, k), jnp.float32) * 0.02
    w = w * jnp.where(jax.random.uniform(k2, (k,)) < 0.005, 8.0, 1.0)
    return jax.jit(nvfp4.quantize)(w)


@jax.jit
def _metrics(y, r, dd):
    y32, r32 = y.astype(jnp.float32), r.astype(jnp.float32)
    den = jnp.maximum(jnp.linalg.norm(r32), 1e-30)
    rb = r.astype(jnp.bfloat16).astype(jnp.float32)
    return (
        jnp.linalg.norm(y32 - r32) / den,
        jnp.linalg.norm(y32 - rb) / jnp.maximum(jnp.linalg.norm(rb), 1e-30),
        jnp.mean((y == dd).astype(jnp.float32)),
        jnp.all(jnp.isfinite(y32)),
    )


def metrics(y, r, dd) -> dict:
    e, eb, same, fin = (x.item() for x in _metrics(y, r, dd))
    return {"rel": e, "relb": eb, "frac_equal_dd": same, "finite": bool(fin)}


def err(where: str, e: BaseException) -> None:
    LOG["errors"].append(
        {"where": where, "type": type(e).__name__, "msg": str(e)[:3000], "tb": traceback.format_exc()[-4000:]}
    )
    say(f"ERROR {where}: {type(e).__name__}: {str(e)[:600]}")
    save()


class Case:
    """One shape's operands: W4A4 (fp16 values + row scales) and W4A16 (bf16 x) inputs, weights in both layouts."""

    def __init__(self, key, m, k, n, heavy=False):
        kx, kw, kb = jax.random.split(key, 3)
        self.m, self.k, self.n = m, k, n
        self.x = activations(kx, m, k, heavy)
        self.wq = weights(kw, n, k)
        self.bias = (jax.random.normal(kb, (n,), jnp.float32) * 0.1).astype(jnp.bfloat16)
        self.xq = jax.jit(reference.quantize_act_ref)(self.x)
        self.xv = reference.block_values(self.xq).astype(jnp.float16)
        self.gx = reference.row_global_scale(self.xq, m)
        self.wp = jax.jit(prepack)(self.wq)
        self.wm = jax.jit(mg.to_mosaic, static_argnums=1)(self.wp, tuning.MOSAIC_NIBBLE_ORDER)

    def refs(self):
        f = jax.jit(
            lambda xq, x, w, b: (
                reference.nvfp4_matmul_ref(xq, w, b, out_dtype=jnp.float32),
                reference.nvfp4_matmul_ref(x, w, b, out_dtype=jnp.float32),
            )
        )
        return f(self.xq, self.x, self.wq, self.bias)


def mosaic(x, wm, gx, bias, cfg, smoke):
    f = lambda x, wm, gx, b: mg.nvfp4_matmul_mosaic(x, wm, gx, b, config=cfg, out_dtype=jnp.bfloat16)
    if smoke:
        jax.jit(f).trace(x, wm, gx, bias).lower(lowering_platforms=("cuda",))
        return None
    return jax.jit(f)(x, wm, gx, bias)


def dequant_dot(x, wp, gx, bias, smoke):
    dec = "bits" if smoke else "pallas"
    return jax.jit(lambda x, w, g, b: dispatch.dequant_dot(x, w, g, b, out_dtype=jnp.bfloat16, decoder=dec))(
        x, wp, gx, bias
    )


def check_shape(name, m, k, n, smoke, variants, heavy=False, a16=99):
    c = Case(jax.random.key(m * 7 + k + n), m, k, n, heavy=heavy)
    r4, r16 = c.refs()
    row = {"shape": name, "m": m, "k": k, "n": n, "heavy": heavy}
    dd4 = dequant_dot(c.xv, c.wp, c.gx, c.bias, smoke)
    dd16 = dequant_dot(c.x, c.wp, None, c.bias, smoke)
    row["dd_w4a4"], row["dd_w4a16"] = metrics(dd4, r4, dd4), metrics(dd16, r16, dd16)
    for i, vname in enumerate(variants):
        cfg = VARIANTS[vname]
        modes = (("w4a4", c.xv, c.gx, r4, dd4), ("w4a16", c.x, None, r16, dd16))
        modes = modes[1:] if cfg.bf16_decode else modes[: 2 if i < a16 else 1]  # bf16_decode: W4A16 only
        for mode, x, gx, r, dd in modes:
            if time.time() - T0 > ARGS.budget_s:
                row[f"{vname}_{mode}"] = "skipped (budget)"
                continue
            try:
                progress(f"check {name} {vname} {mode}")
                y = mosaic(x, c.wm, gx, c.bias, cfg, smoke)
                if y is None:
                    row[f"{vname}_{mode}"] = "lowered"
                    continue
                mt = metrics(y, r, dd)
                base = row[f"dd_{mode}"]
                mt["ok"] = (
                    mt["finite"] and mt["rel"] <= 1.05 * base["rel"] + 1e-6 and mt["relb"] <= 2 * base["relb"] + 1e-4
                )
                row[f"{vname}_{mode}"] = mt
            except Exception as ex:  # noqa: BLE001  (recorded, the run goes on)
                err(f"check {name} {vname} {mode}", ex)
                row[f"{vname}_{mode}"] = {"ok": False, "error": type(ex).__name__}
            if isinstance(row[f"{vname}_{mode}"], dict) and not row[f"{vname}_{mode}"]["ok"]:
                if vname not in LOG["failed_variants"]:
                    LOG["failed_variants"].append(vname)
    LOG["checks"].append(row)
    say("CHECK", json.dumps({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items() if a != "finite"})
                             for k, v in row.items()}, default=str))
    save()
    return c


def time_shape(name, m, k, n, c: Case, smoke, variants, inner=3, diag=(), triton=True, layout=True, a16=1,
               dd16=True):
    t = {"shape": name, "m": m, "k": k, "n": n}
    wb = reference.block_values(c.wq).astype(jnp.bfloat16)
    tcfg = tuning.matmul_config(m, n, k)
    cases = {
        "cublas_bf16": (
            lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
            (c.x, wb),
        ),
        "dd_w4a4": (
            lambda x, w, g, b: dispatch.dequant_dot(x, w, g, b, out_dtype=jnp.bfloat16),
            (c.xv, c.wp, c.gx, c.bias),
        ),
    }
    if dd16:
        cases["dd_w4a16"] = (
            lambda x, w, b: dispatch.dequant_dot(x, w, None, b, out_dtype=jnp.bfloat16), (c.x, c.wp, c.bias)
        )
    if triton:
        cases["triton_w4a4"] = (
            lambda x, w, g, b: nvfp4_matmul(x, w, g, b, config=tcfg, out_dtype=jnp.bfloat16),
            (c.xv, c.wp, c.gx, c.bias),
        )
    for vname in variants:
        if vname in LOG["failed_variants"]:
            t[f"mg_{vname}"] = "failed check"
            continue
        cfg = VARIANTS[vname]
        if not cfg.bf16_decode:  # bf16_decode changes the W4A16 path only
            cases[f"mg_{vname}_w4a4"] = (
                lambda x, w, g, b, cfg=cfg: mg.nvfp4_matmul_mosaic(x, w, g, b, config=cfg),
                (c.xv, c.wm, c.gx, c.bias),
            )
        if cfg.bf16_decode or variants.index(vname) < a16:
            cases[f"mg_{vname}_w4a16"] = (
                lambda x, w, b, cfg=cfg: mg.nvfp4_matmul_mosaic(x, w, None, b, config=cfg),
                (c.x, c.wm, c.bias),
            )
    if layout and variants and m >= 1024 and not VARIANTS[variants[0]].bf16_decode:
        # the weight layout: converted per call (the former dispatch), scale words stored ahead of time
        # (the dispatch now: only the int4 view of the codes per call), and the pieces alone
        cfg0 = VARIANTS[variants[0]]
        words = jax.jit(mg.stored_scale_words)(c.wq.scales)
        cases[f"mg_{variants[0]}_w4a4_percall"] = (
            lambda x, w, g, b: mg.nvfp4_matmul_mosaic(x, mg.to_mosaic(w), g, b, config=cfg0),
            (c.xv, c.wp, c.gx, c.bias),
        )
        cases[f"mg_{variants[0]}_w4a4_stored_words"] = (
            lambda x, w, sw, g, b: mg.nvfp4_matmul_mosaic(x, mg.to_mosaic(w, scale_words=sw), g, b, config=cfg0),
            (c.xv, c.wp, words, c.gx, c.bias),
        )
        cases["conv_to_mosaic"] = (lambda w: mg.to_mosaic(w), (c.wp,))
        cases["conv_int4_view"] = (lambda w: mg.codes_to_int4(w.codes), (c.wp,))
        cases["conv_scale_words"] = (lambda w: mg.pack_scale_words(w.scales), (c.wp,))
    for vname in diag:
        cases[f"diag_{vname}_w4a4"] = (
            lambda x, w, g, b, cfg=VARIANTS[vname]: mg.nvfp4_matmul_mosaic(x, w, g, b, config=cfg),
            (c.xv, c.wm, c.gx, c.bias),
        )
    for label, (fn, args) in cases.items():
        if time.time() - T0 > ARGS.budget_s:
            t[label] = "skipped (budget)"
            continue
        if smoke:
            if label.startswith(("mg_", "diag_")):
                jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
                t[label] = "lowered"
            continue
        t[label] = time_us(name, label, fn, args, inner, reps=5)
    LOG["times"].append(t)
    say("TIME", json.dumps(t, default=str))
    save()


def time_us(name: str, label: str, fn, args, inner: int, reps: int):
    """Microseconds per call of `fn` over `inner` copies of `args`, or the error's name (logged)."""
    try:
        progress(f"time {name} {label}")
        return bench(fn, copies(args, inner), reps=reps) * 1e6
    except Exception as ex:  # noqa: BLE001
        err(f"time {name} {label}", ex)
        return f"error {type(ex).__name__}"


GEMV_SHAPES = [(1, 3072, 18432), (1, 3072, 9216), (4, 3072, 18432)]


def gemv_section(smoke: bool) -> None:
    """M = 1-4 (the modulation linears): the XLA reduction GEMV (`gemv.nvfp4_gemv`) checked against the
    reference and decode+cuBLAS, then timed against cuBLAS bf16 and the Triton kernel (table config),
    W4A4 (fp16 values in) and W4A16, and the whole W4A4 linear (act quant + GEMM) per backend."""
    from permuquant_jax.kernels import gemv

    shapes = [(1, 512, 384), (4, 512, 384)] if smoke else GEMV_SHAPES
    for m, k, n in shapes:
        if time.time() - T0 > ARGS.budget_s:
            break
        name = f"GEMV {m}x{k}x{n}"
        try:
            progress(name)
            c = Case(jax.random.key(m + k + n), m, k, n)
            r4, r16 = c.refs()
            row = {"shape": name, "m": m, "k": k, "n": n}
            dd4 = dequant_dot(c.xv, c.wp, c.gx, c.bias, smoke)
            dd16 = dequant_dot(c.x, c.wp, None, c.bias, smoke)
            f = jax.jit(lambda x, w, g, b: gemv.nvfp4_gemv(x, w, g, b, out_dtype=jnp.bfloat16))
            for mode, x, gx, r, dd in (("w4a4", c.xv, c.gx, r4, dd4), ("w4a16", c.x, None, r16, dd16)):
                mt = metrics(f(x, c.wp, gx, c.bias), r, dd)
                base = metrics(dd, r, dd)
                close = mt["rel"] <= 1.05 * base["rel"] + 1e-6 and mt["relb"] <= 2 * base["relb"] + 1e-4
                mt["ok"] = mt["finite"] and close
                row[f"xla_gemv_{mode}"] = mt
                if not mt["ok"] and "xla_gemv" not in LOG["failed_variants"]:
                    LOG["failed_variants"].append("xla_gemv")
            LOG["checks"].append(row)
            say("CHECK", json.dumps(row, default=str))
            t = {"shape": name, "m": m, "k": k, "n": n}
            wb = reference.block_values(c.wq).astype(jnp.bfloat16)
            tcfg = tuning.matmul_config(m, n, k)
            aqc = tuning.act_quant_config(m, k)
            gs = jnp.full((m,), 0.05, jnp.float32)

            def linear(a, w, b, gemm, gs=gs, aqc=aqc, tcfg=tcfg):
                from permuquant_jax.kernels import act_quant as aq

                v = aq.act_quant(a, gs, out="values", **aqc)
                if gemm == "triton":
                    return nvfp4_matmul(v, w, gs, b, config=tcfg, out_dtype=jnp.bfloat16)
                return gemv.nvfp4_gemv(v, w, gs, b, out_dtype=jnp.bfloat16)

            cases = {
                "cublas_bf16": (lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                                (c.x, wb)),
                "triton_w4a4": (lambda x, w, g, b, tcfg=tcfg: nvfp4_matmul(x, w, g, b, config=tcfg),
                                (c.xv, c.wp, c.gx, c.bias)),
                "xla_gemv_w4a4": (lambda x, w, g, b: gemv.nvfp4_gemv(x, w, g, b), (c.xv, c.wp, c.gx, c.bias)),
                "triton_w4a16": (lambda x, w, b, tcfg=tcfg: nvfp4_matmul(x, w, None, b, config=tcfg),
                                 (c.x, c.wp, c.bias)),
                "xla_gemv_w4a16": (lambda x, w, b: gemv.nvfp4_gemv(x, w, None, b), (c.x, c.wp, c.bias)),
                "linear_triton_w4a4": (lambda x, w, b: linear(x, w, b, "triton"), (c.x, c.wp, c.bias)),
                "linear_xla_gemv_w4a4": (lambda x, w, b: linear(x, w, b, "xla_gemv"), (c.x, c.wp, c.bias)),
            }
            for label, (fn, args) in cases.items():
                if smoke:
                    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
                    t[label] = "lowered"
                    continue
                if time.time() - T0 > ARGS.budget_s:
                    t[label] = "skipped (budget)"
                    continue
                t[label] = time_us(name, label, fn, args, 8, reps=7)
            LOG["times"].append(t)
            say("TIME", json.dumps(t, default=str))
            save()
        except Exception as ex:  # noqa: BLE001
            err(name, ex)


AQ_SHAPES = [(4608, 3072), (4608, 15360)]
AQ_TILES = [(32, 128, 4), (32, 256, 8), (64, 256, 8), (16, 512, 4), (128, 128, 8), (64, 512, 8)]


def act_quant_sweep(smoke: bool) -> None:
    """Activation quantization (W4A4 values out, static per-tensor scale as in the step) over tiles:
    outputs compared with the table config's (bit-exact vs the reference, CPU tests), time, GB/s."""
    from permuquant_jax.kernels import act_quant as aq

    shapes = [(64, 512)] if smoke else AQ_SHAPES
    for m, k in shapes:
        if time.time() - T0 > ARGS.budget_s:
            break
        x = activations(jax.random.key(m + k), m, k)
        gs = jnp.full((m,), 0.05, jnp.float32)
        base_cfg = tuning.act_quant_config(m, k)
        tiles = [(base_cfg["block_m"], base_cfg["block_k"], base_cfg["num_warps"]), *AQ_TILES]
        ref = jax.jit(lambda x: reference.block_values(reference.quantize_act_ref(x, global_scale=0.05)))(x)
        if smoke:  # the comparison itself, in interpret mode (no timing)
            y = aq.act_quant(x, gs, out="values", interpret=True, **base_cfg)
            LOG.setdefault("act_quant", []).append(
                {"shape": [m, k], "smoke_exact": bool(jnp.array_equal(y, ref.astype(jnp.float16))), "tiles": {}}
            )
            continue
        row = {"shape": [m, k], "bytes": m * k * 4, "tiles": {}}
        for bm, bk, nw in dict.fromkeys(tiles):
            if time.time() - T0 > ARGS.budget_s:
                break
            cfg = {"block_m": bm, "block_k": bk, "num_warps": nw, "num_stages": 1}
            label = f"{bm}x{bk}x{nw}w"
            try:
                progress(f"act quant {m}x{k} {label}")
                f = lambda a, gs=gs, cfg=cfg: aq.act_quant(a, gs, out="values", **cfg)
                y = jax.jit(f)(x)
                exact = bool(jnp.array_equal(y, ref.astype(jnp.float16)))
                sec = bench(f, copies((x,), 4), reps=5)
                row["tiles"][label] = {"us": sec * 1e6, "GBps": m * k * 4 / sec / 1e9, "exact": exact}
            except Exception as ex:  # noqa: BLE001
                err(f"act quant {m}x{k} {label}", ex)
        LOG.setdefault("act_quant", []).append(row)
        say("ACTQ", json.dumps(row))
        save()


def table() -> str:
    cols: list[str] = []
    for t in LOG["times"]:
        cols += [c for c in t if c not in ("shape", "m", "k", "n") and c not in cols]
    short = lambda c: c.replace("mg_", "").replace("diag_", "diag ").replace("_w4a4", " A4").replace("_w4a16", " A16")
    lines = [
        "| shape (M x K x N), us (x cuBLAS bf16) | " + " | ".join(short(c) for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for t in LOG["times"]:
        base = t.get("cublas_bf16")
        cells = []
        for col in cols:
            v = t.get(col, "-")
            ok = isinstance(v, float) and isinstance(base, float)
            cells.append(f"{v:.0f} ({v / base:.2f})" if ok else str(v))
        lines.append(f"| {t['shape']} {t['m']}x{t['k']}x{t['n']} | " + " | ".join(cells) + " |")
    for r in LOG.get("act_quant", []):
        cells = ", ".join(f"{t} {v['us']:.0f} us {v['GBps']:.0f} GB/s{'' if v['exact'] else ' NOT EXACT'}"
                          for t, v in r["tiles"].items())
        lines.append(f"act quant {r['shape'][0]}x{r['shape'][1]}: {cells}{r.get('smoke_exact', '')}")
    bad = LOG["failed_variants"]
    lines.append(f"\nvariants failing a check: {bad or 'none'}; errors: {len(LOG['errors'])}")
    return "\n".join(lines)


def start_ptxas_log(smoke: bool) -> bool:
    """Mosaic prints the ptxas log of each compiled kernel to fd 1: send fd 1 to $OUT/ptxas.log."""
    if smoke or not OUT:
        return False
    os.makedirs(OUT, exist_ok=True)
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    fd = os.open(os.path.join(OUT, "ptxas.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush()
    os.dup2(fd, 1)
    try:
        c = Case(jax.random.key(3), 64, 256, 128)
        mosaic(c.xv, c.wm, c.gx, c.bias, MC(block_m=64), False).block_until_ready()
        return True
    except Exception as ex:  # noqa: BLE001
        err("ptxas log", ex)
        os.environ.pop("MOSAIC_GPU_DUMP_PTXAS", None)
        return False


def choose() -> dict | None:
    """The Mosaic config for large M from this run: the pipeline whose W4A4 time summed over the large
    FLUX shapes timed for every candidate is least (among variants that passed every check), with
    `bf16_decode` where its W4A16 time was less too. Written to $OUT/mosaic_choice.json."""
    big = [t for t in LOG["times"] if t["m"] >= 1024]
    base = [v for v in ARGS.variants if not VARIANTS[v].bf16_decode and v not in LOG["failed_variants"]]
    rows = [t for t in big if all(isinstance(t.get(f"mg_{v}_w4a4"), float) for v in base)]
    if not base or not rows:
        return None
    total = {v: sum(t[f"mg_{v}_w4a4"] for t in rows) for v in base}
    best = min(total, key=total.get)
    cfg = VARIANTS[best]
    twin = [v for v in ARGS.variants if VARIANTS[v] == dataclasses.replace(cfg, bf16_decode=True)]
    b16 = False
    if twin and twin[0] not in LOG["failed_variants"]:
        pairs = [(t.get(f"mg_{best}_w4a16"), t.get(f"mg_{twin[0]}_w4a16")) for t in rows]
        pairs = [(x, y) for x, y in pairs if isinstance(x, float) and isinstance(y, float)]
        b16 = bool(pairs) and sum(y for _, y in pairs) < sum(x for x, _ in pairs)
    cfg = dataclasses.replace(cfg, bf16_decode=b16)
    shapes = [t["shape"] for t in rows]
    out = {"fields": dataclasses.asdict(cfg), "tag": cfg.tag, "w4a4_total_us": total, "shapes": shapes}
    LOG["choice"] = out
    if OUT:
        with open(os.path.join(OUT, "mosaic_choice.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=180.0)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--ptxas", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["pipelined_p", "serial_p", "pipelined_pb", "serial_pb"],
                    choices=list(VARIANTS), help="large-M candidates (checked everywhere, timed at M >= 1024)")
    ap.add_argument("--small-variants", nargs="+", default=["pipelined_p128", "serial_p128", "pipelined_pb128"],
                    choices=list(VARIANTS), help="timed at M = 512 and M = 1")
    ap.add_argument("--diag", nargs="*", default=["pipelined_p_nodecode"],
                    choices=list(VARIANTS), help="timed at the first FLUX shape only (diagnostics, unchecked)")
    ap.add_argument("--narrow-variants", nargs="*", default=["serial_p128", "pipelined_p128", "serial_p192"],
                    choices=list(VARIANTS), help="also checked and timed where N < 8192 (fc2, linear2)")
    ap.add_argument("--a16", type=int, default=1, help="W4A16 timed for the first A16 large-M variants")
    ap.add_argument("--act-quant", action="store_true", help="time activation-quantization tiles at the end")
    ap.add_argument("--layout-shapes", nargs="*", default=["img qkv", "single linear1"],
                    help="shapes where the weight-layout conversion (per call, stored, pieces) is timed")
    ap.add_argument("--no-triton", action="store_true", help="do not time the Triton kernel")
    ap.add_argument("--gemv", action="store_true", help="check and time the M = 1-4 GEMVs (after the FLUX shapes)")
    ap.add_argument("--gemv-first", action="store_true", help="the GEMV section before everything else")
    ap.add_argument("--dd16-shapes", nargs="*", default=None, help="shapes where decode+cuBLAS W4A16 is timed "
                    "(default: all)")
    ap.add_argument("--skip", nargs="*", default=[], help="shape names to skip")
    ARGS = ap.parse_args()
    smoke = ARGS.cpu_smoke
    dev = jax.devices()[0]
    LOG["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": getattr(dev, "device_kind", str(dev)),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "command": " ".join(sys.argv),
        "variants": {v: VARIANTS[v].tag for v in (*ARGS.variants, *ARGS.small_variants, *ARGS.diag)},
    }
    say(LOG["meta"])
    threading.Thread(target=watchdog, daemon=True).start()
    if ARGS.ptxas:
        LOG["meta"]["ptxas_log"] = start_ptxas_log(smoke)
    big, small = ARGS.variants, ARGS.small_variants
    flux = [("tiny", 1024, 512, 384), ("tiny M=77", 77, 512, 384)] if smoke else FLUX
    odd = [("M=7", 7, 256, 256), ("K=1008 N=200", 77, 1008, 200)] if smoke else ODD
    # the race check (M=1000, K = 48 steps: both loop parities are covered by K=12352's 193 steps), then
    # the FLUX shapes by importance, then the odd shapes with the large-M candidates
    work = [("check", ("M=1000", 1000, 3072, 3072), big)]
    for f in flux:
        vs = big if f[1] >= 1024 else small
        if f[1] >= 1024 and f[3] < NARROW_N:
            vs = [*big, *[v for v in ARGS.narrow_variants if v not in big]]
        work.append(("flux", f, vs))
    if ARGS.gemv:
        work.insert(0 if ARGS.gemv_first else len(work), ("gemv", ("gemv", 0, 0, 0), []))
    if ARGS.act_quant:
        work.append(("act_quant", ("act quant", 0, 0, 0), []))
    work += [("check", o, big) for o in odd]
    first = True
    for kind, (name, m, k, n), vs in work:
        if name in ARGS.skip:
            continue
        if time.time() - T0 > ARGS.budget_s:
            LOG["errors"].append({"where": f"{kind} {name}", "type": "skipped", "msg": "time budget"})
            continue
        try:
            progress(f"{kind} {name}")
            if kind == "act_quant":
                act_quant_sweep(smoke)
                continue
            if kind == "gemv":
                gemv_section(smoke)
                continue
            c = check_shape(name, m, k, n, smoke, vs, heavy="heavy" in name, a16=99 if kind == "check" else ARGS.a16)
            if kind == "flux":
                ok = [v for v in vs if v not in LOG["failed_variants"]]
                time_shape(name, m, k, n, c, smoke, ok, diag=ARGS.diag if first else (),
                           triton=(first or m < 1024) and not ARGS.no_triton, a16=ARGS.a16,
                           layout=name in ARGS.layout_shapes or smoke,
                           dd16=ARGS.dd16_shapes is None or name in ARGS.dd16_shapes)
                first = False
            del c
        except Exception as ex:  # noqa: BLE001
            err(f"{kind} {name}", ex)
    say("choice:", choose())
    LOG["meta"]["wall_s"] = time.time() - T0
    save()
    say(table())
    if smoke:
        print("smoke ok", flush=True)


if __name__ == "__main__":
    main()
