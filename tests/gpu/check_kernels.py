"""GPU correctness checks of the Pallas NVFP4 kernels at the FLUX.1-dev shapes (run on the H100).

    PYTHONPATH=. python3 tests/gpu/check_kernels.py [--quick]

Fresh random activations with outlier channels and weights with outlier input columns. Checks:
- activation quantization (packed and fp16 values, with and without a channel gather) bit-exact with
  the reference (formats.nvfp4.quantize run op by op);
- with a block Hadamard: codes equal except where the rotated value sits within float32 rounding of
  a rounding boundary (the rotation's summation order differs), dequantized error at that level;
- the matmul (W4A16 bf16/fp16, W4A4) against the reference at full float32 precision: relative error
  <= 1e-5 for float32 output, bf16 output within one bf16 ulp of the float32 reference;
- `nvfp4_linear` through the dispatch ("auto" -> pallas) and through `jax.nn.scaled_matmul`.
Prints one line per check and a summary; exits 1 on any failure. Writes details to $OUT if set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from permuquant_jax.formats import nvfp4
from permuquant_jax.kernels import act_quant as aq
from permuquant_jax.kernels import dispatch, reference, tuning
from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig, nvfp4_matmul, prepack

SHAPES = [
    (1, 3072, 18432),
    (1, 3072, 9216),
    (512, 3072, 9216),
    (4096, 3072, 9216),
    (4096, 3072, 12288),
    (4096, 12288, 3072),
    (4608, 3072, 21504),
    (4608, 15360, 3072),
]
RESULTS: list[dict] = []


def record(name: str, ok: bool, **info) -> None:
    RESULTS.append({"check": name, "ok": bool(ok), **info})
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    print(f"{'PASS' if ok else 'FAIL'} {name} {extra}", flush=True)


def activations(key, m: int, k: int, dtype=jnp.bfloat16) -> jax.Array:
    """Gaussian activations with ~1% outlier channels (x20..x100) and a few huge tokens."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (m, k), jnp.float32)
    mult = jnp.where(jax.random.uniform(k2, (k,)) < 0.01, jax.random.uniform(k3, (k,), minval=20, maxval=100), 1.0)
    return (x * mult).astype(dtype)


def weights(key, n: int, k: int) -> nvfp4.NVFP4Tensor:
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, (n, k), jnp.float32) * 0.02
    w = w * jnp.where(jax.random.uniform(k2, (k,)) < 0.005, 8.0, 1.0)
    return nvfp4.quantize(w)  # op by op: the specification's roundings


def bf16_ulp(v: np.ndarray) -> np.ndarray:
    a = np.abs(v).astype(np.float32)
    e = np.floor(np.log2(np.maximum(a, np.float32(2.0**-126))))
    return np.exp2(e - 7).astype(np.float32)


def ieee_quantize(x, gs_rows):
    """formats.nvfp4's documented arithmetic in numpy float32 (IEEE division, one rounding per op).

    An oracle independent of XLA (which rewrites divisions into reciprocal multiplies unless guarded).
    Returns (unpacked codes uint8 [M, K], scale bytes).
    """
    f = np.float32
    xb = np.asarray(x, f).reshape(x.shape[0], -1, 16)
    g = np.asarray(gs_rows, f).reshape(-1, 1)
    s = np.clip((np.abs(xb).max(-1) / f(6)) / g, f(2**-6), f(448)).astype(ml_dtypes.float8_e4m3fn)
    y = np.clip(xb * ((f(1) / g) / s.astype(f))[..., None], f(-6), f(6))
    codes = np.asarray(nvfp4.encode_e2m1(jnp.asarray(y.reshape(x.shape))))
    return codes, s.view(np.uint8)


def on_cpu(fn, *args, **kwargs):
    """Run a reference on the host CPU: XLA's GPU float32 division is not correctly rounded, and
    formats.nvfp4 specifies IEEE division (what numpy, XLA on CPU and the kernels compute)."""
    cpu = jax.devices("cpu")[0]
    put = lambda v: jax.device_put(v, cpu) if isinstance(v, jax.Array) else v  # noqa: E731
    args, kwargs = jax.tree.map(put, (args, kwargs))
    with jax.default_device(cpu):
        return fn(*args, **kwargs)


def spec_block(xb: np.ndarray, g: np.float32):
    """formats.nvfp4's arithmetic for one block in numpy float32 (IEEE, op by op)."""
    f = np.float32
    amax = np.max(np.abs(xb)).astype(f)
    s = f(f(amax / f(6)) / g)
    s8 = np.clip(s, f(2**-6), f(448)).astype(jnp.float8_e4m3fn)
    s32 = f(s8.astype(f))
    recip = f(f(f(1) / g) / s32)
    y = np.clip(xb * recip, f(-6), f(6)).astype(f)
    return amax, s, float(s32), recip, y


