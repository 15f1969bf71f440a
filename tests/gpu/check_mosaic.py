"""The Mosaic GPU NVFP4 matmul (kernels/nvfp4_matmul_mgpu.py) on an sm_90 GPU: checks first, then times.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 tests/gpu/check_mosaic.py [--budget-s 150] [--step]

1. The int4 nibble order the kernel sees (XLA's packing of int4 arrays): both orders at a small shape,
   the one that matches the reference is used from then on.
2. Correctness per shape (exceptions caught per shape): FLUX.1-dev shapes and odd ones (M = 1, 7, 77,
   1000; K and N not multiples of the tiles; heavy-tailed x), W4A4 (fp16 block values + per-row scales)
   and W4A16 (bf16 x): relative L2 error vs the fp32 reference (`reference.nvfp4_matmul_ref`), next to
   the same error of decode + cuBLAS (`dispatch.dequant_dot`, identical numerics); both outputs bf16.
3. Times at the FLUX shapes (medians of back-to-back calls inside one jit over distinct input copies):
   cuBLAS bf16, decode + cuBLAS W4A4 / W4A16 (GEMM only, as the dispatch runs it today), Mosaic W4A4 /
   W4A16 (256- and 128-token tiles, and the "fenced" pipeline that decodes the next tile during the
   wgmma), Mosaic including the per-call layout conversion (`to_mosaic`).
Stops starting new work after --budget-s seconds. Prints a table last; writes $OUT/check_mosaic.json.
`--cpu-smoke` (CPU, tiny shapes): lowers every Mosaic call for the cuda platform instead of running it
and runs the rest with the reference, to test this script before a GPU run.
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
import numpy as np

from permuquant_jax.formats import nvfp4
from permuquant_jax.kernels import dispatch, reference
from permuquant_jax.kernels import nvfp4_matmul_mgpu as mg
from permuquant_jax.kernels.nvfp4_matmul import prepack

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from gemm_variants import bench, copies  # noqa: E402  (the benchmarks' one timing harness)

FLUX = [
    ("img qkv", 4096, 3072, 9216),
    ("single linear1", 4608, 3072, 21504),
    ("img fc2", 4096, 12288, 3072),
    ("single linear2", 4608, 15360, 3072),
    ("txt qkv", 512, 3072, 9216),
]
ODD = [
    ("M=1", 1, 3072, 3072),
    ("M=77", 77, 3072, 3072),
    ("M=1000", 1000, 3072, 3072),
    ("K=1008 N=200", 77, 1008, 200),
    ("K=12352", 300, 12352, 384),
]
CONFIGS = {
    "bm256": mg.MosaicConfig(block_m=256, block_k=64, stages=4),
    "bm128": mg.MosaicConfig(block_m=128, block_k=64, stages=4),
    # diagnostic: decode the next tile while the wgmma runs (run 1 of 2026-12-01: NaNs)
    "bm128ahead": mg.MosaicConfig(block_m=128, block_k=64, stages=4, pipeline="ahead"),
    # the same with the A registers kept live past the wait (not yet run on a GPU)
    "bm256fenced": mg.MosaicConfig(block_m=256, block_k=64, stages=4, pipeline="fenced"),
}
OUT = os.environ.get("OUT")
LOG: dict = {"meta": {}, "nibble": {}, "checks": [], "times": [], "errors": []}
T0 = time.time()
WATCH = {"what": "start", "since": time.time()}
HANG_S = 75.0


def watchdog() -> None:
    """A kernel that deadlocks blocks the main thread forever: record what hung, save, and exit."""
    while True:
        time.sleep(5)
        if time.time() - WATCH["since"] > HANG_S:
            LOG["errors"].append({"where": WATCH["what"], "type": "hang", "msg": f"no progress for {HANG_S} s"})
            LOG["meta"]["wall_s"] = time.time() - T0
            save()
            print(f"HANG at {WATCH['what']}; partial results saved", flush=True)
            try:
                print(table(), flush=True)
            finally:
                os._exit(3)


def progress(what: str) -> None:
    WATCH["what"], WATCH["since"] = what, time.time()


def save() -> None:
    if OUT:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "check_mosaic.json"), "w") as f:
            json.dump(LOG, f, indent=1, default=str)


def activations(key, m, k, heavy=False):
    k1, k2, k3 = jax.random.split(key, 3)
    if heavy:
        x = jax.random.t(k1, 2.0, (m, k), jnp.float32)
    else:
        x = jax.random.normal(k1, (m, k), jnp.float32)
    mult = jnp.where(jax.random.uniform(k2, (k,)) < 0.01, jax.random.uniform(k3, (k,), minval=20, maxval=100), 1.0)
    return (x * mult).astype(jnp.bfloat16)


def weights(key, n, k):
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (n, k), jnp.float32) * 0.02
    w = w * jnp.where(jax.random.uniform(k2, (k,)) < 0.005, 8.0, 1.0)
    return jax.jit(nvfp4.quantize)(w)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def err(where: str, e: BaseException) -> None:
    LOG["errors"].append(
        {"where": where, "type": type(e).__name__, "msg": str(e)[:3000], "tb": traceback.format_exc()[-4000:]}
    )
    print(f"ERROR {where}: {type(e).__name__}: {str(e)[:600]}", flush=True)
    save()


class Case:
    """One shape's operands: W4A4 (fp16 values + row scales) and W4A16 (bf16 x) inputs, weights in both layouts."""

    def __init__(self, key, m, k, n, heavy=False, nibble="low_first"):
        kx, kw, kb = jax.random.split(key, 3)
        self.m, self.k, self.n = m, k, n
        self.x = activations(kx, m, k, heavy)
        self.wq = weights(kw, n, k)
        self.bias = (jax.random.normal(kb, (n,), jnp.float32) * 0.1).astype(jnp.bfloat16)
        self.xq = jax.jit(reference.quantize_act_ref)(self.x)
        self.xv = reference.block_values(self.xq).astype(jnp.float16)
        self.gx = reference.row_global_scale(self.xq, m)
        self.wp = jax.jit(prepack)(self.wq)
        self.wm = jax.jit(mg.to_mosaic, static_argnums=1)(self.wp, nibble)

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


