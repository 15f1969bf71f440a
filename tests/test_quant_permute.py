"""The joint order, candidate orders, the acceptance rule and the single-layer chooser."""

from __future__ import annotations

import numpy as np
import pytest

from permuquant_jax.formats import nvfp4
from permuquant_jax.quant.permute import (
    accept,
    aligned_hadamard_blocks,
    choose_for_layer,
    deal_order,
    joint_order,
    make_candidates,
)


def _paper_order(mu_a, w_nk, alpha):
    """The paper's score v = (mu_a^2)^a (mu_w^2)^(1-a) in float64, sorted descending."""
    mu_w = (w_nk.astype(np.float64) ** 2).mean(axis=0)
    v = (mu_a.astype(np.float64) ** 2) ** alpha * (mu_w**2) ** (1 - alpha)
    return np.argsort(-v, kind="stable")


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_joint_order_matches_paper_score(alpha):
    rng = np.random.default_rng()
    k = 64
    mu_a = rng.lognormal(0, 1.5, k)
    w = rng.standard_normal((24, k)) * rng.lognormal(0, 0.5, k)
    p = joint_order(mu_a, w, alpha=alpha)
    np.testing.assert_array_equal(p, _paper_order(mu_a, w, alpha))
    assert p.dtype == np.int32


def test_joint_order_stays_within_segments():
    rng = np.random.default_rng()
    mu_a = rng.lognormal(0, 2, 96)
    w = rng.standard_normal((8, 96))
    p = joint_order(mu_a, w, alpha=1.0, segments=32)
    for s in range(3):
        seg = p[32 * s : 32 * (s + 1)]
        assert sorted(seg) == list(range(32 * s, 32 * (s + 1)))
        assert np.all(np.diff(mu_a[seg]) <= 0)  # alpha = 1: sorted by activation moment alone


def test_joint_order_rejects_wrong_layouts():
    with pytest.raises(ValueError, match="PyTorch layout"):
        joint_order(np.ones(32), np.ones((32, 48)))
    with pytest.raises(ValueError, match="multiple of the group"):
        joint_order(np.ones(40), np.ones((4, 40)))
    with pytest.raises(ValueError, match="whole quantization groups"):
        joint_order(np.ones(48), np.ones((4, 48)), segments=24)


def test_deal_order_spreads_ranks_over_blocks():
    rng = np.random.default_rng()
    order = rng.permutation(64).astype(np.int32)
    d = deal_order(order, 16)
    assert sorted(d) == list(range(64))
    # block b holds sorted positions b, b+4, b+8, ...: one channel of each band of 4 ranks
    for b in range(4):
        np.testing.assert_array_equal(d[16 * b : 16 * (b + 1)], order[b::4])


def test_candidates_identity_first_and_deduplicated():
    mu = np.linspace(1, 2, 32)
    c = make_candidates(mu, mu, alphas=(0.0, 0.5, 1.0))
    assert c[0].label == "identity" and np.array_equal(c[0].perm, np.arange(32))
    assert len(c) == 2  # all three alphas give the same (reversed) order
    assert len(make_candidates(mu, mu, alphas=(0.0, 0.5, 1.0), dedup=False)) == 4


def test_accept_rule():
    assert accept([1.0, 0.5, 0.8], tau=0.0) == (1, True, 0.5)
    assert accept([1.0, 0.5, 0.8], tau=0.6)[:2] == (0, False)
    assert accept([1.0, 1.2], tau=0.0)[:2] == (0, False)


def _nvfp4_rel_error(x, w_nk, perm):
    """Independent W4A4 NVFP4 output error of one layer under an order (numpy matmuls)."""
    xp, wp = (x, w_nk) if perm is None else (x[:, perm], w_nk[:, perm])
    yq = np.asarray(nvfp4.fake_quant(xp), np.float64) @ np.asarray(nvfp4.fake_quant(wp), np.float64).T
    y = x.astype(np.float64) @ w_nk.astype(np.float64).T
    return float(np.sum((yq - y) ** 2) / np.sum(y**2))


def _outlier_layer(rng, k=256, n=64, tokens=512):
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    # one outlier channel in each of 12 different groups of 16
    cols = rng.choice(k // 16, 12, replace=False) * 16 + rng.integers(0, 16, 12)
    x[:, cols] *= 40.0
    # weights that balance the outputs (outlier channels meet small weights): with plain groups the 15
    # neighbours of each outlier round to zero and that error dominates the output
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[:, cols] /= 40.0
    return x, w


def test_choose_for_layer_lowers_nvfp4_error_on_outliers():
    rng = np.random.default_rng()
    x, w = _outlier_layer(rng)
    perm, rep = choose_for_layer(x, w, format="nvfp4")
    assert perm is not None and rep["accepted"]
    e_rtn, e_perm = _nvfp4_rel_error(x, w, None), _nvfp4_rel_error(x, w, perm)
    assert e_perm < 0.5 * e_rtn
    # the reported errors are the real ones
    np.testing.assert_allclose(rep["error_identity"], e_rtn, rtol=1e-3)
    np.testing.assert_allclose(rep["error_chosen"], e_perm, rtol=1e-3)


def test_choose_for_layer_never_raises_error_and_is_deterministic():
    rng = np.random.default_rng()
    x = rng.standard_normal((256, 128)).astype(np.float32)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    perm, rep = choose_for_layer(x, w, tau=0.0)
    assert rep["error_chosen"] <= rep["error_identity"]
    assert all(c["error"] >= rep["error_chosen"] for c in rep["candidates"])
    perm2, rep2 = choose_for_layer(x, w, tau=0.0)
    assert (perm is None and perm2 is None) or np.array_equal(perm, perm2)
    assert rep == rep2
    # a threshold above every gain keeps the identity
    perm3, rep3 = choose_for_layer(x, w, tau=max(rep["gain"], 0.0) + 0.01)
    assert perm3 is None and not rep3["accepted"]
    # validated on other samples: kept only if it beats RTN there; the rotation size is part of the choice
    xa = rng.standard_normal((256, 128)).astype(np.float32) * np.linspace(0.2, 3.0, 128, dtype=np.float32)
    p4, rep4 = choose_for_layer(x * xa.std(0), w, method="permuquant-h", x_accept=xa, hadamard_blocks=(16,),
                                tau=0.0)
    assert rep4["candidates"][0]["label"] == "identity" and rep4["hadamard_block"] in (None, 16)
    assert rep4["heldout_chosen"] <= rep4["heldout_identity"]
    assert rep4["accepted"] == (rep4["heldout_chosen"] < rep4["heldout_identity"])
    assert rep4["best"] == min(rep4["candidates"], key=lambda c: c["error"])["label"]
    assert aligned_hadamard_blocks(96, 16) == (16, 32) and aligned_hadamard_blocks(128, 64, starts=(32,)) == (16, 32)
