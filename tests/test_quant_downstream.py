"""Downstream (block / model) acceptance, validated on held-out samples; auto; refinement; adaln sites;
the library's input handling (keep warnings, generators, splits, skipped modules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from permuquant_jax.formats.registry import get_format
from permuquant_jax.quant import quantize_model
from permuquant_jax.quant.batches import materialize, split_batches, split_samples
from permuquant_jax.quant.downstream import SiteTrial, block_errors, decide, find_blocks, propose_swap
from permuquant_jax.quant.fold import GatheredNorm, fold_permutation, fold_smoothing
from permuquant_jax.quant.paths import find_linears, skipped_modules, warn_unmatched_keep
from permuquant_jax.quant.sites import AdaLNRef, Ref, Site

D = 64  # 4 NVFP4 groups


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class Toy(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(D, 16, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _batches(seed: int, n: int = 4, rows: int = 32) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    col = np.exp(np.random.default_rng(7).normal(size=D) * 1.5).astype(np.float32)  # outlier channels
    return [jnp.asarray(rng.normal(size=(rows, D)).astype(np.float32) * col) for _ in range(n)]


_call = nnx.jit(lambda m, b: m(b))


def _fwd_err(q, f, batches) -> float:
    num = den = 0.0
    for b in batches:
        r = np.asarray(_call(f, b), np.float64)
        d = np.asarray(_call(q, b), np.float64) - r
        num, den = num + float(np.sum(d * d)), den + float(np.sum(r * r))
    return num / den


@pytest.fixture(scope="module")
def auto_run():
    model = Toy(nnx.Rngs(0))
    batches = _batches(0)
    q, rep = quantize_model(nnx.clone(model), batches, method="auto", accept="block", refine=3, top_k=2,
                            hadamard_block=16, act_scale="dynamic")
    return model, batches, q, rep


def test_blocks_are_detected(auto_run):
    model = auto_run[0]
    got = find_blocks(model, list(find_linears(model)))
    assert got[("blocks", 0, "fc1")] == ("blocks", 0) and got[("blocks", 1, "fc2")] == ("blocks", 1)
    assert got[("head",)] is None


def test_accepted_only_what_lowers_the_heldout_downstream_error(auto_run):
    _, _, _, rep = auto_run
    decided = [s for s in rep.sites if "choose_before" in s.decision]
    assert decided, "no downstream decision was taken"
    for s in rep.sites:
        d = s.decision
        assert d["level"] in ("block", "model")
        if s.accepted:
            assert d["heldout_best"] < d["heldout_before"], s.name
            assert d["choose_best"] < d["choose_before"], s.name
        else:
            assert s.chosen == "identity", s.name
    for path, h in rep.config["downstream"]["hadamard"].items():
        if h["kept"]:
            assert h["heldout_after"] < h["heldout_before"], path
    assert rep.config["choose_batches"] == rep.config["accept_batches"] == 4  # even / odd samples of each batch
    # the guard: the held-out model error never ends above RTN's (the starting state) by more than its tolerance
    g = rep.config["downstream"]["guard"]
    assert g["tolerance"] == 0.01 and g["final_model_error"] <= (1 + g["tolerance"]) * g["start_model_error"]
    undone = {(name, tuple(layer)) for name, layer in g["sites_undone"]}
    for s in rep.sites:
        if (s.site, s.layer) in undone or g["all_undone"]:
            assert not s.accepted and s.chosen == "identity", s.name


def test_trial_measures_what_the_quantized_model_computes(auto_run):
    """With dynamic activation scales the deployed model's output error equals the trial's estimate."""
    model, batches, q, rep = auto_run
    est = rep.config["downstream"]["model_error_fake_quant"]
    halves = [h for pair in zip(*split_samples(batches), strict=True) for h in pair]
    real = _fwd_err(q, model, halves)
    assert abs(real - est) / est < 0.02, (real, est)
    # the public per-block error: each quantized block on the float model's input to it
    got = block_errors(model, q, batches[:2])
    assert set(got) == {"blocks.0", "blocks.1"}
    num, den = np.zeros(2), np.zeros(2)
    for x in batches[:2]:
        for i in range(2):
            r = np.asarray(_call(model.blocks[i], x), np.float64)
            d = np.asarray(_call(q.blocks[i], x), np.float64) - r
            num[i], den[i], x = num[i] + np.sum(d * d), den[i] + np.sum(r * r), jnp.asarray(r, jnp.float32)
    np.testing.assert_allclose([got["blocks.0"], got["blocks.1"]], num / den, rtol=1e-3)
    assert got["blocks.1"] > 0


def test_auto_picks_the_argmin(auto_run):
    _, _, _, rep = auto_run
    for s in rep.sites:
        d = s.decision
        if not d.get("tried"):
            continue
        best = min(d["tried"], key=lambda t: t["choose"])
        if d.get("refine", {}).get("kept"):
            assert s.chosen.startswith(f"refined({best['label']}") or not s.accepted
            assert d["choose_best"] < best["choose"]
        else:
            assert d["best"] == best["label"] and d["choose_best"] == best["choose"]
            assert s.chosen == (best["label"] if s.accepted else "identity")


def test_refinement_never_raises_the_measured_error_and_is_deterministic(auto_run):
    model, batches, _, rep = auto_run
    refined = [s for s in rep.sites if s.decision.get("refine")]
    assert refined, "refinement never ran"
    for s in refined:
        r = s.decision["refine"]
        start = min(t["choose"] for t in s.decision["tried"])
        assert s.decision["choose_best"] <= start
        assert s.decision["choose_best"] == pytest.approx(min([start] + r["errors"]))
    _, rep2 = quantize_model(nnx.clone(model), batches, method="auto", accept="block", refine=3, top_k=2,
                             hadamard_block=16, act_scale="dynamic")

    def decisions(r):
        return [(s.name, s.chosen, {k: v for k, v in s.decision.items() if k != "seconds"}) for s in r.sites]

    assert decisions(rep2) == decisions(rep)
    assert rep2.permutations == rep.permutations


def test_propose_swap_stays_in_segments():
    rng = np.random.default_rng(0)
    perm = np.arange(64, dtype=np.int32)
    score = rng.normal(size=64)
    for step in range(6):
        p = propose_swap(perm, score, 16, (32, 32), step)
        moved = np.nonzero(p != perm)[0]
        assert len(moved) == 2 and moved[0] // 32 == moved[1] // 32
        assert sorted(p.tolist()) == list(range(64))


class TwoReaders(nnx.Module):
    """One channel space read by `a` (whose output barely reaches the block output) and `b`."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.b = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + 1e-3 * self.a(x) + self.b(x)


class OneBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([TwoReaders(rngs)])

    def __call__(self, x):
        return self.blocks[0](x)


def _rel(fq, x, w):  # relative squared error of x @ w with both operands fake-quantized (NVFP4)
    y = x @ w
    yq = fq(x) @ fq(w.T).T
    return jnp.sum((yq - y) ** 2) / jnp.sum(y**2)


def test_a_layer_gain_that_raises_the_block_error_is_rejected():
    model = OneBlock(nnx.Rngs(3))
    x = _batches(1, n=2)
    fq = get_format("nvfp4").weight_fake_quant
    xs = jnp.concatenate(x)
    wa, wb = model.blocks[0].a.kernel[...], model.blocks[0].b.kernel[...]

    @jax.jit
    def _errors(p):
        la, lb = _rel(fq, xs[:, p], wa[p]), _rel(fq, xs[:, p], wb[p])
        ref = xs + 1e-3 * (xs @ wa) + xs @ wb
        out = xs + 1e-3 * (fq(xs[:, p]) @ fq(wa[p].T).T) + fq(xs[:, p]) @ fq(wb[p].T).T
        return la + lb, jnp.sum((out - ref) ** 2) / jnp.sum(ref**2)

    def errors(p):
        lay, blk = _errors(jnp.asarray(p))
        return float(lay), float(blk)

    ident = np.arange(D)
    l0, b0 = errors(ident)
    rng = np.random.default_rng(0)
    bad = good = None
    for _ in range(200):
        p = rng.permutation(D).astype(np.int32)
        lp, bp = errors(p)
        if bad is None and lp < l0 and bp > b0 * 1.001:
            bad = (p, lp)
        if good is None and bp < b0 * 0.999:
            good = (p, lp)
        if bad is not None and good is not None:
            break
    assert bad is not None and good is not None

    site = Site("x", "gather", D, consumers=(Ref(("blocks", 0, "a")), Ref(("blocks", 0, "b"))))
    targets = [("blocks", 0, "a"), ("blocks", 0, "b")]
    for (p, lp), want in ((bad, False), (good, True)):
        perms = np.stack([ident, p]).astype(np.int32)
        trial = SiteTrial(0, "x", [["identity", "cand"]], perms, None, np.array([l0, lp]),
                          np.array([False, False]))
        out = decide(
            model, targets=targets, parts_of={t: [(0, 0, D)] for t in targets}, trials={0: trial},
            format="nvfp4", hadamard={t: ((0,), 0) for t in targets}, choose_hadamard=False, level="block",
            top_k=1, tau=0.0, blocks=None, forward=lambda m, b: m(b), choose_batches=x, held_batches=x,
            all_batches=x,
        )
        info = out["info"][(0, ())]
        assert info["accepted"] is want, (info, site)
        assert out["chosen"][0][()] == (1 if want else 0)
    assert isinstance(model.blocks[0], TwoReaders)  # probes and trials removed again