def probe_nibbles(smoke: bool, orders=mg.NIBBLE_ORDERS) -> str:
    """Finds a decode implementation that compiles (ptx, else arith) and the int4 nibble order."""
    c = Case(jax.random.key(7), 256, 256, 256)
    r4, _ = c.refs()
    best, best_err = "low_first", None
    decode = "ptx"
    for order in orders:
        for dec in ("ptx", "arith") if order == "low_first" else (decode,):
            try:
                wm = jax.jit(mg.to_mosaic, static_argnums=1)(c.wp, order)
                cfg = dataclasses.replace(CONFIGS["bm128"], decode=dec)
                progress(f"probe {order} {dec}")
                y = mosaic(c.xv, wm, c.gx, c.bias, cfg, smoke)
                e = None if y is None else rel(y, r4)
                LOG["nibble"][f"{order}_{dec}"] = e
                print(f"nibble order {order}, decode {dec}: rel err {e}", flush=True)
                decode = dec
                if e is not None and (best_err is None or e < best_err):
                    best, best_err = order, e
                break
            except Exception as ex:  # noqa: BLE001  (recorded, the run goes on)
                err(f"probe {order} {dec}", ex)
    LOG["nibble"]["chosen"], LOG["nibble"]["decode"] = best, decode
    for name, cfg in list(CONFIGS.items()):
        CONFIGS[name] = dataclasses.replace(cfg, decode=decode)
    save()
    return best


