"""The FLUX sampler vs diffusers' FlowMatchEulerDiscreteScheduler / FluxPipeline helpers and quant's sampler."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from permuquant_jax.models import sampling
from permuquant_jax.models.flux import FluxConfig, FluxDiT
from permuquant_jax.models.sampling import (
    denoise,
    get_noise,
    get_schedule,
    pack_latents,
    prepare_img_ids,
    prepare_txt_ids,
    unpack_latents,
)
from permuquant_jax.quant.flux_plan import flux_calibration_batches, flux_forward, flux_schedule

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps  # noqa: E402

# The schedulers of the FLUX.1 pipelines (scheduler/scheduler_config.json of dev and schnell).
DEV_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def diffusers_sigmas(steps: int, seq_len: int, config: dict) -> np.ndarray:
    """The sigmas FluxPipeline.__call__ sets on its scheduler (its own recipe, step by step)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    c = scheduler.config
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    timesteps, n = retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    assert n == steps
    # The transformer is called with timestep / 1000, which must be the sigma itself.
    np.testing.assert_allclose(timesteps.numpy() / 1000, scheduler.sigmas[:-1].numpy(), rtol=1e-6)
    return scheduler.sigmas.numpy().astype(np.float64)


@pytest.mark.parametrize(("steps", "seq_len"), [(28, 4096), (50, 1024), (4, 256), (1, 64), (20, 6400)])
def test_schedule_matches_diffusers_and_quant(steps, seq_len):
    dev = get_schedule(steps, seq_len)
    assert dev.shape == (steps + 1,) and dev[0] == 1.0 and dev[-1] == 0.0
    assert np.all(np.diff(dev) < 0)
    np.testing.assert_allclose(dev, diffusers_sigmas(steps, seq_len, DEV_SCHEDULER), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(dev, flux_schedule(steps, seq_len))
    schnell = get_schedule(steps, seq_len, shift=False)
    np.testing.assert_allclose(schnell, diffusers_sigmas(steps, seq_len, SCHNELL_SCHEDULER), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(schnell, flux_schedule(steps, seq_len, shift=False))
    if steps > 1:  # the shift (mu >= 0.5 here) moves every inner t up
        assert np.all(dev[1:-1] > schnell[1:-1] + 1e-3)


def test_pack_unpack_and_ids_match_diffusers():
    rng = np.random.default_rng(0)
    b, h, w = 2, 6, 10  # latents of a 48 x 80 image
    z = rng.standard_normal((b, h, w, 16)).astype(np.float32)
    ref = FluxPipeline._pack_latents(torch.from_numpy(z.transpose(0, 3, 1, 2)), b, 16, h, w).numpy()
    packed = pack_latents(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(packed), ref)
    back = FluxPipeline._unpack_latents(torch.from_numpy(ref), 48, 80, 8).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 48, 80)), back)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, 48, 80)), z)
    ids = prepare_img_ids(b, h, w)
    ref_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32).numpy()
    assert ids.shape == (b, 15, 3) and ids.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), np.broadcast_to(ref_ids, (b, 15, 3)))
    np.testing.assert_array_equal(np.asarray(prepare_txt_ids(b, 7)), np.zeros((b, 7, 3), np.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(jnp.zeros((1, 5, 4, 16)))
    with pytest.raises(ValueError, match="even"):
        prepare_img_ids(1, 5, 4)
    with pytest.raises(ValueError, match="tokens"):
        unpack_latents(packed, 64, 80)


def test_noise_is_seeded_per_sample():
    a = get_noise(7, 3, 64, 48)
    assert a.shape == (3, 8, 6, 16) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(get_noise(7, 1, 64, 48)), np.asarray(a[:1]))
    assert not np.allclose(np.asarray(a[0]), np.asarray(a[1]))
    assert not np.allclose(np.asarray(get_noise(8, 1, 64, 48)), np.asarray(a[:1]))
    std = float(np.asarray(a).std())
    assert 0.9 < std < 1.1


class CountingDiT(FluxDiT):
    """A FluxDiT that counts how often its forward is traced (once per compile of the loop)."""

    traces = 0

    def __call__(self, *args, **kwargs):
        type(self).traces += 1
        return super().__call__(*args, **kwargs)


@pytest.fixture(scope="module")
def dit():
    """A small FLUX DiT with random weights placed from the host (eager init compiles per shape)."""
    cfg = dataclasses.replace(FluxConfig.tiny(), context_in_dim=32, vec_in_dim=32, depth=1, depth_single_blocks=1)
    model = nnx.eval_shape(lambda: CountingDiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        elif path[-1] == "scale":
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        var.set_value(jax.device_put(value.astype(np.float32)))
    return model


def test_denoise_one_jit_and_equal_to_quant_trajectory(dit):
    """The whole loop runs under one jit (the DiT is traced once for any number of calls at the
    same shapes), and follows the same trajectory as quant.flux_plan's calibration sampler."""
    steps, height, width, txt_len = 4, 32, 48, 8
    batches = flux_calibration_batches(
        dit, num_samples=2, num_steps=steps, height=height, width=width, txt_len=txt_len, guidance=3.5,
        seed=3, batch_size=2,
    )
    first, last = batches[0], batches[-1]  # DiT inputs at steps 0 and steps - 1
    sched = get_schedule(steps, (height // 16) * (width // 16))
    np.testing.assert_allclose(np.asarray(last["timesteps"]), sched[steps - 1], rtol=1e-7)
    CountingDiT.traces = 0
    args = (first["img"], first["img_ids"], first["txt"], first["txt_ids"], first["y"])
    out = denoise(dit, *args, sched[:steps], guidance=3.5)  # steps - 1 Euler steps
    assert CountingDiT.traces == 1
    np.testing.assert_allclose(np.asarray(out), np.asarray(last["img"]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(out), np.asarray(first["img"]), atol=1e-3)
    # Other values at the same shapes and step count: no new trace (one compile for the loop).
    noise = first["img"][::-1]
    again = denoise(dit, noise, *args[1:], sched[1 : steps + 1] ** 2, guidance=jnp.array([2.0, 4.0]))
    assert CountingDiT.traces == 1
    assert np.all(np.isfinite(np.asarray(again))) and again.dtype == jnp.float32
    # Its last step, redone by hand from a shorter run, is the Euler update of the DiT's output.
    short = denoise(dit, noise, *args[1:], sched[1:steps] ** 2, guidance=jnp.array([2.0, 4.0]))
    t = jnp.full((2,), sched[steps - 1] ** 2, jnp.float32)
    batch = dict(first, img=short, timesteps=t, guidance=jnp.array([2.0, 4.0], jnp.float32))
    v = flux_forward(dit, batch)  # compiled for these shapes by flux_calibration_batches
    dt = np.float32(sched[steps] ** 2 - sched[steps - 1] ** 2)
    np.testing.assert_allclose(np.asarray(again), np.asarray(short + dt * v), rtol=1e-5, atol=1e-5)
    assert CountingDiT.traces == 2  # the shorter schedule: one more trace, not one per step


def test_denoise_rejects_bad_inputs(dit):
    img = jnp.zeros((1, 6, 64))
    with pytest.raises(ValueError, match="num_steps"):
        denoise(dit, img, prepare_img_ids(1, 4, 6), jnp.zeros((1, 8, 32)), prepare_txt_ids(1, 8),
                jnp.zeros((1, 32)), [1.0], guidance=3.5)
    with pytest.raises(ValueError, match="guidance"):
        denoise(dit, img, prepare_img_ids(1, 4, 6), jnp.zeros((1, 8, 32)), prepare_txt_ids(1, 8),
                jnp.zeros((1, 32)), get_schedule(2, 6), guidance=np.ones(3))
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        get_schedule(0, 256)
    assert sampling.LATENT_CHANNELS == 16
