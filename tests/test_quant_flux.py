"""The FLUX site plan: invariance of folding per site kind, schedule, calibration batches, quantize_flux."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from permuquant_jax.models.flux import FluxConfig, FluxDiT
from permuquant_jax.models.layers import Linear
from permuquant_jax.quant import (
    QuantLinear,
    QuantReport,
    apply_structure,
    flux_calibration_batches,
    flux_schedule,
    flux_sites,
    fold_permutation,
    fold_smoothing,
    quantize_flux,
)
from permuquant_jax.quant.sites import stack_shape

# FLUX architecture at a small width (compile time is what costs here, not the width)
CFG = FluxConfig(
    hidden_size=64,
    num_heads=2,
    axes_dim=(8, 12, 12),
    depth=2,
    depth_single_blocks=2,
    context_in_dim=64,
    vec_in_dim=32,
    in_channels=16,
    out_channels=16,
    mlp_ratio=2.0,
)


@pytest.fixture(scope="module")
def flux():
    model = FluxDiT(CFG, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    batches = flux_calibration_batches(
        model,
        num_samples=2,
        num_steps=2,
        height=64,
        width=64,
        txt_len=8,
        batch_size=2,
        seed=int(np.random.default_rng().integers(1 << 30)),
    )
    fwd = nnx.jit(lambda m, b: m(**b))
    refs = [np.asarray(fwd(model, b)) for b in batches]
    return model, batches, refs, fwd


def _random_perm(rng, stack, size, segments):
    out = np.empty((*stack, size), np.int32)
    for idx in np.ndindex(stack):
        parts, o = [], 0
        for n in segments or (size,):
            parts.append(o + rng.permutation(n))
            o += n
        out[idx] = np.concatenate(parts)
    return out


@pytest.mark.parametrize("kind", ["rows", "heads", "norm", "gather", "all"])
def test_folding_random_permutations_is_invariant(flux, kind):
    model, batches, refs, fwd = flux
    m = nnx.clone(model)
    rng = np.random.default_rng()
    n = 0
    for s in flux_sites(m):
        if kind not in ("all", s.kind):
            continue
        stack = stack_shape(m, s.consumers[0].path)
        fold_permutation(m, s, _random_perm(rng, stack, s.size, s.segments))
        if kind == "all" and s.scalable:  # SmoothQuant folding is invariant too
            fold_smoothing(m, s, rng.uniform(0.5, 2.0, (*stack, s.size)))
        n += 1
    assert n >= 1
    for b, r in zip(batches, refs, strict=True):
        out = np.asarray(fwd(m, b))
        assert np.linalg.norm(out - r) <= 1e-5 * np.linalg.norm(r), kind


def test_plan_covers_every_quantized_linear(flux):
    model = flux[0]
    sites = flux_sites(model)
    assert len(sites) == 15  # 2 x 4 per stream + shared V; 4 single; 2 final
    kinds = {s.name: s.kind for s in sites}
    assert kinds["double_blocks.attn_v"] == "heads" and kinds["single_blocks.mlp"] == "rows"
    v = next(s for s in sites if s.name == "double_blocks.attn_v")
    assert len(v.consumers) == 2 and len(v.producers) == 2 and v.segments == (32, 32)


def test_schedule_is_bfl_shifted_schedule():
    t = flux_schedule(4, 4096)
    mu = 1.15  # max_shift at 4096 tokens
    lin = np.linspace(1, 0, 5)
    np.testing.assert_allclose(t[1:-1], np.exp(mu) / (np.exp(mu) + 1 / lin[1:-1] - 1), rtol=1e-12)
    assert t[0] == 1.0 and t[-1] == 0.0
    np.testing.assert_allclose(flux_schedule(4, 4096, shift=False), lin)
    mid = flux_schedule(2, 256)[1]  # base_shift at 256 tokens
    np.testing.assert_allclose(mid, np.exp(0.5) / (np.exp(0.5) + 1))


def test_calibration_batches_follow_the_trajectory(flux):
    model, batches, _, fwd = flux
    assert len(batches) == 2
    np.testing.assert_allclose(np.asarray(batches[0]["timesteps"]), 1.0)
    assert batches[0]["img"].shape == (2, 16, 16) and batches[0]["txt"].shape == (2, 8, 64)
    assert float(batches[1]["timesteps"][0]) == pytest.approx(flux_schedule(2, 16)[1], rel=1e-6)
    # the second input is the first Euler step of the float model
    v = fwd(model, batches[0])
    dt = flux_schedule(2, 16)[1] - 1.0
    np.testing.assert_allclose(
        np.asarray(batches[1]["img"]), np.asarray(batches[0]["img"] + dt * v), rtol=1e-5, atol=1e-5
    )


def test_quantize_flux(flux):
    """The whole FLUX plan with PermuQuant-H (plain PermuQuant is exercised on the generic model)."""
    model, batches, refs, fwd = flux
    q, rep = quantize_flux(nnx.clone(model), batches, method="permuquant-h", hadamard_block=32, progress=False,
                           accept="block", schedule="parallel")  # each site at every layer of a stack at once
    d, s = CFG.depth, CFG.depth_single_blocks
    assert rep.n_sites == 9 * d + 4 * s + 1  # final_layer.norm feeds the 16-bit final projection
    for sr in rep.sites:  # kept only where the block (or, for final_layer.mod, the model) error fell
        dec = sr.decision
        assert dec["level"] == ("model" if sr.site.startswith("final_layer") else "block"), sr.name
        assert not sr.accepted or (dec["choose_best"] < dec["choose_before"]
                                   and dec["heldout_best"] < dec["heldout_before"])
        assert sr.accepted == (sr.chosen != "identity")
    assert isinstance(q.double_blocks.img_attn.qkv, QuantLinear)
    assert isinstance(q.single_blocks.linear2, QuantLinear)
    assert isinstance(q.img_in, Linear) and isinstance(q.final_layer.linear, Linear)
    assert q.double_blocks.img_attn.qkv.w_codes[...].shape[0] == d  # stacked, one weight per block
    out = [np.asarray(fwd(q, b)) for b in batches]
    num = sum(np.sum((o - r) ** 2) for o, r in zip(out, refs, strict=True))
    err = np.sqrt(num / sum(np.sum(r**2) for r in refs))
    assert err < 0.5
    # a fresh float model given the quantized structure and the quantized state is the same model
    fresh = apply_structure(FluxDiT(CFG, rngs=nnx.Rngs(0)), QuantReport.from_json(rep.to_json()))
    nnx.update(fresh, nnx.state(q))
    np.testing.assert_array_equal(np.asarray(fwd(fresh, batches[0])), out[0])
    # the folded permutations are real permutations of the site
    for name, perm in rep.permutations.items():
        p = np.asarray(perm)
        assert np.array_equal(np.sort(p, -1), np.broadcast_to(np.arange(p.shape[-1]), p.shape)), name


def test_text_embeddings_from_npz(flux, tmp_path):
    model = flux[0]
    rng = np.random.default_rng()
    txt, y = rng.standard_normal((3, 5, 64)).astype(np.float32), rng.standard_normal((3, 32)).astype(np.float32)
    np.savez(tmp_path / "emb.npz", txt=txt, y=y)
    # one step: the inputs at t = 1, no model call
    b = flux_calibration_batches(
        model, text=str(tmp_path / "emb.npz"), num_samples=4, num_steps=1, height=32, width=32, batch_size=2
    )
    assert len(b) == 2 and b[0]["txt"].shape == (2, 5, 64)
    np.testing.assert_array_equal(np.asarray(b[1]["txt"]), np.concatenate([txt[2:], txt[:1]]))
    np.savez(tmp_path / "bad.npz", txt=txt)
    with pytest.raises(ValueError, match=r"missing arrays \['y'\]"):
        flux_calibration_batches(model, text=str(tmp_path / "bad.npz"), num_steps=1)


def test_rollout_follows_the_sampled_schedule_and_acceptance_measures_it(flux):
    """`quantize_flux(rollout=k)`: rollouts from the recorded states follow the schedule the batches were
    sampled on (cut at its end), decisions are model-level on the held-out rollouts; bad k fail at the door."""
    from permuquant_jax.quant import RolloutForward
    from permuquant_jax.quant.flux_plan import FLUX_KEEP, flux_rollout_batches

    model, batches, _, _ = flux
    roll = nnx.jit(RolloutForward(None))
    one, two = flux_rollout_batches(batches, 1), flux_rollout_batches(batches, 2)
    # one step from the state at step 0 is the float sampler's state at step 1
    np.testing.assert_allclose(np.asarray(roll(model, one[0]) + one[0]["img"]), np.asarray(batches[1]["img"]),
                               rtol=1e-5, atol=1e-5)
    # from the last step, k = 2 stops at the end of the 2-step schedule (padded: one shape for every batch)
    np.testing.assert_array_equal(np.asarray(two[1]["sigmas"]), np.asarray(flux_schedule(2, 16)[[1, 2, 2]],
                                                                             np.float32))
    keep = (*FLUX_KEEP, "double_blocks.*")  # the single blocks' sites only (CI time)
    q, rep = quantize_flux(nnx.clone(model), batches, rollout=2, alphas=(0.5,), top_k=1, keep_bf16=keep,
                           progress=False)
    assert rep.config["rollout"] == 2 and rep.config["accept"] == "model"
    assert rep.config["choose_batches"] == rep.config["accept_batches"] == 2  # even / odd samples
    decided = [sr for sr in rep.sites if "heldout_before" in sr.decision]
    assert decided and all(sr.decision["level"] == "model" for sr in decided)
    for sr in decided:  # kept only where the held-out rollout error fell
        assert not sr.accepted or sr.decision["heldout_best"] < sr.decision["heldout_before"]
    assert isinstance(q.single_blocks.linear2, QuantLinear)
    for kw, msg in ((dict(rollout=3), r"2-step schedule; use 1 <= rollout <= 2"),
                    (dict(rollout=-1), r"rollout must be an integer >= 0"),
                    (dict(rollout=1, accept="block"), r"needs model-level acceptance"),
                    (dict(rollout=1, forward=RolloutForward(None)), r"rollout sets the forward")):
        with pytest.raises(ValueError, match=msg):
            quantize_flux(nnx.clone(model), batches, progress=False, **kw)
    with pytest.raises(ValueError, match=r"FluxBatches, which records the sampling schedule\); found list"):
        quantize_flux(nnx.clone(model), list(batches), rollout=1, progress=False)