def check_shape(name, m, k, n, nibble, smoke, heavy=False, configs=("bm256",)):
    c = Case(jax.random.key(m * 7 + k + n), m, k, n, heavy=heavy, nibble=nibble)
    r4, r16 = c.refs()
    row = {"shape": name, "m": m, "k": k, "n": n, "heavy": heavy}
    dd4 = dequant_dot(c.xv, c.wp, c.gx, c.bias, smoke)
    dd16 = dequant_dot(c.x, c.wp, None, c.bias, smoke)
    row["rel_dd_w4a4"], row["rel_dd_w4a16"] = rel(dd4, r4), rel(dd16, r16)
    # against the reference rounded to bf16: ~0 up to fp32 summation order (the strong check)
    rb4, rb16 = r4.astype(jnp.bfloat16), r16.astype(jnp.bfloat16)
    row["relb_dd_w4a4"], row["relb_dd_w4a16"] = rel(dd4, rb4), rel(dd16, rb16)
    for cname in configs:
        cfg = CONFIGS[cname]
        for mode, x, gx, r, rb, dd in (("w4a4", c.xv, c.gx, r4, rb4, dd4), ("w4a16", c.x, None, r16, rb16, dd16)):
            try:
                progress(f"check {name} {cname} {mode}")
                y = mosaic(x, c.wm, gx, c.bias, cfg, smoke)
                if y is None:
                    row[f"{cname}_{mode}"] = "lowered"
                    continue
                e, eb = rel(y, r), rel(y, rb)
                same = float(np.mean(np.asarray(y) == np.asarray(dd)))
                finite = bool(np.isfinite(np.asarray(y, np.float32)).all())
                ok = finite and e <= 1.05 * row[f"rel_dd_{mode}"] + 1e-6 and eb <= 2 * row[f"relb_dd_{mode}"] + 1e-4
                row[f"{cname}_{mode}"] = {"rel": e, "relb": eb, "frac_equal_dd": same, "finite": finite, "ok": ok}
            except Exception as ex:  # noqa: BLE001
                err(f"check {name} {cname} {mode}", ex)
                row[f"{cname}_{mode}"] = {"ok": False, "error": type(ex).__name__}
    LOG["checks"].append(row)
    print("CHECK", json.dumps(row, default=str), flush=True)
    save()
    return c


def time_shape(name, m, k, n, c: Case, smoke, inner=3, first=False):
    from permuquant_jax.kernels import act_quant as aq  # noqa: F401  (imported for the dispatch path)

    t = {"shape": name, "m": m, "k": k, "n": n}
    wb = reference.block_values(c.wq).astype(jnp.bfloat16)
    cases = {
        "cublas_bf16": (
            lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
            (c.x, wb),
        ),
        "dd_w4a4": (
            lambda x, w, g, b: dispatch.dequant_dot(x, w, g, b, out_dtype=jnp.bfloat16),
            (c.xv, c.wp, c.gx, c.bias),
        ),
        "dd_w4a16": (lambda x, w, b: dispatch.dequant_dot(x, w, None, b, out_dtype=jnp.bfloat16), (c.x, c.wp, c.bias)),
    }
    for cname, cfg in CONFIGS.items():
        if cname == "bm128ahead" or (cname == "bm128" and m > 1024 and not first):
            continue
        cases[f"mg_{cname}_w4a4"] = (
            lambda x, w, g, b, cfg=cfg: mg.nvfp4_matmul_mosaic(x, w, g, b, config=cfg),
            (c.xv, c.wm, c.gx, c.bias),
        )
        cases[f"mg_{cname}_w4a16"] = (
            lambda x, w, b, cfg=cfg: mg.nvfp4_matmul_mosaic(x, w, None, b, config=cfg),
            (c.x, c.wm, c.bias),
        )
    if not first:
        return _time_cases(name, m, k, n, t, cases, smoke, inner)
    cases["mg_bm256_w4a4_with_convert"] = (
        lambda x, w, g, b: mg.nvfp4_matmul_mosaic(x, mg.to_mosaic(w, LOG["nibble"].get("chosen", "low_first")), g, b),
        (c.xv, c.wp, c.gx, c.bias),
    )
    return _time_cases(name, m, k, n, t, cases, smoke, inner)


