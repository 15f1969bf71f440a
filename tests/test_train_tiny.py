"""The training side of the tiny pipeline: captioned scenes, writers in BFL layouts, the rectified-flow loop."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from permuquant_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig
from permuquant_jax.models.flux import FluxConfig, FluxDiT
from permuquant_jax.train import data as D
from permuquant_jax.train.flow import FlowConfig, flow_loss
from permuquant_jax.train.loop import OptimConfig, train

# ------------------------------------------------------------------------------------------ scenes


def test_scenes_are_deterministic_and_seeded():
    a, ca, _ = D.make_dataset(12, seed=5, size=32)
    b, cb, _ = D.make_dataset(12, seed=5, size=32)
    c, cc, _ = D.make_dataset(12, seed=6, size=32)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c)
    # Scene i does not depend on what was drawn before it.
    tail, ct, _ = D.make_dataset(4, seed=5, size=32, start=8)
    assert np.array_equal(tail, a[8:]) and ct == ca[8:]
    assert a.dtype == np.uint8 and a.shape == (12, 32, 32, 3)


_REL = re.compile(r"^a (\w+) (\w+) (above|below|to the left of|to the right of) a (\w+) (\w+)$")
_ONE = re.compile(r"^a (?:(small|big) )?(\w+) (\w+)$")
_COUNT = re.compile(r"^(two|three) (\w+) (\w+)s$")


@pytest.mark.parametrize("size", [32, 64])
def test_captions_match_the_pictures(size):
    images, captions, scenes = D.make_dataset(60, seed=int(np.random.default_rng().integers(1 << 30)), size=size)
    bg = np.asarray(D.BACKGROUND)
    kinds = set()
    for img, cap, sc in zip(images, captions, scenes, strict=True):
        # Every shape's centre pixel has its colour, exactly (the pixel is fully covered).
        for s in sc.shapes:
            assert np.array_equal(img[int(s.y), int(s.x)], D.COLOURS[s.colour]), (cap, s)
        # The caption names the shapes, in order, and their layout.
        if m := _REL.match(cap):
            kinds.add("relation")
            c1, s1, rel, c2, s2 = m.groups()
            a, b = sc.shapes
            assert (a.colour, a.kind, b.colour, b.kind) == (c1, s1, c2, s2)
            dx, dy = b.x - a.x, b.y - a.y
            expect = {"above": dy > 0, "below": dy < 0, "to the left of": dx > 0, "to the right of": dx < 0}[rel]
            assert expect and (abs(dy) > abs(dx) if rel in ("above", "below") else abs(dx) > abs(dy)), (cap, sc)
        elif m := _COUNT.match(cap):
            kinds.add("count")
            n, colour, kind = m.groups()
            assert len(sc.shapes) == {"two": 2, "three": 3}[n]
            assert all((s.colour, s.kind) == (colour, kind) for s in sc.shapes)
        else:
            m = _ONE.match(cap)
            assert m, cap
            kinds.add("one")
            (s,) = sc.shapes
            assert (s.colour, s.kind) == m.groups()[1:]
        # Colours not named are nowhere; the corners far from all shapes are background.
        named = {s.colour for s in sc.shapes}
        for name, rgb in D.COLOURS.items():
            present = np.all(img == np.asarray(rgb), axis=-1).any()
            assert present == (name in named), (cap, name)
        far = [(y, x) for y in (0, size - 1) for x in (0, size - 1)
               if all(np.hypot(s.x - x - 0.5, s.y - y - 0.5) > s.r * 1.5 + 1 for s in sc.shapes)]
        for y, x in far:
            assert np.array_equal(img[y, x], bg)
    assert kinds == {"one", "count", "relation"}
    assert set(captions) <= set(D.all_captions())


def test_shape_masks():
    xs, ys = np.meshgrid(np.arange(-10, 11, 0.5), np.arange(-10, 11, 0.5))
    for kind in D.SHAPES:
        m = D.shape_mask(D.Shape(kind, "red", 0.0, 0.0, 6.0), xs, ys)
        assert m[ys == 0][xs[ys == 0] == 0].all() and not m[(np.abs(xs) > 6.1) | (np.abs(ys) > 6.1)].any()
    tri = D.shape_mask(D.Shape("triangle", "red", 0.0, 0.0, 6.0), xs, ys)
    assert tri[(ys == -5) & (xs == 0)] and not tri[(ys == -5) & (xs == 3)]  # narrow at the top
    assert tri[(ys == 4) & (xs == 5)]  # wide at the bottom
    with pytest.raises(ValueError, match="multiple of 16"):
        D.make_scene(0, 0, size=40)


def test_calibration_prompts_are_shipped_training_captions_never_evaluated():
    from permuquant_jax.assets.make_tiny_pipeline import CALIBRATION_FILE
    from permuquant_jax.generate.pipeline import calibration_prompts_path, embedded_transformer_path, read_prompts
    from permuquant_jax.train import tiny

    shipped = calibration_prompts_path(embedded_transformer_path())
    assert shipped is not None and shipped.name == CALIBRATION_FILE == tiny.CALIBRATION_FILE
    assert shipped.read_text() == D.calibration_prompts_text(), "regenerate it with train.data.calibration_prompts_text"
    prompts = read_prompts(shipped)
    assert len(prompts) == len(set(prompts)) == 64 and set(prompts) <= set(D.all_captions())
    assert not set(prompts) & (set(D.EVAL_SINGLE) | set(D.EVAL_OTHER))
    kinds = {"relation" if _REL.match(c) else "count" if _COUNT.match(c) else "one" for c in prompts}
    assert kinds == {"relation", "count", "one"}
    assert D.calibration_captions(8, seed=1) != D.calibration_captions(8, seed=2)


# ------------------------------------------------------------------------------------------ writers


def test_dit_written_in_bfl_layout_loads_back(tmp_path):
    from permuquant_jax.convert import load_flux, read_flux_config
    from permuquant_jax.train.export import save_dit

    cfg = dataclasses.replace(FluxConfig.tiny(), hidden_size=64, num_heads=1, axes_dim=(16, 24, 24), depth=1,
                              depth_single_blocks=2, context_in_dim=48, vec_in_dim=32, guidance_embed=False)
    model = FluxDiT(cfg, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    path = save_dit(model, tmp_path / "dit.safetensors", store="fp32", extra={"trained": {"max_seq_len": 8}})
    assert read_flux_config(path) == cfg
    # a trained DiT calibrates on the prompts beside it, else on the embedded pipeline's; other models on none
    from permuquant_jax.convert import default_checkpoint_path
    from permuquant_jax.generate.pipeline import calibration_prompts_path, embedded_pipeline_dir

    assert calibration_prompts_path(path) == embedded_pipeline_dir() / "calibration_prompts.txt"
    (tmp_path / "calibration_prompts.txt").write_text("a red circle above a blue square\n")
    assert calibration_prompts_path(path) == tmp_path / "calibration_prompts.txt"
    assert calibration_prompts_path(default_checkpoint_path()) is None and calibration_prompts_path(None) is None
    back = load_flux(path, dtype=jnp.float32)
    ours, theirs = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(back, nnx.Param))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (p, a), (_, b) in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p


def test_autoencoder_written_in_bfl_layout_loads_back(tmp_path):
    from permuquant_jax.convert.ae import load_autoencoder
    from permuquant_jax.train.export import save_autoencoder

    model = AutoEncoder(AutoEncoderConfig.tiny(), rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    # Non-zero biases, so a bias written to the wrong key would show.
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = np.asarray(var.get_value())
        var.set_value(jnp.asarray(v + np.random.default_rng().standard_normal(v.shape).astype(np.float32) * 0.01))
    path = save_autoencoder(model, tmp_path / "ae.safetensors", store="fp32")
    back = load_autoencoder(path, dtype=jnp.float32)
    ours, theirs = nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(back, nnx.Param))
    assert len(ours) == len(theirs)
    for (p, a), (q, b) in zip(ours, theirs, strict=True):
        assert p == q and np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p
    with pytest.raises(ValueError, match="scale"):
        save_autoencoder(AutoEncoder(dataclasses.replace(AutoEncoderConfig.tiny(), scale_factor=0.5),
                                     rngs=nnx.Rngs(0)), tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------ training

_TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=16, hidden_size=32,
                   mlp_ratio=2.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=(8, 12, 12),
                   guidance_embed=False)
_FLOW = FlowConfig(batch_size=8, drop_text=0.25)


def _tiny_loss(model, key, data):
    return flow_loss(model, key, data, _FLOW, (4, 4))


@pytest.fixture(scope="module")
def flow_data():
    rng = np.random.default_rng(0)
    # Two "captions", each with its own latent pattern: learnable in a few steps.
    patterns = rng.standard_normal((2, 4, 64)).astype(np.float32)
    ids = rng.integers(0, 2, 32).astype(np.int32)
    latents = patterns[ids] + 0.05 * rng.standard_normal((32, 4, 64)).astype(np.float32)
    txt = rng.standard_normal((3, 6, 16)).astype(np.float32)
    y = rng.standard_normal((3, 16)).astype(np.float32)
    return dict(latents=jnp.asarray(latents), caption_ids=jnp.asarray(ids), txt=jnp.asarray(txt),
                y=jnp.asarray(y), empty=jnp.int32(2))


def _run(flow_data, steps=25):
    model = FluxDiT(_TINY, rngs=nnx.Rngs(3))
    losses = train(model, _tiny_loss, flow_data, OptimConfig(steps=steps, lr=3e-3, warmup=5, seed=1), progress=False)
    return model, losses


def test_short_training_lowers_the_loss_and_is_reproducible(flow_data):
    m1, l1 = _run(flow_data)
    m2, l2 = _run(flow_data)  # the same compiled step, from the same seeds
    assert len(l1) == 25 and all(np.isfinite(l1))
    assert np.mean(l1[-8:]) < 0.7 * np.mean(l1[:8]), (l1[:8], l1[-8:])
    assert l1 == l2
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(m1, nnx.Param)),
                              nnx.to_flat_state(nnx.state(m2, nnx.Param)), strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p


def test_flow_loss_is_the_velocity_mse(flow_data):
    # With the DiT replaced by the exact velocity, the loss is zero; with zeros, it is E|noise - x0|^2.
    key = jax.random.PRNGKey(7)

    class Oracle(nnx.Module):
        def __init__(self, exact: bool):
            self.config, self.exact = _TINY, exact

        def __call__(self, xt, img_ids, txt, txt_ids, t, y, guidance=None):
            k_idx, _, k_noise, _ = jax.random.split(key, 4)
            idx = jax.random.randint(k_idx, (_FLOW.batch_size,), 0, flow_data["latents"].shape[0])
            x0 = flow_data["latents"][idx]
            noise = jax.random.normal(k_noise, x0.shape)
            assert np.allclose(xt, (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, atol=1e-6)
            assert np.all((t > 0) & (t < 1))
            return noise - x0 if self.exact else jnp.zeros_like(x0)

    assert float(flow_loss(Oracle(True), key, flow_data, _FLOW, (4, 4))) == 0.0
    assert float(flow_loss(Oracle(False), key, flow_data, _FLOW, (4, 4))) > 0.5
