"""NVFP4: bit-exact against torchao 0.18 and ml_dtypes casts; edge cases; jit/vmap; scaled_matmul form."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor as TorchaoNVFP4
from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale

from permuquant_jax.formats import nvfp4
from permuquant_jax.formats.common import pad_to_group, true_divide, widen_exact

ROWS, COLS = 256, 1024  # 262144 values per distribution; 6 distributions x 2 dtypes > 3e6 values


@pytest.fixture(scope="module")
def seed() -> int:
    s = int(np.random.SeedSequence().entropy % (2**32))
    print(f"nvfp4 test seed {s}")
    return s


def _normal(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((ROWS, COLS)) * 10.0 ** rng.uniform(-3, 3)


def _student_t(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_t(2.5, (ROWS, COLS))


def _channel_outliers(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((ROWS, COLS))
    outliers = rng.choice(COLS, size=max(1, COLS // 50), replace=False)  # 2% of input channels
    x[:, outliers] *= 100.0
    return x


def _tiny_next_to_huge(rng: np.random.Generator) -> np.ndarray:
    # Log-uniform magnitudes over 40 decades: blocks of tiny values sit next to huge ones, so many
    # block scales underflow E4M3 against the global scale and hit torchao's 2**-6 clamp.
    mag = 10.0 ** rng.uniform(-36, 4, (ROWS, COLS))
    blockwise = 10.0 ** rng.uniform(-12, 0, (ROWS, COLS // 16, 1))
    x = rng.choice([-1.0, 1.0], (ROWS, COLS)) * mag
    return (x.reshape(ROWS, COLS // 16, 16) * blockwise).reshape(ROWS, COLS)


def _sparse(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((ROWS, COLS))
    x[rng.random((ROWS, COLS)) < 0.95] = 0.0
    x[:, 32:64] = 0.0  # whole zero blocks
    x[rng.random((ROWS, COLS)) < 0.2] *= -0.0  # signed zeros among the zeros
    return x


def _ties(rng: np.random.Generator) -> np.ndarray:
    # A tensor amax of 2688 gives the global scale 1 exactly; every other block holds +-6 * 2**j,
    # so its E4M3 scale is 2**j and the reciprocal a power of two: grid points and midpoints
    # times 2**j stay exact grid points and exact ties after scaling.
    points = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    v = rng.choice(points, (ROWS, COLS // 16, 16)) * rng.choice([-1.0, 1.0], (ROWS, COLS // 16, 16))
    v[..., rng.integers(0, 16)] = 6.0
    j = rng.integers(-6, 7, (ROWS, COLS // 16, 1))
    x = (v * 2.0**j).reshape(ROWS, COLS)
    x[rng.integers(ROWS), rng.integers(COLS)] = 2688.0
    return x


DISTRIBUTIONS = {
    "normal": _normal,
    "student_t": _student_t,
    "channel_outliers": _channel_outliers,
    "tiny_next_to_huge": _tiny_next_to_huge,
    "sparse": _sparse,
    "ties": _ties,
}


def _torchao(x: torch.Tensor, per_tensor_scale: torch.Tensor | None = None):
    if per_tensor_scale is None:
        per_tensor_scale = per_tensor_amax_to_scale(torch.max(torch.abs(x)))
    return TorchaoNVFP4.to_nvfp4(x, per_tensor_scale=per_tensor_scale)


def _to_jax(t: torch.Tensor) -> jax.Array:
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)  # exact: values are bf16
    return jnp.asarray(t.numpy())


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return a.view(np.uint16)
    return a.astype(np.float32).view(np.uint32)


def _u8(a) -> np.ndarray:
    return np.asarray(a).view(np.uint8)


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy().view(np.uint32)


_quantize_jit = jax.jit(nvfp4.quantize, static_argnums=1)
_dequantize_jit = jax.jit(nvfp4.dequantize, static_argnums=1)


def _assert_same_as_torchao(q: nvfp4.NVFP4Tensor, ref, what: str, out_dtype=torch.float32) -> None:
    codes = np.asarray(q.codes)
    ref_codes = ref.qdata.numpy()
    bad = codes != ref_codes
    assert not bad.any(), f"{what}: {bad.sum()} packed bytes differ, first at {np.argwhere(bad)[0]}"
    scales = np.asarray(q.scales).view(np.uint8)
    ref_scales = ref.scale.view(torch.uint8).numpy()
    bad = scales != ref_scales
    assert not bad.any(), f"{what}: {bad.sum()} scale bytes differ, first at {np.argwhere(bad)[0]}"
    jdt = jnp.bfloat16 if out_dtype == torch.bfloat16 else jnp.float32
    deq = _bits(_dequantize_jit(q, jdt))
    ref_deq = _torch_bits(ref.dequantize(out_dtype))
    bad = deq != ref_deq
    assert not bad.any(), f"{what}: {bad.sum()} dequantized values differ, first at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_bit_exact_vs_torchao(dist: str, dtype: torch.dtype, seed: int) -> None:
    rng = np.random.default_rng([seed, list(DISTRIBUTIONS).index(dist)])
    x = torch.from_numpy(DISTRIBUTIONS[dist](rng).astype(np.float32)).to(dtype)
    ref = _torchao(x)
    q = _quantize_jit(_to_jax(x), None)
    assert q.codes.shape == (ROWS, COLS // 2) and q.scales.shape == (ROWS, COLS // 16)
    assert q.global_scale.shape == () and q.global_scale.dtype == jnp.float32
    assert _bits(q.global_scale) == _torch_bits(ref.per_tensor_scale)
    _assert_same_as_torchao(q, ref, f"{dist}/{dtype} seed {seed}", out_dtype=dtype)
    if dist == "tiny_next_to_huge":  # the inputs really exercise the E4M3 underflow clamp
        assert (np.asarray(q.scales).view(np.uint8) == 0x08).mean() > 0.1
    if dist == "ties":  # ... and exact ties after scaling
        recip = (1.0 / np.float32(q.global_scale)) / np.asarray(q.scales).astype(np.float32)
        scaled = np.abs(x.float().numpy().reshape(ROWS, -1, 16) * recip[..., None])
        assert np.isin(scaled, [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]).mean() > 0.3


def test_per_row_and_static_vs_torchao(seed: int) -> None:
    rng = np.random.default_rng([seed, 100])
    x = _channel_outliers(rng)[:64].astype(np.float32) * rng.uniform(0.01, 100, (64, 1)).astype(np.float32)
    xt = torch.from_numpy(x)
    # torchao's per-expert form ([E, 1, 1] scales on an [E, M, K] tensor) with M = 1 is per row.
    row_scale = per_tensor_amax_to_scale(torch.amax(torch.abs(xt), dim=-1))[:, None, None]
    ref = TorchaoNVFP4.to_nvfp4(xt[:, None, :], per_tensor_scale=row_scale)
    q = _quantize_jit(jnp.asarray(x), "per_row")
    assert q.global_scale.shape == (64, 1)
    np.testing.assert_array_equal(_bits(q.global_scale), _torch_bits(row_scale[:, :, 0]))
    q3 = nvfp4.NVFP4Tensor(q.codes[:, None], q.scales[:, None], q.global_scale[:, None])
    _assert_same_as_torchao(q3, ref, f"per_row seed {seed}")
    # A calibrated static scale (here: a quarter of the dynamic one, so some values clip).
    static = float(per_tensor_amax_to_scale(torch.max(torch.abs(xt)))) / 4
    ref = _torchao(xt, torch.tensor(static, dtype=torch.float32))
    _assert_same_as_torchao(nvfp4.quantize(jnp.asarray(x), static), ref, f"static seed {seed}")
    _assert_same_as_torchao(jax.jit(nvfp4.quantize)(jnp.asarray(x), jnp.float32(static)), ref, "static array")


def test_against_ml_dtypes_casts(seed: int) -> None:
    """Scale bytes = ml_dtypes float8_e4m3fn cast, codes = ml_dtypes float4_e2m1fn cast, in numpy."""
    rng = np.random.default_rng([seed, 200])
    parts = [_student_t(rng)[:64], _tiny_next_to_huge(rng)[:64], _ties(rng)[:64]]
    x = np.concatenate(parts).astype(np.float32)
    q = nvfp4.quantize(jnp.asarray(x))
    gs = np.float32(np.abs(x).max()) / np.float32(2688.0)
    xb = x.reshape(x.shape[0], -1, 16)
    sb = np.clip((np.abs(xb).max(-1) / np.float32(6.0)) / gs, 2.0**-6, 448.0).astype(np.float32)
    sb8 = sb.astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q.scales).view(np.uint8), sb8.view(np.uint8))
    recip = (np.float32(1.0) / gs) / sb8.astype(np.float32)
    scaled = np.clip(xb * recip[..., None], -6, 6).astype(np.float32)
    codes = scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_codes(q.codes)), codes)
    # decode_e2m1 agrees with ml_dtypes' value of every 4-bit pattern
    allc = np.arange(16, dtype=np.uint8)
    want = allc.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(_bits(nvfp4.decode_e2m1(jnp.asarray(allc))), _bits(want))


def test_rounding_ties_go_to_even() -> None:
    # Block 0 holds the tensor amax 2688 (global scale exactly 1); block 1 has max 6, so its
    # scale is exactly 1 and the reciprocal too: the scaled values are the inputs, exact ties.
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0], np.float32)
    x = np.concatenate([np.full(16, 2688.0, np.float32), ties, -ties])[None]
    q = nvfp4.quantize(jnp.asarray(x))
    assert float(q.global_scale) == 1.0 and float(q.scales[0, 1].astype(jnp.float32)) == 1.0
    got = np.asarray(nvfp4.dequantize(q))[0, 16:]
    want = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0], np.float32)
    np.testing.assert_array_equal(got, np.concatenate([want, -want]))
    assert np.signbit(got[8])  # -0.25 -> -0
    codes = np.asarray(nvfp4.unpack_codes(q.codes))[0, 16:]
    np.testing.assert_array_equal(codes, [0, 2, 2, 4, 4, 6, 6, 7, 8, 10, 10, 12, 12, 14, 14, 15])


def test_packing_layout() -> None:
    c = np.random.default_rng().integers(0, 16, (3, 32)).astype(np.uint8)
    packed = np.asarray(nvfp4.pack_codes(jnp.asarray(c)))
    np.testing.assert_array_equal(packed, c[:, 0::2] + 16 * c[:, 1::2])  # element 2i in the low nibble
    np.testing.assert_array_equal(np.asarray(nvfp4.unpack_codes(jnp.asarray(packed))), c)
    q = nvfp4.quantize(jnp.ones((2, 32)))
    assert q.shape == (2, 32) and q.nbytes == 2 * 16 + 2 * 2 + 4


def test_zero_blocks_signed_zero_and_zero_tensors() -> None:
    x = np.zeros((4, 64), np.float32)
    x[0, :16] = np.linspace(-3, 3, 16)
    x[1, 16:32] = -0.0
    q = nvfp4.quantize(jnp.asarray(x))
    y = np.asarray(nvfp4.dequantize(q))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[:, 16:], 0.0)
    assert np.signbit(y[1, 16:32]).all() and not np.signbit(y[2]).any()
    codes = np.asarray(nvfp4.unpack_codes(q.codes))
    assert (codes[1, 16:32] == 8).all() and (codes[2] == 0).all()
    assert (np.asarray(q.scales).view(np.uint8)[:, 1:] == 0x08).all()  # clamped to 2**-6, never 0
    # all-zero tensor and all-zero rows: torchao gives NaN (0/0); we give zeros with scale 1.0
    for gs in (None, "per_row", 1e-3):
        z = nvfp4.quantize(jnp.zeros((3, 32), jnp.bfloat16), gs)
        assert (np.asarray(nvfp4.dequantize(z)) == 0).all()
    pr = nvfp4.quantize(jnp.asarray(x), "per_row")
    np.testing.assert_array_equal(np.asarray(pr.global_scale)[1:, 0], 1.0)
    assert np.isfinite(np.asarray(nvfp4.dequantize(pr))).all()


def test_block_scale_underflow_clamps_to_smallest_normal() -> None:
    x = np.zeros((1, 32), np.float32)
    x[0, :16] = 1.0e4
    x[0, 16:] = np.linspace(-1e-3, 1e-3, 16)
    q = nvfp4.quantize(jnp.asarray(x))
    # (1e-3 / 6) / (1e4 / 2688) = 4.5e-5 < 2**-6: clamped to byte 0x08, not flushed to zero
    assert np.asarray(q.scales).view(np.uint8)[0, 1] == 0x08
    ref = _torchao(torch.from_numpy(x))
    _assert_same_as_torchao(q, ref, "underflow block")
    np.testing.assert_array_equal(np.asarray(nvfp4.dequantize(q))[0, 16:], 0.0)


def test_nan_inf_weight_raises_naming_tensor() -> None:
    w = np.ones((4, 32), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        w2 = w.copy()
        w2[2, 5] = bad
        with pytest.raises(ValueError, match=r"double_blocks\.img_attn\.qkv.*\(2, 5\)"):
            nvfp4.quantize_weight(jnp.asarray(w2), name="double_blocks.img_attn.qkv")
    q = nvfp4.quantize_weight(jnp.asarray(w), name="ok")
    np.testing.assert_array_equal(np.asarray(nvfp4.dequantize(q)), w)


def test_nan_activation_propagates() -> None:
    x = np.random.default_rng().standard_normal((2, 64)).astype(np.float32)
    x[0, 20] = np.nan
    dyn = np.asarray(nvfp4.fake_quant(jnp.asarray(x)))
    assert np.isnan(dyn).all()  # the dynamic global scale is NaN: the whole tensor is
    static = np.asarray(nvfp4.fake_quant(jnp.asarray(x), 0.01))
    assert np.isnan(static[0, 16:32]).all()  # its block is NaN
    assert np.isfinite(np.delete(static.reshape(-1, 16), 1, axis=0)).all()
    per_row = np.asarray(nvfp4.fake_quant(jnp.asarray(x), "per_row"))
    assert np.isnan(per_row[0]).all() and np.isfinite(per_row[1]).all()


def test_shape_errors_and_padding() -> None:
    x = jnp.ones((3, 40))
    with pytest.raises(ValueError, match="40 elements.*multiple of the group size 16.*pad_to_group"):
        nvfp4.quantize(x)
    with pytest.raises(ValueError, match="per_row"):
        nvfp4.quantize(jnp.ones((2, 16)), "per_tensor")
    with pytest.raises(ValueError, match="finite and >= 2\\*\\*-120"):
        nvfp4.quantize(jnp.ones((2, 16)), 0.0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 1\]"):
        nvfp4.quantize(jnp.ones((2, 16)), jnp.ones((2, 16)))
    with pytest.raises(TypeError, match="int32"):
        nvfp4.quantize(jnp.ones((2, 16), jnp.int32))
    xp = pad_to_group(x, 16)
    assert xp.shape == (3, 48)
    np.testing.assert_array_equal(np.asarray(xp[:, 40:]), 0.0)
    y = nvfp4.fake_quant(xp)[:, :40]
    np.testing.assert_array_equal(np.asarray(y), 1.0)
    assert pad_to_group(xp, 16) is xp


@functools.cache
def _batched_data() -> np.ndarray:
    rng = np.random.default_rng()
    return (_student_t(rng)[:32] * rng.uniform(0.1, 10, (32, 1))).reshape(2, 16, COLS).astype(np.float32)


@pytest.mark.parametrize("gs", [None, "per_row", 0.004])
def test_jit_and_vmap_match_eager(gs) -> None:
    xs = jnp.asarray(_batched_data()).astype(jnp.bfloat16)
    eager = [nvfp4.quantize(x, gs) for x in xs]
    for got in (
        _quantize_jit(xs[1], gs),
        jax.tree.map(lambda a: a[1], jax.jit(jax.vmap(lambda x: nvfp4.quantize(x, gs)))(xs)),
    ):
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(eager[1].codes))
        np.testing.assert_array_equal(_u8(got.scales), _u8(eager[1].scales))
        np.testing.assert_array_equal(_bits(got.global_scale), _bits(eager[1].global_scale))
    batched = jax.vmap(lambda x: nvfp4.quantize(x, gs))(xs)
    np.testing.assert_array_equal(np.asarray(batched.codes), np.stack([np.asarray(e.codes) for e in eager]))
    np.testing.assert_array_equal(_u8(batched.scales), np.stack([_u8(e.scales) for e in eager]))
    np.testing.assert_array_equal(_bits(batched.global_scale), np.stack([_bits(e.global_scale) for e in eager]))
    fq = jax.vmap(lambda x: nvfp4.fake_quant(x, gs))(xs)
    assert fq.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(fq), np.stack([_bits(nvfp4.fake_quant(x, gs)) for x in xs]))


def test_scaled_matmul_conversion_round_trip() -> None:
    x = jnp.asarray(_batched_data()[0, :8])
    q = nvfp4.quantize(x, "per_row")
    values, scales = nvfp4.to_scaled_matmul(q)
    assert values.dtype == jnp.float4_e2m1fn and values.shape == x.shape
    assert scales.dtype == jnp.float8_e4m3fn and scales.shape == (8, COLS // 16)
    # the two-level dequantization written with the scaled_matmul operands
    blocks = values.astype(jnp.float32).reshape(8, -1, 16) * scales.astype(jnp.float32)[..., None]
    np.testing.assert_allclose(
        np.asarray(blocks.reshape(x.shape) * q.global_scale), np.asarray(nvfp4.dequantize(q)), rtol=1e-6
    )
    back = nvfp4.from_scaled_matmul(values, scales, q.global_scale)
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))  # -0 codes survive
    with pytest.raises(TypeError, match="float4_e2m1fn"):
        nvfp4.from_scaled_matmul(values.astype(jnp.float32), scales, q.global_scale)


def test_true_divide_is_correctly_rounded_and_widen_exact_keeps_rounding() -> None:
    """The two helpers that keep the bytes identical across backends (see common.true_divide)."""
    rng = np.random.default_rng()
    n = 1 << 18
    # quotients stay in the normal range (XLA flushes subnormal results, numpy does not)
    a = (rng.choice([-1, 1], n) * rng.uniform(0.5, 1, n) * 10.0 ** rng.uniform(-18, 18, n)).astype(np.float32)
    b = (rng.choice([-1, 1], n) * rng.uniform(0.5, 1, n) * 10.0 ** rng.uniform(-18, 18, n)).astype(np.float32)
    b[:1024] = rng.choice(nvfp4._E2M1_LUT[1:8], 1024) * 2.0 ** rng.integers(-6, 8, 1024)  # like (1/s_g)/s_b
    a[:1024] = 1.0 / rng.uniform(1e-4, 1, 1024)
    got = np.asarray(jax.jit(true_divide)(a, b))
    np.testing.assert_array_equal(got.view(np.uint32), (a / b).view(np.uint32))
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -3.0, 2688.0], np.float32)
    sa, sb = np.meshgrid(special, special)
    with np.errstate(all="ignore"):
        want = sa / sb
    got = np.asarray(true_divide(sa, sb))
    assert ((got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))).all()
    # widening: every e4m3 byte and random bf16 values give the same float32 as a plain cast
    e4 = jnp.asarray(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn))
    np.testing.assert_array_equal(_bits(widen_exact(e4)), _bits(e4.astype(jnp.float32)))
    bf = jnp.asarray(a).astype(jnp.bfloat16)
    np.testing.assert_array_equal(_bits(widen_exact(bf)), _bits(bf.astype(jnp.float32)))
    f16 = jnp.asarray(a[np.abs(a) < 6e4]).astype(jnp.float16)
    np.testing.assert_array_equal(_bits(widen_exact(f16)), _bits(f16.astype(jnp.float32)))
