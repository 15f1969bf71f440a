"""quantize_model on a small NNX model we do not know (gather sites), calibration, baselines, report."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from permuquant_jax.formats import nvfp4
from permuquant_jax.quant import (
    CalibrationStats,
    QuantLinear,
    QuantReport,
    calibrate,
    fold_permutation,
    gather_sites,
    plan_summary,
    quantize_model,
)
from permuquant_jax.quant.baselines import smoothquant_scales

K = 128  # input width: 8 NVFP4 groups


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(K, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, K, rngs=rngs)
        self.head = nnx.Linear(K, 32, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.fc2(jax.nn.gelu(self.fc1(x))))


def _toy(seed: int, cols: np.ndarray) -> Toy:
    m = Toy(nnx.Rngs(seed))
    for lin in (m.fc1, m.head):
        k = np.array(lin.kernel[...])
        k[cols] /= 30.0  # outlier input channels meet small weights
        lin.kernel[...] = jnp.asarray(k)
    return m


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng()
    cols = np.arange(8) * 16 + rng.integers(0, 16, 8)  # one outlier channel in every group
    model = _toy(int(rng.integers(1 << 30)), cols)
    batches = []
    for _ in range(3):
        x = rng.standard_normal((2, 48, K)).astype(np.float32)
        x[..., cols] *= 30.0
        batches.append((jnp.asarray(x),))
    refs = [np.asarray(model(*b)) for b in batches]
    return model, batches, refs


def _rel(model, batches, refs):
    num = sum(float(np.sum((np.asarray(model(*b)) - r) ** 2)) for b, r in zip(batches, refs, strict=True))
    return np.sqrt(num / sum(float(np.sum(r**2)) for r in refs))


def test_calibration_stats_match_numpy_and_round_trip(setup, tmp_path):
    model, batches, _ = setup
    stats = calibrate(model, batches, [("fc1",), ("fc2",), ("head",)], progress=False)
    xs = np.concatenate([np.asarray(b[0]).reshape(-1, K) for b in batches])
    h = np.concatenate([np.asarray(jax.nn.gelu(model.fc1(b[0]))).reshape(-1, 128) for b in batches])
    for path, a in ((("fc1",), xs), (("fc2",), h)):
        s = stats[path]
        np.testing.assert_allclose(s.sumsq, (a.astype(np.float64) ** 2).sum(0), rtol=1e-4)
        np.testing.assert_allclose(s.absmax, np.abs(a).max(0), rtol=1e-5)  # jit may fuse gelu differently
        assert int(s.count) == a.shape[0]
        np.testing.assert_allclose(float(s.amax), np.abs(a).max(), rtol=1e-5)
    assert isinstance(model.fc1, nnx.Linear)  # the observers were removed
    again = calibrate(model, batches, [("fc1",), ("fc2",), ("head",)], progress=False)
    for p in stats.layers:  # deterministic
        np.testing.assert_array_equal(again.layers[p].sumsq, stats.layers[p].sumsq)
    stats.save(str(tmp_path / "stats.npz"))
    back = CalibrationStats.load(str(tmp_path / "stats.npz"))
    assert back.batches == 3 and back.fingerprint() == stats.fingerprint()
    np.testing.assert_array_equal(back["fc2"].sumsq, stats["fc2"].sumsq)
    # reusing stats skips the calibration pass and gives the same result
    m1, r1 = quantize_model(nnx.clone(model), batches, method="rtn", stats=back, progress=False)
    m2, r2 = quantize_model(nnx.clone(model), batches, method="rtn", progress=False)
    assert r1.sites == r2.sites and r1.layers == r2.layers


def test_gather_folding_is_invariant(setup):
    model, batches, refs = setup
    m = nnx.clone(model)
    rng = np.random.default_rng()
    for s in gather_sites(m, [("fc1",), ("fc2",), ("head",)]):
        fold_permutation(m, s, rng.permutation(s.size))
    assert isinstance(m.fc2, QuantLinear) and m.fc2.format is None
    for b, r in zip(batches, refs, strict=True):
        np.testing.assert_allclose(np.asarray(m(*b)), r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


def test_acceptance_error_is_the_quantized_layer_error(setup):
    """The acceptance pass measures exactly what the QuantLinear computes (one batch: static = dynamic)."""
    model, batches, _ = setup
    m, rep = quantize_model(nnx.clone(model), batches[:1], method="rtn", progress=False)
    x = batches[0][0]
    y = np.asarray(model.fc1(x), np.float64) - np.asarray(model.fc1.bias[...])
    yq = np.asarray(m.fc1(x), np.float64) - np.asarray(model.fc1.bias[...])
    site = next(s for s in rep.sites if s.consumers == ["fc1"])
    np.testing.assert_allclose(site.error_identity, np.sum((yq - y) ** 2) / np.sum(y**2), rtol=1e-3)
    # and that is also what an independent fake-quant computes
    w = np.asarray(model.fc1.kernel[...]).T
    ind = np.asarray(nvfp4.fake_quant(x.reshape(-1, K))) @ np.asarray(nvfp4.fake_quant(jnp.asarray(w))).T
    np.testing.assert_allclose(yq.reshape(-1, 128), ind, rtol=1e-4, atol=1e-4 * np.abs(ind).max())


def test_methods_on_outlier_model(setup):
    """RTN, SmoothQuant and PermuQuant (the Hadamard methods are tested with the FLUX plan and below)."""
    model, batches, refs = setup
    errs, reports = {}, {}
    for method in ("rtn", "smoothquant", "permuquant"):
        m, rep = quantize_model(nnx.clone(model), batches, method=method, progress=False)
        assert all(isinstance(getattr(m, n), QuantLinear) for n in ("fc1", "fc2", "head"))
        assert rep.n_sites == 3  # one gather site per linear
        for s in rep.sites if method == "permuquant" else ():  # accepted only if the measured (here:
            d = s.decision  # model-level: no enclosing block) error fell, also held out
            assert d["level"] == "model"
            assert not s.accepted or (d["choose_best"] < d["choose_before"] and d["heldout_best"] < d["heldout_before"])
        errs[method], reports[method] = _rel(m, batches, refs), rep
    assert errs["permuquant"] < 0.7 * errs["rtn"], errs
    assert errs["permuquant"] < 0.5 and errs["smoothquant"] < errs["rtn"], errs
    assert reports["permuquant"].n_accepted >= 1
    assert reports["rtn"].n_accepted == 0


def test_smoothquant_alpha_zero_is_rtn(setup):
    model, batches, _ = setup
    m0, _ = quantize_model(nnx.clone(model), batches, method="smoothquant", smooth_alpha=0.0, progress=False)
    m1, _ = quantize_model(nnx.clone(model), batches, method="rtn", progress=False)
    x = batches[0][0]
    np.testing.assert_array_equal(np.asarray(m0(x)), np.asarray(m1(x)))
    rng = np.random.default_rng()
    a, w = rng.lognormal(size=16), rng.lognormal(size=16)
    np.testing.assert_allclose(smoothquant_scales(a, w, 0.5), np.sqrt(a) / np.sqrt(w), rtol=1e-6)


def test_hadamard_is_orthogonal_end_to_end(setup):
    """With an 8-bit format the rotated model is the float model up to 8-bit rounding."""
    model = setup[0]
    rng = np.random.default_rng()
    batches = [(jnp.asarray(rng.standard_normal((2, 16, K)).astype(np.float32)),) for _ in range(2)]
    refs = [np.asarray(model(*b)) for b in batches]
    m, _ = quantize_model(
        nnx.clone(model), batches, method="hadamard", format="int8-g32", hadamard_block=32, progress=False
    )
    assert m.fc1.hadamard_block == 32
    assert _rel(m, batches, refs) < 2e-2


def test_report_round_trips(setup, tmp_path):
    model, batches, _ = setup
    _, rep = quantize_model(nnx.clone(model), batches, method="permuquant", progress=False)
    back = QuantReport.from_json(rep.to_json())
    assert back == rep
    rep.save(str(tmp_path / "report"))
    md = (tmp_path / "report.md").read_text()
    assert "| fc1 |" in md and f"accepted: {rep.n_accepted}" in md
    arrays = rep.arrays()
    for name, perm in rep.permutations.items():
        assert sorted(arrays[f"perm/{name}"].tolist()) == list(range(len(perm)))
    assert "act_global_scale/fc1" in arrays


def test_user_errors_name_the_value(setup):
    model, batches, _ = setup
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        quantize_model(nnx.clone(model), batches, method="gptq")
    with pytest.raises(ValueError, match="Hadamard block"):
        quantize_model(nnx.clone(model), batches, method="hadamard", hadamard_block=24)
    with pytest.raises(ValueError, match="no linear layer"):
        quantize_model(nnx.clone(model), batches, keep=("*",))
    with pytest.raises(ValueError, match="tau must be a finite number >= 0, found nan"):
        quantize_model(nnx.clone(model), batches, tau=float("nan"))
    bad = [batches[0], (batches[1][0].at[1, 5, 7].set(jnp.inf),)]
    with pytest.raises(ValueError, match=r"calibration_batches\[1\] holds NaN or Inf values \(in \[0\]\)"):
        quantize_model(nnx.clone(model), bad, method="rtn")
    with pytest.raises(ValueError, match="the model is itself a linear layer"):
        quantize_model(nnx.clone(model.head), [(jnp.ones((4, K)),)], method="rtn")
    with pytest.raises(ValueError, match="refine must be an integer >= 0.*found -1"):
        quantize_model(nnx.clone(model), batches, refine=-1)
    with pytest.raises(ValueError, match="calibration_batches is None"):
        quantize_model(nnx.clone(model), None)
    with pytest.raises(TypeError, match="model must be a flax.nnx.Module, found function"):
        quantize_model(lambda x: x, batches)
    done, _ = quantize_model(nnx.clone(model), batches[:1], method="rtn")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(done, batches[:1], method="rtn")


def test_plan_summary_counts_bytes(setup):
    model = setup[0]
    s = plan_summary(model, keep=("head",))
    rows = {r["path"]: r for r in s["layers"]}
    assert rows["head"]["keep"] and rows["head"]["bytes_after"] == rows["head"]["bytes_before"] == (K * 32 + 32) * 4
    # fc1: K x 128 weights at 4.5 bits, one float32 global scale, float32 bias
    assert rows["fc1"]["bytes_after"] == K * 128 * 9 // 16 + 4 + 128 * 4
    assert [x["name"] for x in s["sites"]] == ["fc1", "fc2"]
    assert s["bytes_after"] == sum(r["bytes_after"] for r in s["layers"])
