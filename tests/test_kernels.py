"""Pallas kernels in interpret mode (CPU) against the pure-JAX references.

Activation quantization bit-exact (codes, scales, fp16 values), with gather, static / dynamic /
per-row global scales, K not a multiple of the tile, M = 1 and odd M; with a block Hadamard equal up
to the rotation's float32 summation order. Matmul (W4A16, W4A4) within float32 summation-order
differences; bf16 output within one bf16 ulp. Prepacked layouts round-trip losslessly, and so does the
Mosaic GPU kernel's operand layout (the kernel has no CPU mode: it is mocked). Dispatch picks backends,
checks inputs, and its scaled_matmul path is wired like the reference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from permuquant_jax.formats import nvfp4
from permuquant_jax.kernels import act_quant as aq
from permuquant_jax.kernels import dispatch, reference
from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig, nvfp4_matmul, prepack, unprepack


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng()


def _acts(rng, m, k, dtype=jnp.bfloat16):
    """Gaussian activations with outlier channels, some exact ties of the E2M1 grid, a zero row."""
    x = rng.standard_normal((m, k)) * np.exp(rng.standard_normal((1, k)) * 1.5)
    if m > 2:
        x[1] = 0.0
        x[2, :16] = [6, 3, 1.5, 0.75, 0.25, 5, 2.5, 3.5, 1.25, 1.75, -0.25, -0.75, 0.5, 1, 2, 4]
    return jnp.asarray(x, dtype)


def _ieee_quantize(x, gs_rows):
    """formats.nvfp4's documented arithmetic in numpy float32 (IEEE division, one rounding per op):
    an oracle independent of XLA, which rewrites divisions into reciprocal multiplies unless guarded.
    Returns (unpacked codes uint8 [M, K], scale bytes [M, K/16]).
    """
    f = np.float32
    xb = np.asarray(x, f).reshape(x.shape[0], -1, 16)
    g = np.asarray(gs_rows, f).reshape(-1, 1)
    s = np.clip((np.abs(xb).max(-1) / f(6)) / g, f(2**-6), f(448)).astype(ml_dtypes.float8_e4m3fn)
    y = np.clip(xb * ((f(1) / g) / s.astype(f))[..., None], f(-6), f(6))
    codes = np.asarray(nvfp4.encode_e2m1(jnp.asarray(y.reshape(x.shape))))
    return codes, s.view(np.uint8)


def _weights(rng, n, k):
    return nvfp4.quantize(jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32))


AQ_CASES = [
    # (M, K, dtype, gather, global scale, block_m, block_k)
    (1, 64, jnp.float16, False, None, 16, 128),
    (5, 48, jnp.bfloat16, True, "per_row", 4, 32),
    (17, 544, jnp.bfloat16, True, 0.02, 16, 128),  # K not a multiple of the tile, odd M
    (9, 256, jnp.float32, False, "static_rows", 8, 256),
]


@pytest.mark.parametrize("m,k,dtype,gather,gs,bm,bk", AQ_CASES)
def test_act_quant_bit_exact(rng, m, k, dtype, gather, gs, bm, bk):
    x = _acts(rng, m, k, dtype)
    g = jnp.asarray(rng.permutation(k), jnp.int32) if gather else None
    if gs == "static_rows":
        gs = jnp.asarray(rng.uniform(0.001, 0.05, (m, 1)), jnp.float32)
    q = aq.quantize_act(x, gather=g, global_scale=gs, interpret=True, block_m=bm, block_k=bk)
    r = reference.quantize_act_ref(x, gather=g, global_scale=gs)
    np.testing.assert_array_equal(
        np.broadcast_to(np.asarray(q.global_scale), np.shape(r.global_scale)), np.asarray(r.global_scale)
    )
    # bit-exact with the specification (numpy IEEE oracle) and with formats.quantize
    rows = aq.act_global_scale_rows(x, gather=g, global_scale=gs)
    xt = np.asarray((x if g is None else x[:, g]).astype(jnp.float32))
    codes, sbytes = _ieee_quantize(xt, rows)
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_codes(q.codes)), codes)
    np.testing.assert_array_equal(np.asarray(q.scales.view(jnp.uint8)), sbytes)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(q.scales.view(jnp.uint8)), np.asarray(r.scales.view(jnp.uint8)))
    v = aq.act_quant(x, rows, g, out="values", interpret=True, block_m=bm, block_k=bk)
    assert v.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(reference.block_values(q)))


@pytest.mark.parametrize("hb", [16, 64])
def test_act_quant_hadamard(rng, hb):
    x = _acts(rng, 6, 256)
    q = aq.quantize_act(x, hadamard_block=hb, interpret=True, block_m=8, block_k=128)
    r = reference.quantize_act_ref(x, hadamard_block=hb)
    # The rotation's float32 summation order differs; a code may flip only at a rounding boundary.
    assert np.mean(np.asarray(q.codes) == np.asarray(r.codes)) > 0.97
    dq, dr = np.asarray(nvfp4.dequantize(q)), np.asarray(nvfp4.dequantize(r))
    assert np.linalg.norm(dq - dr) / np.linalg.norm(dr) < 2e-2
    # and the rotation is applied: without it the result is far off
    plain = np.asarray(nvfp4.dequantize(reference.quantize_act_ref(x)))
    assert np.linalg.norm(plain - dr) / np.linalg.norm(dr) > 0.1


def test_e2m1_helpers_match_formats(rng):
    m = jnp.asarray(np.abs(rng.standard_normal(4096) * 3).astype(np.float32))
    ties = jnp.asarray([0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], jnp.float32)
    for v in (m, ties, -m):
        np.testing.assert_array_equal(np.asarray(aq.e2m1_index(jnp.abs(v))), np.asarray(nvfp4.encode_e2m1(v)) & 7)
    codes = jnp.arange(16, dtype=jnp.uint8)
    np.testing.assert_array_equal(
        np.asarray(aq.e2m1_code_to_f16(codes), np.float32) * 2.0**14, np.asarray(nvfp4.decode_e2m1(codes))
    )


@pytest.mark.parametrize("layout", ["chunk128", "canonical"])
def test_prepack_roundtrip(rng, layout):
    w = _weights(rng, 130, 400)  # N and K padded to 256 and 512
    p = prepack(w, layout=layout)
    assert p.codes.shape == (256, 256) and p.scales.shape == (256, 32)
    u = unprepack(p)
    np.testing.assert_array_equal(np.asarray(u.codes), np.asarray(w.codes))
    np.testing.assert_array_equal(np.asarray(u.scales.view(jnp.uint8)), np.asarray(w.scales.view(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(u.global_scale)[:, 0], np.full(130, np.asarray(w.global_scale)))


def _bf16_ok(y16, y32, ref32):
    big = np.maximum(np.abs(ref32), np.abs(y32))
    ulp = np.exp2(np.floor(np.log2(np.maximum(big, 2.0**-126))) - 7)
    return np.abs(np.asarray(y16, np.float32) - ref32) <= ulp + np.abs(y32 - ref32)


MM_CASES = [
    # (M, K, N, layout, config)
    (1, 384, 200, "chunk128", MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=2)),
    (7, 400, 130, "canonical", MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=2, decode="asm")),
    (33, 256, 128, "chunk128", MatmulConfig(block_n=64, block_m=32, num_warps=4, num_stages=2, split_k=2)),
    (3, 384, 96, "chunk128", MatmulConfig(block_n=32, num_warps=4, num_stages=2, split_k=3, kind="gemv")),
]


@pytest.mark.parametrize("m,k,n,layout,cfg", MM_CASES)
def test_matmul_matches_reference(rng, m, k, n, layout, cfg):
    x = _acts(rng, m, k)
    w = _weights(rng, n, k)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    wp = prepack(w, layout=layout)
    rows = aq.act_global_scale_rows(x)
    xv = aq.act_quant(x, rows, out="values", interpret=True, block_m=16, block_k=128)
    xq = aq.quantize_act(x, interpret=True, block_m=16, block_k=128)  # bit-exact: test above
    for xin, xs, xref in ((xv, rows, xq), (x, None, x)):  # W4A4, W4A16
        ref32 = np.asarray(reference.nvfp4_matmul_ref(xref, w, bias))
        y32 = np.asarray(nvfp4_matmul(xin, wp, xs, bias, config=cfg, out_dtype=jnp.float32, interpret=True))
        assert np.linalg.norm(y32 - ref32) / np.linalg.norm(ref32) <= 1e-5
        if xs is None:  # the bf16 epilogue is the same code for W4A16: check it once, on W4A4
            continue
        y16 = nvfp4_matmul(xin, wp, xs, bias, config=cfg, out_dtype=jnp.bfloat16, interpret=True)
        assert y16.dtype == jnp.bfloat16 and y16.shape == (m, n)
        assert _bf16_ok(y16, y32, ref32).all()


def test_dequant_dot_and_mosaic_layout_match_reference(rng, monkeypatch):
    """decode + dot, and the Mosaic kernel's operand layout (the kernel itself needs an sm_90 GPU:
    mocked by a decode of its operands, which checks the conversion end to end)."""
    from permuquant_jax.kernels import nvfp4_matmul_mgpu as mg

    x = _acts(rng, 9, 384)
    w = jax.jit(nvfp4.quantize)(jnp.asarray(rng.standard_normal((40, 384)) * 0.05, jnp.float32))  # as _weights
    bias = jnp.asarray(rng.standard_normal(40), jnp.float32)
    xq, rows, xv = jax.jit(  # the reference quantizer: bit-exact with the kernel (tests above)
        lambda x: (q := reference.quantize_act_ref(x), reference.row_global_scale(q, 9), reference.block_values(q))
    )(x)
    xv = xv.astype(jnp.float16)
    wp = jax.jit(prepack)(w)
    wm = jax.jit(mg.to_mosaic)(wp)
    assert wm.codes.dtype == jnp.int4 and wm.codes.shape == (128, 384) and wm.scales.shape == (6, 128)
    back_codes, back_scales, view, swapped = jax.jit(
        lambda wm, c: (
            mg.int4_to_codes(wm.codes),
            mg.unpack_scale_words(wm.scales),
            wm.codes.astype(jnp.int32) & 15,
            mg.codes_to_int4(c, "high_first").astype(jnp.int32) & 15,
        )
    )(wm, wp.codes)
    np.testing.assert_array_equal(back_codes, wp.codes)
    np.testing.assert_array_equal(back_scales, wp.scales)
    codes = np.asarray(jax.jit(nvfp4.unpack_codes)(wp.codes))
    np.testing.assert_array_equal(view, codes)  # element [n, k] = code k of row n
    np.testing.assert_array_equal(swapped, codes.reshape(128, -1, 2)[..., ::-1].reshape(128, -1))
    word = np.asarray(wm.scales)[1, 3]  # groups 4..7 of row 3, group 4 in the low byte
    assert [(int(word) >> (8 * i)) & 255 for i in range(4)] == list(np.asarray(wp.scales)[3, 4:8])
    p = mg.plan(77, 384, wm, mg.MosaicConfig(block_m=128))
    assert (p["mp"], p["np"], p["kp"], p["m_tiles"], p["n_tiles"], p["k_iters"]) == (128, 128, 384, 1, 1, 6)
    calls = []

    def fake_kernel(x, wm, xs, b, *, config, out_dtype):
        calls.append(config)
        back = dataclasses.replace(wp, codes=mg.int4_to_codes(wm.codes), scales=mg.unpack_scale_words(wm.scales))
        return dispatch.dequant_dot(x, back, xs, b, out_dtype=out_dtype, decoder="bits")

    monkeypatch.setattr(mg, "nvfp4_matmul_mosaic", fake_kernel)
    real = dispatch.dequant_dot
    monkeypatch.setattr(dispatch, "dequant_dot", lambda *a, **kw: real(*a, **{**kw, "decoder": "bits"}))
    both = jax.jit(
        lambda xin, xs, od: (
            dispatch.dequant_dot(xin, wp, xs, bias, out_dtype=jnp.float32),
            dispatch.mosaic_dot(xin, wp, xs, bias, out_dtype=od),
        ),
        static_argnums=2,
    )
    ref_fn = jax.jit(lambda xref: reference.nvfp4_matmul_ref(xref, w, bias))
    from permuquant_jax.kernels import gemv

    for xin, xs, xref in ((xv, rows, xq), (x, None, x)):
        ref = np.asarray(ref_fn(xref))
        y, y16 = both(xin, xs, jnp.bfloat16)
        assert np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref) <= 1e-5
        assert y16.dtype == jnp.bfloat16 and _bf16_ok(y16, np.asarray(y), ref).all()
        # the few-row GEMV (one XLA reduction) computes the same function
        yg = np.asarray(jax.jit(lambda a, s: gemv.nvfp4_gemv(a, wp, s, bias, out_dtype=jnp.float32))(xin, xs))
        assert np.linalg.norm(yg - ref) / np.linalg.norm(ref) <= 1e-5
    assert len(calls) == 2 and calls[0].block_m == 128
    # the scale words stored ahead of time (QuantLinear.prepare_device_layout) give the same operands
    words = jax.jit(mg.stored_scale_words)(w.scales)
    np.testing.assert_array_equal(words, wm.scales)
    stored = jax.jit(lambda xin, xs, sw: dispatch.mosaic_dot(xin, wp, xs, bias, out_dtype=jnp.bfloat16, scale_words=sw))
    np.testing.assert_array_equal(stored(xv, rows, words), both(xv, rows, jnp.bfloat16)[1])
    with pytest.raises(ValueError, match="scale_words must be uint32"):
        mg.to_mosaic(wp, scale_words=words[:, :64])
    assert jax.jit(mg.stored_scale_words)(jnp.zeros((2, 3, 200, 63), jnp.uint8)).shape == (2, 3, 16, 256)
    # a QuantLinear holding the layout instead of its scales: same outputs, canonical scales restored exactly
    from permuquant_jax.quant.linear import QuantLinear, drop_device_layouts, prepare_device_layouts

    arrays = {"w_codes": w.codes, "w_scales": w.scales, "w_global": jnp.asarray(w.global_scale).reshape(()),
              "bias": bias}
    ql = QuantLinear(384, 40, format="nvfp4-w4a16", _arrays=arrays)
    s0 = np.asarray(ql.w_scales.get_value()).view(np.uint8)
    fwd = jax.jit(lambda st, a: nnx.merge(nnx.graphdef(ql), st)(a))
    y0 = np.asarray(fwd(nnx.state(ql), x))
    assert prepare_device_layouts(ql) == 0  # the CPU runs the reference: nothing to prepare
    assert prepare_device_layouts(ql, force=True) == 1 and ql.w_scales.get_value() is None
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda st, a: nnx.merge(nnx.graphdef(ql), st)(a))(
        nnx.state(ql), x)), y0)
    assert ql.weight_bytes == 40 * 192 + 6 * 128 * 4 + 4 + 40 * 4  # codes, words (128 padded rows), global, bias
    assert drop_device_layouts(ql) == 1
    np.testing.assert_array_equal(np.asarray(ql.w_scales.get_value()).view(np.uint8), s0)
    del calls[2:]
    y, y32 = both(xv, rows, jnp.float32)  # fp32 out: decode + dot, no kernel
    assert len(calls) == 2 and y32.dtype == jnp.float32
    np.testing.assert_array_equal(y32, y)
    with pytest.raises(ValueError, match="block_m must be"):
        mg.MosaicConfig(block_m=100)
    with pytest.raises(ValueError, match="pipeline must be"):
        mg.MosaicConfig(pipeline="async")
    with pytest.raises(ValueError, match="grid_ctas must be"):
        mg.MosaicConfig(grid_ctas=0)
    # persistent grid: at most one CTA per tile, the device's SM count (or grid_ctas) otherwise
    big = mg.MosaicWeights(jax.ShapeDtypeStruct((9216, 3072), jnp.int4), None, None, n=9216, k=3072)
    p = mg.plan(4096, 3072, big, mg.MosaicConfig(persistent=True), sms=132)
    assert (p["tiles"], p["grid"], p["tiles_per_cta"], p["k_iters"]) == (16 * 72, 132, 9, 48)
    p = mg.plan(4096, 3072, big, mg.MosaicConfig(persistent=True, grid_ctas=100, block_k=128, stages=2))
    assert (p["grid"], p["tiles_per_cta"], p["k_iters"]) == (100, 12, 24)
    assert mg.plan(77, 384, wm, mg.MosaicConfig(persistent=True))["grid"] == 1
    assert mg.plan(4096, 3072, big, mg.MosaicConfig())["grid"] == 16 * 72
    tag = mg.MosaicConfig(pipeline="pipelined", persistent=True, bf16_decode=True).tag
    assert tag == "pipelined_p_bm256_bk64_s4_b16"
    from permuquant_jax.kernels import tuning

    assert tuning.mosaic_config(4096) == mg.MosaicConfig(**tuning.MOSAIC_LARGE)
    assert tuning.mosaic_config(512).block_m == 128
    # the kernel's scale operand from a scale word: fp16 s * 2^7 / bf16 s * 2^119 of every E4M3 byte
    # that quantization produces (normal, finite), exactly
    sb = np.arange(8, 127, dtype=np.uint8)
    words = jnp.asarray(np.pad(sb, (0, 1)).view("<u4"))
    s_ref = sb.view(jnp.float8_e4m3fn).astype(np.float64)
    for dt, exp in ((jnp.float16, 7), (jnp.bfloat16, 119)):
        got = np.stack([np.asarray(mg._scale_halves(words, j, dt)) for j in range(4)], axis=-1).reshape(-1)
        assert got.dtype == dt
        np.testing.assert_array_equal(got[: sb.size].astype(np.float64), s_ref * 2.0**exp)
    with pytest.raises(ValueError, match="canonical-layout"):
        mg.to_mosaic(prepack(w, layout="chunk128"))


def test_matmul_decode_exact_for_all_codes_and_scales():
    """Every code with every finite E4M3 scale byte decodes exactly (the fp16 path never rounds)."""
    k = 16 * 127
    codes = jnp.tile(jnp.arange(16, dtype=jnp.uint8), (16, k // 16))  # [16 rows, K]
    scale_bytes = jnp.tile(jnp.arange(127, dtype=jnp.uint8), (16, 1))  # all non-negative finite bytes
    w = nvfp4.NVFP4Tensor(
        codes=nvfp4.pack_codes(codes),
        scales=jax.lax.bitcast_convert_type(scale_bytes, jnp.float8_e4m3fn),
        global_scale=jnp.float32(1.0),
    )
    eye = jnp.eye(k, dtype=jnp.float16)[:: k // 16 * 0 + 1][:32]  # 32 unit rows pick single weights
    for cfg, layout in (
        (MatmulConfig(block_n=16, block_m=32, num_warps=4, num_stages=2), "chunk128"),
        (MatmulConfig(block_n=16, num_warps=4, num_stages=2, kind="gemv"), "chunk128"),
    ):
        for start in (0, k - 32 - 16):
            xs = jnp.roll(eye, start, axis=1)[: 8 if cfg.kind == "gemv" else 32]
            y = nvfp4_matmul(xs, prepack(w, layout), None, config=cfg, out_dtype=jnp.float32, interpret=True)
            ref = np.asarray(xs, np.float32) @ np.asarray(reference.block_values(w)).T
            np.testing.assert_array_equal(np.asarray(y), ref)


def test_dispatch_backends(rng, monkeypatch):
    x = _acts(rng, 6, 256).reshape(2, 3, 256)
    w = _weights(rng, 64, 256)
    bias = jnp.asarray(rng.standard_normal(64), jnp.float32)
    g = jnp.asarray(rng.permutation(256), jnp.int32)
    assert dispatch.resolve_backend("auto") == "reference"  # CPU
    monkeypatch.setenv(dispatch.ENV_BACKEND, "pallas_interpret")
    assert dispatch.resolve_backend("auto") == "pallas_interpret"
    monkeypatch.delenv(dispatch.ENV_BACKEND)
    for kw in ({"gather": g, "act_global_scale": "per_row"}, {"w4a16": True}, {"hadamard_block": 32}):
        ref = dispatch.nvfp4_linear(x, w, bias, backend="reference", out_dtype=jnp.float32, **kw)
        y = dispatch.nvfp4_linear(
            x, dispatch.prepack_weight(w), bias, backend="pallas_interpret", out_dtype=jnp.float32, **kw
        )
        assert y.shape == (2, 3, 64)
        tol = 2e-2 if "hadamard_block" in kw else 1e-5  # Hadamard: rotation summation order
        assert np.linalg.norm(np.asarray(y - ref)) / np.linalg.norm(np.asarray(ref)) <= tol


def test_dispatch_scaled_matmul_wiring(rng, monkeypatch):
    """The scaled_matmul path (cuDNN on Blackwell) with jax.nn.scaled_matmul's documented math."""

    def documented(a, b, sa, sb, preferred_element_type=jnp.float32):
        ra = jnp.repeat(sa.astype(jnp.float32), a.shape[-1] // sa.shape[-1], axis=-1)
        rb = jnp.repeat(sb.astype(jnp.float32), b.shape[-1] // sb.shape[-1], axis=-1)
        prod = jnp.einsum("bmk,bnk->bmn", a.astype(jnp.float32) * ra, b.astype(jnp.float32) * rb, precision="highest")
        return prod.astype(preferred_element_type)

    monkeypatch.setattr(jax.nn, "scaled_matmul", documented)
    x = _acts(rng, 5, 128)
    w = _weights(rng, 48, 128)
    ref = dispatch.nvfp4_linear(x, w, act_global_scale=0.01, backend="reference", out_dtype=jnp.float32)
    y = dispatch.nvfp4_linear(x, w, act_global_scale=0.01, backend="scaled_matmul", out_dtype=jnp.float32)
    assert np.linalg.norm(np.asarray(y - ref)) / np.linalg.norm(np.asarray(ref)) <= 1e-6


def test_dispatch_errors(rng):
    w = _weights(rng, 32, 64)
    with pytest.raises(ValueError, match="expects K = 64"):
        dispatch.nvfp4_linear(jnp.ones((2, 48)), w)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.nvfp4_linear(jnp.ones((2, 64)), w, backend="cuda")
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        dispatch.nvfp4_linear(jnp.ones((2, 64)), w, jnp.ones(31))
    with pytest.raises(TypeError, match="NVFP4Tensor or a PrepackedNVFP4"):
        dispatch.nvfp4_linear(jnp.ones((2, 64)), jnp.ones((32, 64)))
    with pytest.raises(ValueError, match="layout must be one of"):
        prepack(w, layout="tiled")
    with pytest.raises(ValueError, match="gemv kernel takes M <= 8"):
        cfg = dataclasses.replace(MatmulConfig(), kind="gemv")
        nvfp4_matmul(jnp.ones((9, 64), jnp.bfloat16), prepack(w), config=cfg, interpret=True)


def test_triton_deprecation_filter_is_exact():
    import re
    import warnings

    text = (
        "The Pallas Triton backend is deprecated and will be removed in a future JAX version. To keep "
        "using Pallas on GPU, please migrate to the Mosaic GPU backend."
    )
    assert re.match(dispatch.TRITON_DEPRECATION, text)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=dispatch.TRITON_DEPRECATION, category=DeprecationWarning)
        warnings.warn(text, DeprecationWarning, stacklevel=1)
        warnings.warn("The Pallas Mosaic GPU backend is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn(text, UserWarning, stacklevel=1)
    assert [type(w.message).__name__ for w in seen] == ["DeprecationWarning", "UserWarning"]


def test_e2m1_round_matches_thresholds(rng):
    """The magic-number rounding of act quant v2 equals the threshold encoder, ties included."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    near = [np.nextafter(np.float32(t), np.float32(d)) for t in ties for d in (0, 7)]
    a = np.concatenate([np.abs(rng.standard_normal(4096) * 2).clip(0, 6), ties, near, [0, 0.5, 1, 1.5, 2, 3, 4, 6]])
    a = jnp.asarray(a.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(aq.e2m1_index_of_rounded(aq.e2m1_round(a))), np.asarray(aq.e2m1_index(a)))


def test_decode_kernel_bit_exact(rng):
    """Pallas decode (K and N not multiples of the tile, fp16) and XLA bit placement (bf16) equal the
    reference's block values."""
    from permuquant_jax.kernels import decode

    w = nvfp4.quantize(jnp.asarray(rng.standard_normal((40, 272)) * np.exp(rng.standard_normal((1, 272)) * 3)))
    ref = np.asarray(reference.block_values(w))
    p = prepack(w)
    # the former 2-D tiling ("v1") is checked on the GPU (tests/gpu/check_backends.py)
    y = decode.decode_weight_pallas(p, jnp.float16, block_n=32, block_k=256, interpret=True)
    assert y.dtype == jnp.float16 and y.shape == (40, 272)
    np.testing.assert_array_equal(np.asarray(y, np.float32), ref)
    np.testing.assert_array_equal(np.asarray(decode.decode_weight_bits(p, jnp.bfloat16), np.float32), ref)
    with pytest.raises(ValueError, match="canonical prepacked"):
        decode.decode_weight_bits(prepack(w, layout="chunk128"))


@pytest.mark.parametrize("dev_class", ["h200", "h100", "sm80", None])
def test_dispatch_table_choices(rng, monkeypatch, dev_class):
    """Per device class, nvfp4_linear runs the GEMM backend the tuning table names for each M class
    (kernels mocked: only the choice is tested)."""
    from permuquant_jax.kernels import tuning

    calls = []

    def fake_matmul(x, w, s, b, *, config, out_dtype, interpret):
        calls.append(("triton", config))
        return jnp.zeros((x.shape[0], w.n), out_dtype)

    def fake_dqdot(x, w, s, b, *, out_dtype, decoder):
        calls.append(("decode_cublas" if decoder == "pallas" else "xla_decode_cublas", decoder))
        return jnp.zeros((x.shape[0], w.n), out_dtype)

    def fake_act_quant(x, gs, gather, **kw):
        calls.append(("act_quant", kw["block_m"]))
        return x.astype(jnp.float16)

    def fake_mosaic(x, w, s, b, *, out_dtype, scale_words=None):
        calls.append(("mosaic", None if scale_words is None else scale_words.shape))
        return jnp.zeros((x.shape[0], w.n), out_dtype)

    monkeypatch.setattr(dispatch, "nvfp4_matmul", fake_matmul)
    monkeypatch.setattr(dispatch, "dequant_dot", fake_dqdot)
    def fake_gemv(x, w, s, b, *, out_dtype):
        calls.append(("xla_gemv", None))
        return jnp.zeros((x.shape[0], w.n), out_dtype)

    monkeypatch.setattr(dispatch, "mosaic_dot", fake_mosaic)
    monkeypatch.setattr(dispatch._gemv, "nvfp4_gemv", fake_gemv)
    monkeypatch.setattr(dispatch._aq, "act_quant", fake_act_quant)
    monkeypatch.setattr(dispatch, "device_class", lambda: dev_class)
    w = dispatch.prepack_weight(_weights(rng, 32, 64))
    for m, cls in ((1, "gemv"), (40, "small"), (512, "medium"), (4096, "large")):
        assert tuning.m_class(m) == cls
        for w4a16 in (False, True):
            calls.clear()
            y = dispatch.nvfp4_linear(jnp.ones((m, 64), jnp.bfloat16), w, w4a16=w4a16, backend="pallas")
            assert y.shape == (m, 32)
            want = tuning.gemm_backend(dev_class, m, 32)
            assert [c[0] for c in calls] == ([] if w4a16 else ["act_quant"]) + [want]
            if want == "triton":
                assert calls[-1][1] == tuning.matmul_config(m, 32, 64)
    # the table's rows, and the Mosaic kernel only for wide outputs (narrow N takes decode+cuBLAS)
    for m, cls in ((1, "gemv"), (40, "small"), (512, "medium"), (4096, "large")):
        assert tuning.gemm_backend(dev_class, m) == tuning.DISPATCH_TABLE[dev_class or tuning.FALLBACK_CLASS][cls]
    assert tuning.gemm_backend("h200", 4096, 9216) == "mosaic"
    assert tuning.gemm_backend("h200", 4608, tuning.MOSAIC_MIN_N - 1) == "decode_cublas"
    assert tuning.gemm_backend("h100", 4096, 3072) == "xla_decode_cublas"
    # a per-shape Mosaic entry admits a narrow weight and sets its tiles
    assert tuning.gemm_backend("h200", 4096, 3072, 12288) == "mosaic"  # img fc2: measured faster
    assert tuning.gemm_backend("h200", 4608, 3072, 15360) == "decode_cublas"  # linear2: measured slower
    monkeypatch.setitem(tuning.MOSAIC_SHAPES, (3072, 15360), {"block_m": 128})
    assert tuning.gemm_backend("h200", 4608, 3072, 15360) == "mosaic"
    assert tuning.mosaic_config(4608, 3072, 15360).block_m == 128
    assert tuning.mosaic_config(4608, 9216, 3072).block_m == tuning.MOSAIC_LARGE["block_m"]
    monkeypatch.delitem(tuning.MOSAIC_SHAPES, (3072, 15360))
    # a layer stores the Mosaic scale layout only where this device runs the kernel at large M
    from permuquant_jax.quant.linear import QuantLinear, drop_device_layouts, layer_rows, prepare_device_layouts

    assert dispatch.wants_mosaic_layout(9216, 3072, "pallas") == (dev_class == "h200")
    assert not dispatch.wants_mosaic_layout(3072, 15360, "pallas")
    assert not dispatch.wants_mosaic_layout(9216, 3072, "reference")
    q = QuantLinear(64, 32, format="nvfp4-w4a16", stack=(2,), backend="pallas")
    assert prepare_device_layouts(q) == 0 and getattr(q, "w_mosaic_scales", None) is None
    assert prepare_device_layouts(q, force=True) == 1 and q.w_mosaic_scales.get_value().shape == (2, 2, 128)
    assert q.w_scales.get_value() is None  # the layout replaces the canonical scales

    class Two(nnx.Module):  # the same weight shape at a large and a small M (image vs text stream)
        def __init__(self):
            self.big = QuantLinear(64, 32, format="nvfp4-w4a16", backend="pallas")
            self.small = QuantLinear(64, 32, format="nvfp4-w4a16", backend="pallas")

        def __call__(self, a, b):
            return self.big(a).sum() + self.small(b).sum()

    two = Two()
    example = lambda mdl: mdl(jnp.ones((4096, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16))
    assert layer_rows(two, example) == {"big": 4096, "small": 8}
    monkeypatch.setitem(tuning.MOSAIC_SHAPES, (32, 64), {})
    assert prepare_device_layouts(two, example) == (1 if dev_class == "h200" else 0)
    assert (getattr(two.big, "w_mosaic_scales", None) is not None) == (dev_class == "h200")
    assert getattr(two.small, "w_mosaic_scales", None) is None
    monkeypatch.delitem(tuning.MOSAIC_SHAPES, (32, 64))
    monkeypatch.setenv(dispatch.ENV_GEMM, "mosaic")  # the override beats the table
    calls.clear()
    dispatch.nvfp4_linear(jnp.ones((8, 64), jnp.bfloat16), w, w4a16=True, backend="pallas")
    assert calls == [("mosaic", None)]
    calls.clear()
    nnx_layer = jax.tree.map(lambda a: a[0], nnx.state(q))  # one layer of the stack, as a scan slices it
    nnx.update(single := QuantLinear(64, 32, format="nvfp4-w4a16", backend="pallas"), nnx_layer)
    single(jnp.ones((8, 64), jnp.bfloat16))
    assert calls == [("mosaic", (2, 128))]  # the stored words reach the kernel
    assert drop_device_layouts(q) == 1 and drop_device_layouts(q) == 0
    monkeypatch.setenv(dispatch.ENV_GEMM, "cutlass")
    with pytest.raises(ValueError, match="PERMUQUANT_GEMM_BACKEND='cutlass'"):
        dispatch.nvfp4_linear(jnp.ones((8, 64), jnp.bfloat16), w, w4a16=True, backend="pallas")
    monkeypatch.delenv(dispatch.ENV_GEMM)
    # device kinds -> classes (unknown Hopper/Ampere parts take the fallback; others get no Triton)
    assert tuning.device_class("NVIDIA H200", 9.0) == "h200"
    assert tuning.device_class("NVIDIA H100 80GB HBM3", 9.0) == "h100"
    assert tuning.device_class("NVIDIA A100-SXM4-80GB", 8.0) == tuning.FALLBACK_CLASS
    assert tuning.device_class("NVIDIA B200", 10.0) is None
    assert tuning.device_class("cpu", None) is None


def test_quant_linear_chunked_quantization_is_per_layer_nvfp4(monkeypatch):
    """QuantLinear.from_linear quantizes in fixed-size chunks of blocks (one compiled quantizer for every
    large layer): bit-identical with `nvfp4.quantize` of each layer's rows; NaN weights are named."""
    from flax import nnx

    from permuquant_jax.quant import linear as ql

    monkeypatch.setattr(ql, "_MAX_CHUNK", 64)  # 2 x 48 x 64 / 16 = 384 blocks: 6 chunks
    k = np.random.default_rng(3).standard_normal((2, 64, 48)) * np.array([0.02, 3.0])[:, None, None]
    lin = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
    lin.kernel.set_value(jnp.asarray(k, jnp.bfloat16))
    lin.bias.set_value(jnp.ones((2, 48), jnp.float32))
    q = ql.QuantLinear.from_linear(lin, format="nvfp4", act_global_scale=0.05)
    ref = [jax.jit(nvfp4.quantize)(jnp.asarray(k[i].T, jnp.bfloat16).astype(jnp.float32)) for i in range(2)]
    np.testing.assert_array_equal(np.asarray(q.w_codes[...]), np.stack([np.asarray(r.codes) for r in ref]))
    np.testing.assert_array_equal(
        np.asarray(q.w_scales[...]).view(np.uint8), np.stack([np.asarray(r.scales).view(np.uint8) for r in ref])
    )
    np.testing.assert_array_equal(np.asarray(q.w_global[...]), np.array([float(r.global_scale) for r in ref]))
    assert q.bias[...].shape == (2, 48) and q.act_scale.get_value().shape == (2,)
    lin.kernel.set_value(lin.kernel[...].at[1, 5, 7].set(jnp.inf))
    with pytest.raises(ValueError, match=r"weight 'fc' .* 0 NaN and 1 Inf"):
        ql.QuantLinear.from_linear(lin, format="nvfp4", name="fc")