class AdaLN(nnx.Module):
    """LayerNorm (with or without affine) modulated by separate shift / scale linears, then a consumer."""

    def __init__(self, affine: bool, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(D, use_bias=affine, use_scale=affine, rngs=rngs)
        self.shift = nnx.Linear(8, D, rngs=rngs)
        self.scale = nnx.Linear(8, D, rngs=rngs)
        self.proj = nnx.Linear(D, 32, rngs=rngs)

    def __call__(self, x, c):
        return self.proj(self.norm(x) * (1 + self.scale(c)) + self.shift(c))


@pytest.mark.parametrize("affine", [False, True])
def test_adaln_site_folds_invariantly(affine):
    m = AdaLN(affine, nnx.Rngs(1))
    if affine:
        m.norm.scale.set_value(jnp.asarray(np.random.default_rng(2).uniform(0.5, 2, D), jnp.float32))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5, D)).astype(np.float32))
    c = jnp.asarray(rng.normal(size=(4, 1, 8)).astype(np.float32))
    call = nnx.jit(lambda m, x, c: m(x, c))
    ref = np.asarray(call(m, x, c))
    site = Site("n", "adaln", D, consumers=(Ref("proj"),), adaln=AdaLNRef("norm", "shift", "scale"), scalable=True)
    fold_permutation(m, site, rng.permutation(D).astype(np.int32))
    assert isinstance(m.norm, GatheredNorm) and not isinstance(m.proj, GatheredNorm)
    fold_smoothing(m, site, rng.uniform(0.5, 2.0, D).astype(np.float32))
    fold_permutation(m, site, rng.permutation(D).astype(np.int32))
    np.testing.assert_allclose(np.asarray(call(m, x, c)), ref, rtol=2e-5, atol=2e-5)


def test_keep_pattern_that_matches_nothing_warns_with_closest_paths():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.mlp = nnx.Sequential(nnx.Linear(16, 16, rngs=rngs), jax.nn.gelu, nnx.Linear(16, 16, rngs=rngs))

    linears = find_linears(nnx.eval_shape(lambda: M(nnx.Rngs(0))))
    with pytest.warns(UserWarning, match=r"'mlp\.0' matches no linear.*closest module paths: mlp\.layers\.0") as rec:
        bad = warn_unmatched_keep(["mlp.0", "mlp.layers.2", "mpl.*"], linears)
    assert bad == ["mlp.0", "mpl.*"]
    assert "closest module paths: mlp" in str(rec[-1].message)
    with pytest.raises(ValueError, match=r"'re:\(\(' is not a valid regular expression"):
        warn_unmatched_keep(["re:(("], linears)


def test_batches_lists_factories_generators_and_splits():
    notes: list[str] = []
    assert materialize(lambda: iter([1, 2]), notes) == [1, 2] and not notes
    assert materialize((i for i in range(3)), notes) == [0, 1, 2] and "generator" in notes[0]
    with pytest.raises(ValueError, match="no calibration batches"):
        materialize(iter([]))
    ch, held = split_batches(list("aabbcc"), groups=list("xxyyzz"))
    assert (ch, held) == ([0, 1, 4, 5], [2, 3])  # groups never cut
    assert split_batches([1, 2]) == ([0], [1])