def _time_cases(name, m, k, n, t, cases, smoke, inner):
    for label, (fn, args) in cases.items():
        if time.time() - T0 > ARGS.budget_s:
            t[label] = "skipped (budget)"
            continue
        if smoke:
            if label.startswith("mg_"):
                jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
                t[label] = "lowered"
            continue
        try:
            progress(f"time {name} {label}")
            t[label] = bench(fn, copies(args, inner), reps=5) * 1e6
        except Exception as ex:  # noqa: BLE001
            err(f"time {name} {label}", ex)
            t[label] = f"error {type(ex).__name__}"
    LOG["times"].append(t)
    print("TIME", json.dumps(t, default=str), flush=True)
    save()


def table() -> str:
    cols = [
        "cublas_bf16",
        "dd_w4a4",
        "dd_w4a16",
        "mg_bm256_w4a4",
        "mg_bm256_w4a16",
        "mg_bm128_w4a4",
        "mg_bm128_w4a16",
        "mg_bm256fenced_w4a4",
        "mg_bm256fenced_w4a16",
        "mg_bm256_w4a4_with_convert",
    ]
    lines = ["| shape (M x K x N), us (x cuBLAS bf16) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for t in LOG["times"]:
        base = t.get("cublas_bf16")
        cells = []
        for col in cols:
            v = t.get(col)
            if isinstance(v, float) and isinstance(base, float):
                cells.append(f"{v:.0f} ({v / base:.2f})")
            else:
                cells.append(str(v))
        lines.append(f"| {t['shape']} {t['m']}x{t['k']}x{t['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--nibble", choices=mg.NIBBLE_ORDERS, help="skip the order probe (run 1 found low_first)")
    ARGS = ap.parse_args()
    smoke = ARGS.cpu_smoke
    dev = jax.devices()[0]
    LOG["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": getattr(dev, "device_kind", str(dev)),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else None,
        "python": sys.version.split()[0],
        "command": " ".join(sys.argv),
    }
    print(LOG["meta"], flush=True)
    threading.Thread(target=watchdog, daemon=True).start()
    flux = [("tiny", 256, 512, 384)] if smoke else FLUX
    odd = [("M=7", 7, 256, 256), ("K=1008 N=200", 77, 1008, 200)] if smoke else ODD
    nibble = probe_nibbles(smoke, (ARGS.nibble,) if ARGS.nibble else mg.NIBBLE_ORDERS)
    # the race diagnosis (M=1000), the FLUX shapes (the first one with every variant), the other odd shapes
    lead = [o for o in odd if o[0] == "M=1000"]
    rest = [o for o in odd if o[0] != "M=1000"]
    work = [("odd", o, 0) for o in lead] + [("flux", f, i) for i, f in enumerate(flux)] + [("odd", o, 0) for o in rest]
    for kind, (name, m, k, n), i in work:
        if time.time() - T0 > ARGS.budget_s:
            LOG["errors"].append({"where": f"{kind} {name}", "type": "skipped", "msg": "time budget"})
            continue
        try:
            progress(f"{kind} {name}")
            if kind == "odd":
                cfgs = ("bm128", "bm256", "bm128ahead", "bm256fenced") if name == "M=1000" else ("bm128", "bm256")
                check_shape(name, m, k, n, nibble, smoke, heavy=(name == "M=77"), configs=cfgs)
                continue
            cfgs = ("bm256", "bm256fenced", "bm128") if m <= 1024 else ("bm256", "bm256fenced")
            c = check_shape(name, m, k, n, nibble, smoke, configs=cfgs)
            time_shape(name, m, k, n, c, smoke, first=(i == 0))
            del c
        except Exception as ex:  # noqa: BLE001
            err(f"{kind} {name}", ex)
    LOG["meta"]["wall_s"] = time.time() - T0
    save()
    print(table())
    bad = [r["shape"] for r in LOG["checks"] for key, v in r.items() if isinstance(v, dict) and not v.get("ok")]
    print(f"checks: {len(LOG['checks'])} shapes, failing: {bad or 'none'}; errors: {len(LOG['errors'])}")
    if OUT:
        with open(os.path.join(OUT, "check_mosaic.md"), "w") as f:
            f.write(table() + "\n")


if __name__ == "__main__":
    main()