def explain_mismatch(x, gather, gs, q, r, limit: int = 3) -> None:
    xt = np.asarray((x if gather is None else jnp.take(x, gather, axis=-1)).astype(jnp.float32))
    gsn = np.asarray(gs)
    qc, rc = np.asarray(nvfp4.unpack_codes(q.codes)), np.asarray(nvfp4.unpack_codes(r.codes))
    qs, rs = np.asarray(q.scales.astype(jnp.float32)), np.asarray(r.scales.astype(jnp.float32))
    bad = np.argwhere((qc.reshape(*qs.shape, 16) != rc.reshape(*rs.shape, 16)).any(-1) | (qs != rs))
    print(f"  {len(bad)} mismatching blocks; first: {bad[:limit].tolist()}")
    for i, b in bad[:limit]:
        xb = xt[i, 16 * b : 16 * b + 16]
        amax, s, s32, recip, y = spec_block(xb, np.float32(gsn[i]))
        print(
            f"  row {i} block {b}: gs={gsn[i]!r} amax={amax!r} s={s!r} spec_s8={s32} "
            f"kernel_s={qs[i, b]} ref_s={rs[i, b]}"
        )
        print(f"    recip={recip!r} x={xb.tolist()}")
        print(f"    y={y.tolist()}")
        print(
            f"    kernel codes={qc[i, 16 * b : 16 * b + 16].tolist()} ref codes={rc[i, 16 * b : 16 * b + 16].tolist()}"
        )


def check_act_quant(key, m: int, k: int) -> None:
    kx, kg = jax.random.split(key)
    x = activations(kx, m, k)
    cfg = tuning.act_quant_config(m, k)
    for gather in (None, jax.random.permutation(kg, k).astype(jnp.int32)):
        for gs_mode in (None, "per_row", 0.05):
            q = aq.quantize_act(x, gather=gather, global_scale=gs_mode, **cfg)
            r = on_cpu(reference.quantize_act_ref, x, gather=gather, global_scale=gs_mode)
            gs = aq.act_global_scale_rows(x, gather=gather, global_scale=gs_mode)
            xt = np.asarray((x if gather is None else jnp.take(x, gather, axis=-1)).astype(jnp.float32))
            spec_codes, spec_bytes = ieee_quantize(xt, np.asarray(gs))
            codes_eq = float(np.mean(np.asarray(nvfp4.unpack_codes(q.codes)) == spec_codes))
            sc_eq = float(np.mean(np.asarray(q.scales.view(jnp.uint8)) == spec_bytes))
            v = aq.act_quant(x, gs, gather, out="values", **cfg)
            v_eq = float(np.mean(np.asarray(v.astype(jnp.float32)) == np.asarray(reference.block_values(q))))
            formats_eq = float(np.mean(np.asarray(q.codes) == np.asarray(r.codes)))
            if codes_eq < 1.0 or sc_eq < 1.0:
                explain_mismatch(x, gather, gs, q, r)
            record(
                f"act_quant {m}x{k} gather={gather is not None} gs={gs_mode}",
                codes_eq == 1.0 and sc_eq == 1.0 and v_eq == 1.0 and formats_eq > 0.999,
                spec_codes_equal=codes_eq,
                spec_scales_equal=sc_eq,
                values_equal=v_eq,
                formats_xla_cpu_codes_equal=formats_eq,
            )
    for hb in (16, 128):
        q = aq.quantize_act(x, hadamard_block=hb, **tuning.act_quant_config(m, k, hb))
        r = on_cpu(reference.quantize_act_ref, x, hadamard_block=hb)
        codes_eq = float(np.mean(np.asarray(q.codes) == np.asarray(r.codes)))
        dq, dr = np.asarray(nvfp4.dequantize(q)), np.asarray(nvfp4.dequantize(r))
        rel = float(np.linalg.norm(dq - dr) / np.linalg.norm(dr))
        record(f"act_quant {m}x{k} hadamard={hb}", codes_eq > 0.98 and rel < 2e-2, codes_equal=codes_eq, rel=rel)


