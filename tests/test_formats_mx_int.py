"""MXFP4 against torchao's MX reference; INTn against a numpy reference; Hadamard; the registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
from torchao.prototype.mx_formats.mx_tensor import MXTensor

from permuquant_jax.formats import get_format, hadamard, intq, list_formats, mxfp4, nvfp4

ROWS, COLS = 128, 1024


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % (2**32))
    print(f"mx/int test seed {seed}")
    return np.random.default_rng(seed)


def _inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    outliers = rng.standard_normal((ROWS, COLS))
    outliers[:, rng.choice(COLS, COLS // 50, replace=False)] *= 100.0
    sparse = rng.standard_normal((ROWS, COLS)) * (rng.random((ROWS, COLS)) < 0.05)
    sparse[:, :64] = 0.0
    sparse[rng.random((ROWS, COLS)) < 0.1] *= -0.0
    ties = rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0], (ROWS, COLS)) * 2.0 ** rng.integers(
        -10, 10, (ROWS, COLS // 32, 1)
    ).repeat(32, -1).reshape(ROWS, COLS)
    return {
        "normal": rng.standard_normal((ROWS, COLS)) * 10.0 ** rng.uniform(-3, 3),
        "student_t": rng.standard_t(2.5, (ROWS, COLS)),
        "outliers": outliers,
        "tiny_next_to_huge": rng.choice([-1, 1], (ROWS, COLS)) * 10.0 ** rng.uniform(-30, 30, (ROWS, COLS)),
        "sparse": sparse,
        "ties": ties,
    }


_mx_q = jax.jit(mxfp4.quantize)
_mx_dq = jax.jit(mxfp4.dequantize, static_argnums=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mxfp4_bit_exact_vs_torchao(dtype: torch.dtype, rng: np.random.Generator) -> None:
    for name, x in _inputs(rng).items():
        xt = torch.from_numpy(x.astype(np.float32)).to(dtype)
        ref = MXTensor.to_mx(xt, torch.float4_e2m1fn_x2, 32)
        xj = jnp.asarray(xt.float().numpy())
        q = _mx_q(xj.astype(jnp.bfloat16) if dtype == torch.bfloat16 else xj)
        np.testing.assert_array_equal(np.asarray(q.codes), ref.qdata.numpy(), err_msg=name)
        np.testing.assert_array_equal(
            np.asarray(mxfp4.scale_bytes(q)), ref.scale.view(torch.uint8).numpy(), err_msg=name
        )
        deq = ref.dequantize(torch.float32).numpy()
        np.testing.assert_array_equal(np.asarray(_mx_dq(q, jnp.float32)).view(np.uint32), deq.view(np.uint32))


def test_mxfp4_edge_cases() -> None:
    x = np.zeros((3, 64), np.float32)
    x[0, :32] = np.linspace(-7.5, 8, 32)  # amax 8: scale 2**1, so 8/2 = 4 exact, 7.5/2 = 3.75 -> 4
    x[1, 32:] = np.nan
    x[2, :32] = -0.0
    q = mxfp4.quantize(jnp.asarray(x))
    y = np.asarray(mxfp4.dequantize(q))
    sb = np.asarray(mxfp4.scale_bytes(q))
    assert sb[0, 0] == 128 and sb[1, 1] == 255
    assert y[0, 31] == 8.0 and y[0, 0] == -8.0
    assert np.isnan(y[1, 32:]).all() and np.isfinite(y[1, :32]).all()
    np.testing.assert_array_equal(y[2], 0.0)
    assert np.signbit(y[2, :32]).all()
    # FLOOR scale rule: a block with amax 7 gets scale 2**(2 - 2) = 1, so 7 saturates to 6
    z = mxfp4.fake_quant(jnp.asarray(np.r_[7.0, np.zeros(31)].astype(np.float32))[None])
    assert float(z[0, 0]) == 6.0
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        mxfp4.quantize(jnp.ones((2, 48)))


def _int_reference(x: np.ndarray, bits: int, group: int, scale_dtype) -> np.ndarray:
    """Plain numpy: symmetric INT`bits` per group, scale rounded to scale_dtype, ties to even."""
    m = 2 ** (bits - 1) - 1
    xb = x.astype(np.float32).reshape(*x.shape[:-1], -1, group)
    s = (np.abs(xb).max(-1) / np.float32(m)).astype(scale_dtype).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[..., None] > 0, np.clip(np.rint(xb / s[..., None]), -m, m), 0)
    return (q * s[..., None]).astype(np.float32).reshape(x.shape)


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 64), (4, 32), (4, 64), (6, 128), (8, 128)])
def test_intq_matches_numpy_reference(bits: int, group: int, rng: np.random.Generator) -> None:
    import ml_dtypes

    fq = jax.jit(intq.fake_quant, static_argnums=(1, 2, 3))
    for scale_dtype, np_scale in ((jnp.float32, np.float32), (jnp.bfloat16, ml_dtypes.bfloat16)):
        for name, x in _inputs(rng).items():
            x = x[:32].astype(np.float32)
            got = np.asarray(fq(jnp.asarray(x), bits, group, scale_dtype))
            np.testing.assert_array_equal(got, _int_reference(x, bits, group, np_scale), err_msg=name)


def test_intq_edge_cases() -> None:
    q = intq.quantize(jnp.zeros((2, 64)), 4, 64)
    assert (np.asarray(intq.dequantize(q)) == 0).all() and q.values.dtype == jnp.int8
    x = np.r_[np.arange(-7, 8), 0.5, 1.5, 2.5, -2.5, np.zeros(45)].astype(np.float32)[None]
    y = np.asarray(intq.fake_quant(jnp.asarray(x), 4, 64, jnp.float32))[0]
    np.testing.assert_array_equal(y[:15], np.arange(-7, 8))
    np.testing.assert_array_equal(y[15:19], [0.0, 2.0, 2.0, -2.0])  # half to even
    xn = x.copy()
    xn[0, 3] = np.nan
    assert np.isnan(np.asarray(intq.fake_quant(jnp.asarray(xn), 4, 64))).all()
    for bad in ({"bits": 9}, {"group": 48}, {"scale_dtype": jnp.float16}):
        with pytest.raises(ValueError, match="INT"):
            intq.quantize(jnp.ones((2, 64)), **bad)


def test_hadamard_matches_scipy_and_is_orthogonal() -> None:
    for n in (1, 2, 16, 32, 64, 128, 256):
        h = np.asarray(hadamard.hadamard_matrix(n, jnp.float32))
        np.testing.assert_allclose(h, scipy.linalg.hadamard(n) / np.sqrt(n), rtol=1e-6)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    with pytest.raises(ValueError, match="power of two"):
        hadamard.hadamard_matrix(48)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_block_hadamard(block: int, rng: np.random.Generator) -> None:
    x = rng.standard_normal((3, 5, 256)).astype(np.float32)
    y = np.asarray(hadamard.block_hadamard(jnp.asarray(x), block))
    h = scipy.linalg.hadamard(block) / np.sqrt(block)
    want = np.einsum("...gi,ij->...gj", x.reshape(3, 5, -1, block).astype(np.float64), h).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # orthogonal: rotating twice gives x back, norms are kept, and rotated matmuls agree
    np.testing.assert_allclose(np.asarray(hadamard.block_hadamard(jnp.asarray(y), block)), x, atol=1e-5)
    w = rng.standard_normal((7, 256)).astype(np.float32)
    wr = np.asarray(hadamard.block_hadamard(jnp.asarray(w), block))
    np.testing.assert_allclose(y @ wr.T, x @ w.T, rtol=1e-4, atol=1e-4)
    yb = hadamard.block_hadamard(jnp.asarray(x, jnp.bfloat16), block)
    assert yb.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="multiple of the group size"):
        hadamard.block_hadamard(jnp.ones((2, 100)), block)


def test_registry(rng: np.random.Generator) -> None:
    names = list_formats()
    for required in (
        "nvfp4",
        "nvfp4-w4a16",
        "mxfp4",
        "mxfp4-w4a16",
        "int4-g64",
        "int4-g64-w4a16",
        "int8-g128",
    ):
        assert required in names
    assert get_format("nvfp4").bits_per_weight == 4.5
    assert get_format("mxfp4").bits_per_weight == 4.25
    assert get_format("int4-g64").bits_per_weight == 4.25
    assert get_format("int3-g64-w3a3").bits_per_weight == 3.25
    w = jnp.asarray(rng.standard_normal((8, 128)).astype(np.float32))
    for name in names:
        f = get_format(name)
        assert f.name == name and f.weight_bits in range(2, 9)
        assert (f.act_bits is None) == name.endswith("a16") and f.packable == (f.family == "nvfp4")
    for name in names[:4] + names[4::17] + ["int3-g64-w3a3", "int4-g32-w4a8"]:  # a sample, to save time
        f = get_format(name)
        wq = f.weight_fake_quant(w)
        assert wq.shape == w.shape and wq.dtype == w.dtype and not np.array_equal(wq, w)
        xq = f.act_fake_quant(w)
        assert (xq is w) if f.act_bits is None else not np.array_equal(xq, w)
    f = get_format("int3-g64-w3a3")
    assert (f.weight_bits, f.act_bits, f.group) == (3, 3, 64)
    np.testing.assert_array_equal(f.weight_fake_quant(w), intq.fake_quant(w, 3, 64, jnp.bfloat16))
    g = get_format("nvfp4")
    np.testing.assert_array_equal(g.act_fake_quant(w, "per_row"), nvfp4.fake_quant(w, "per_row"))
    with pytest.raises(ValueError, match="no global scale"):
        get_format("mxfp4").act_fake_quant(w, 0.1)
    for bad in ("fp8", "int9-g64", "int4-g48", "int4-g64-w3a3", "int4-g64-w4a12", "nvfp8"):
        with pytest.raises(ValueError, match="known formats: nvfp4, nvfp4-w4a16, mxfp4"):
            get_format(bad)


def test_mxfp4_and_intq_jit_vmap_match_eager(rng: np.random.Generator) -> None:
    xs = jnp.asarray((rng.standard_t(2.5, (3, 8, 256)) * rng.uniform(0.1, 10, (3, 8, 1))).astype(np.float32))
    eager_mx = [mxfp4.quantize(x) for x in xs]
    for got in (jax.jit(jax.vmap(mxfp4.quantize))(xs), jax.vmap(mxfp4.quantize)(xs)):
        np.testing.assert_array_equal(np.asarray(got.codes), np.stack([np.asarray(e.codes) for e in eager_mx]))
        np.testing.assert_array_equal(
            np.asarray(mxfp4.scale_bytes(got)), np.stack([np.asarray(mxfp4.scale_bytes(e)) for e in eager_mx])
        )
    for bits, group, sdt in ((3, 64, jnp.bfloat16),):
        eager = [intq.quantize(x, bits, group, sdt) for x in xs]
        fn = jax.vmap(lambda x, b=bits, g=group, d=sdt: intq.quantize(x, b, g, d))
        for got in (jax.jit(fn)(xs), fn(xs)):
            np.testing.assert_array_equal(np.asarray(got.values), np.stack([np.asarray(e.values) for e in eager]))
            np.testing.assert_array_equal(
                np.asarray(got.scales.astype(jnp.float32)),
                np.stack([np.asarray(e.scales.astype(jnp.float32)) for e in eager]),
            )