def test_convolutions_are_listed_as_skipped():
    class WithConv(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 16, kernel_size=(3, 3), rngs=rngs)
            self.fc = nnx.Linear(16, 16, rngs=rngs)

    assert skipped_modules(nnx.eval_shape(lambda: WithConv(nnx.Rngs(0)))) == {"conv": "Conv"}


def test_fast_measurement_quantizer_matches_nvfp4():
    from permuquant_jax.formats import nvfp4
    from permuquant_jax.quant.permute import nvfp4_fake_quant_fast

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 32, 64)) * np.exp(rng.normal(size=64) * 2)).astype(np.float32)
    x[0] *= 1e-4
    x[1, :, :16] = 0.0  # zero blocks
    ref, fast = jax.jit(nvfp4.fake_quant), jax.jit(nvfp4_fake_quant_fast)  # one compilation each
    for xi in x:
        a = np.asarray(ref(jnp.asarray(xi)))
        b = np.asarray(fast(jnp.asarray(xi)))
        assert np.mean(a != b) < 1e-3
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())


class Velocity(nnx.Module):
    """A toy sampler model `(img, timesteps, y) -> velocity`: one linear in a list (a block), conditioned on y."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(D, D, rngs=rngs)])

    def __call__(self, img, timesteps, y):
        return self.layers[0](img) * (1.0 - timesteps)[:, None, None] + y[:, None, :]


def test_rollout_forward_is_the_guided_euler_sampler_and_carries_observers():
    from permuquant_jax.quant import RolloutForward, calibrate, rollout_batches

    model = Velocity(nnx.Rngs(5))
    rng = np.random.default_rng(2)
    n, tokens, k, scale = 3, 5, 3, 2.5
    sig = np.linspace(1.0, 0.0, 7)
    x0 = rng.normal(size=(n, tokens, D)).astype(np.float32)
    y = rng.normal(size=(2 * n, D)).astype(np.float32)  # [cond; uncond]
    (batch,) = rollout_batches({2: jnp.asarray(x0)}, sig, [2], k, y=jnp.asarray(y))
    got = np.asarray(nnx.jit(RolloutForward(scale))(model, batch))
    w, b = (np.asarray(a, np.float64) for a in (model.layers[0].kernel[...], model.layers[0].bias[...]))
    x = x0.astype(np.float64)
    for i in range(2, 2 + k):  # the sampler by hand: doubled batch, guided velocity, Euler step
        pred = (np.concatenate([x, x]) @ w + b) * (1.0 - np.float32(sig[i])) + y[:, None, :]
        x = x + (np.float32(sig[i + 1]) - np.float32(sig[i])) * (pred[n:] + scale * (pred[:n] - pred[n:]))
    np.testing.assert_allclose(got, x - x0, rtol=2e-4, atol=2e-5)
    # observers inside the scanned steps keep what every step wrote: k steps of 2n x tokens rows each
    stats = calibrate(model, [batch], [("layers", 0)], forward=RolloutForward(scale), progress=False)
    assert int(stats[("layers", 0)].count) == k * 2 * n * tokens
    with pytest.raises(ValueError, match="runs past the schedule"):
        rollout_batches({5: x0}, sig, [5], k)


def test_static_scales_of_every_method_come_from_the_same_pass():
    """act_amax='quantized': RTN's static activation scales are the quantized model's input amax over the
    calibration batches, the measure model-level acceptance ends with (equal when it keeps nothing)."""
    model = Toy(nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    b, held = _batches(int(np.random.default_rng().integers(1 << 30))), _batches(5, n=2)

    def scales(**kw):
        _, rep = quantize_model(nnx.clone(model), b, accept_batches=held, progress=False, **kw)
        return rep, {k: np.asarray(v["act_global_scale"]) for k, v in rep.layers.items()}

    rep_q, quant_rtn = scales(method="rtn", act_amax="quantized")
    rep_m, model_pq = scales(method="permuquant", accept="model", tau=1e9, guard=None, top_k=1, alphas=(0.5,))
    assert (rep_q.config["act_amax"], rep_m.config["act_amax"]) == ("quantized", "quantized")
    assert rep_m.n_accepted == 0
    for k in quant_rtn:
        np.testing.assert_allclose(quant_rtn[k], model_pq[k], rtol=1e-6)
    with pytest.raises(ValueError, match=r"act_amax='float' cannot be used with accept='model'"):
        quantize_model(nnx.clone(model), b, method="permuquant", accept="model", act_amax="float", progress=False)