def check_matmul(key, m: int, k: int, n: int) -> None:
    kx, kw, kb = jax.random.split(key, 3)
    x = activations(kx, m, k)
    w = weights(kw, n, k)
    bias = jax.random.normal(kb, (n,), jnp.float32)
    tuned = tuning.matmul_config(m, n, k)
    variants = [("chunk128", tuned), ("chunk128", dataclasses.replace(tuned, decode="asm"))]
    if m <= 8:
        variants.append(
            ("chunk128", MatmulConfig(block_n=64, num_warps=4, num_stages=3, split_k=2, kind="gemv", decode="asm"))
        )
    # W4A4: the activation quantization kernel's fp16 values, then the matmul.
    gs = aq.act_global_scale_rows(x)
    xv = aq.act_quant(x, gs, out="values", **tuning.act_quant_config(m, k))
    xq = aq.quantize_act(x, **tuning.act_quant_config(m, k))  # checked bit-exact above
    cases = [
        ("w4a4", xv, gs, xq),
        ("w4a16-bf16", x, None, x),
        ("w4a16-fp16", x.astype(jnp.float16), None, x.astype(jnp.float16)),
    ]
    if m >= 512:
        variants.append(("chunk128", "dequant_dot"))
    for layout, cfg in variants:
        wp = prepack(w, layout=layout)
        if cfg == "dequant_dot":
            fn = lambda a, s_, b, out_dtype, wp=wp: dispatch.dequant_dot(a, wp, s_, b, out_dtype=out_dtype)  # noqa: E731
        else:
            fn = lambda a, s_, b, out_dtype, wp=wp, cfg=cfg: nvfp4_matmul(  # noqa: E731
                a, wp, s_, b, config=cfg, out_dtype=out_dtype
            )
        for name, xin, xs, xref in cases:
            ref32 = np.asarray(reference.nvfp4_matmul_ref(xref, w, bias, out_dtype=jnp.float32))
            y32 = np.asarray(fn(xin, xs, bias, jnp.float32))
            rel = float(np.linalg.norm(y32 - ref32) / np.linalg.norm(ref32))
            y16 = fn(xin, xs, bias, jnp.bfloat16)
            y16 = np.asarray(y16).astype(np.float32)
            # one bf16 ulp of the reference, plus the float32 summation-order difference of this kernel
            big = np.maximum(np.abs(ref32), np.abs(y32))
            over = np.abs(y16 - ref32) / (bf16_ulp(big) + np.abs(y32 - ref32))
            finite = bool(np.isfinite(y32).all() and np.isfinite(y16).all())
            record(
                f"matmul {name} {layout}/{getattr(cfg, 'decode', cfg)}/{getattr(cfg, 'kind', '')} {m}x{k}x{n}",
                finite and rel <= 1e-5 and float(over.max()) <= 1.0,
                rel_f32=rel,
                max_bf16_ulps=float(over.max()),
            )


def check_dispatch(key, m: int, k: int, n: int) -> None:
    kx, kw, kb, kg = jax.random.split(key, 4)
    x = activations(kx, m, k)
    w = weights(kw, n, k)
    bias = jax.random.normal(kb, (n,), jnp.float32)
    gather = jax.random.permutation(kg, k).astype(jnp.int32)
    xq = aq.quantize_act(x, gather=gather, global_scale="per_row")  # specification-exact (checked above)
    ref = np.asarray(reference.nvfp4_matmul_ref(xq, w, bias, out_dtype=jnp.float32))
    for backend in ("auto", "scaled_matmul"):
        wi = dispatch.prepack_weight(w) if backend == "auto" else w
        y = dispatch.nvfp4_linear(
            x, wi, bias, gather=gather, act_global_scale="per_row", out_dtype=jnp.float32, backend=backend
        )
        y = np.asarray(y)
        rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        record(
            f"nvfp4_linear backend={backend} ({dispatch.resolve_backend(backend)}) {m}x{k}x{n}",
            rel <= 1e-5,
            rel_f32=rel,
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    key = jax.random.key(int(time.time()))
    # The first kernel compile: show every warning raised, to see JAX's Triton deprecation text.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        xs = activations(key, 16, 256)
        aq.act_quant(xs, aq.act_global_scale_rows(xs), out="values").block_until_ready()
    texts = sorted({f"{w.category.__name__}: {w.message}" for w in seen})
    for t in texts:
        print("warning seen:", t)
    record(
        "triton deprecation text matches the filter",
        any(__import__("re").match(dispatch.TRITON_DEPRECATION, t.split(": ", 1)[1]) for t in texts)
        or not any("Triton" in t for t in texts),
        n_warnings=len(texts),
    )
    t0 = time.time()
    for m, k in ((4608, 3072), (4608, 15360), (5, 3072)):
        key, sub = jax.random.split(key)
        check_act_quant(sub, m, k)
    shapes = SHAPES[::3] if args.quick else SHAPES
    for m, k, n in shapes + [(7, 3072, 1024), (1000, 3072, 3072 + 128)]:
        key, sub = jax.random.split(key)
        check_matmul(sub, m, k, n)
    key, sub = jax.random.split(key)
    check_dispatch(sub, 512, 3072, 3072)
    n_fail = sum(not r["ok"] for r in RESULTS)
    print(f"\n{len(RESULTS) - n_fail}/{len(RESULTS)} GPU checks passed in {time.time() - t0:.0f} s", flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "check_kernels.json"), "w") as f:
            json.dump(
                {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "results": RESULTS},
                f,
                indent=1,
            )
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
