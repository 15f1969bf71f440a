"""The digits DiTs of benchmarks/digits_dit.py: training lowers the loss, is bit-reproducible on the CPU,
and the cached trained weights load, denoise far better than an untrained model, and sample."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import digits_dit as dd  # noqa: E402

TINY = dd.GenericDiTConfig(width=32, depth=1, num_heads=2, mlp_ratio=2, time_dim=32)


@pytest.fixture(scope="module")
def data():
    return dd.digits_data()


def test_digits_data(data):
    x, y = data
    assert x.shape == (1797, dd.IMAGE, dd.IMAGE, 1) and y.shape == (1797,)
    assert x.min() == -1.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))
    # the packing FLUX uses is a bijection
    np.testing.assert_array_equal(np.asarray(dd.unpack(dd.pack(jnp.asarray(x[:3])))), x[:3])


def _eval_loss(model, task, x0, labels, seed=7):
    """The rectified-flow loss at fixed draws, through the task's own call path (no gradient)."""
    x0 = jnp.asarray(x0)
    t, noise = dd.flow_draws(*jax.random.split(jax.random.key(seed)), x0)
    tb = t[:, None, None, None]
    v = task.output(dd.call_model(model, task.record((1 - tb) * x0 + tb * noise, t, jnp.asarray(labels))))
    return float(jnp.mean((v - (noise - x0)) ** 2))


def test_training_lowers_loss_and_is_reproducible(data):
    x, y = data
    x, y = x[:256], y[:256]
    cfg = dd.TrainConfig(steps=12, batch_size=16, lr=3e-3, warmup=2, seed=3)
    runs = []
    for _ in range(2):
        model = dd.GenericDiT(TINY, rngs=nnx.Rngs(0))
        before = _eval_loss(model, dd.TASKS["generic"], x[:64], y[:64])
        losses = dd.train_flow(model, dd.generic_velocity, x, y, cfg, log=None)
        after = _eval_loss(model, dd.TASKS["generic"], x[:64], y[:64])
        runs.append((losses, nnx.to_flat_state(nnx.state(model, nnx.Param)), before, after))
    (l1, s1, before, after), (l2, s2, _, _) = runs
    assert len(l1) == cfg.steps and np.all(np.isfinite(l1))
    assert after < 0.9 * before, (before, after)
    assert l1 == l2  # bit for bit
    for (p1, v1), (p2, v2) in zip(s1, s2, strict=True):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(v1.get_value()), np.asarray(v2.get_value()))


@pytest.mark.parametrize("name", ["flux", "generic"])
def test_cached_weights_load_denoise_and_sample(data, name):
    x, y = data
    task = dd.TASKS[name]
    path = dd.ASSETS / task.file
    assert path.stat().st_size < 2 * 2**20
    trained = task.build()
    meta = dd.load_weights(trained, path)
    assert meta["task"] == name and meta["steps"] > 0
    # the trained weights denoise digits far better than predicting zero velocity (what the zero-initialised
    # output layers of an untrained model do): a wrong or unloaded file fails this
    n = 32
    x0, labels = x[-n:], y[-n:]
    t, noise = dd.flow_draws(*jax.random.split(jax.random.key(7)), jnp.asarray(x0))
    zero_velocity = float(jnp.mean((noise - x0) ** 2))
    assert _eval_loss(trained, task, x0, labels) < 0.5 * zero_velocity
    imgs, batches = dd.euler_sample(trained, task, np.asarray(noise), labels, 3)
    assert imgs.shape == (n, dd.IMAGE, dd.IMAGE, 1) and np.all(np.isfinite(imgs))
    assert rel(imgs, x0) < rel(np.asarray(noise), x0)  # moved from the noise towards the data
    # the recorded batches are the model's call kwargs along the trajectory
    keys = {"img", "img_ids", "txt", "txt_ids", "timesteps", "y"} if name == "flux" else {"x", "t", "y"}
    assert len(batches) == 3 and all(set(b) == keys for b in batches)
    t_key = "timesteps" if name == "flux" else "t"
    np.testing.assert_allclose([b[t_key][0] for b in batches], [1.0, 2 / 3, 1 / 3], rtol=1e-6)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
