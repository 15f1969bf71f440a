"""Training FLUX's autoencoder architecture (``models/autoencoder.py``) at a small width on scene images.

The loss, on images ``x`` in [-1, 1]:

- reconstruction: ``|x - x'| + (x - x')^2`` (mean), where ``x' = decode(s + noise_std * eps)`` and
  ``s = encode(x)`` are the scaled latents the DiT will see (``scale * (mode - shift)`` with FLUX's
  0.3611 / 0.1159, the constants the loaders assume for a BFL ``ae.safetensors``). The latent noise
  makes the decoder tolerant of the DiT's small errors (a fixed-variance stand-in for a VAE's
  posterior; the encoder's log-variance channels are not used, as FLUX's ``encode`` returns the mode);
- latent moments: ``latent_weight * mean_c[(mean(s_c))^2 + (var(s_c) - 1)^2]`` over the batch, so the
  scaled latents have about zero mean and unit variance per channel, the scale rectified flow expects
  from its unit Gaussian noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.autoencoder import AutoEncoder, AutoEncoderConfig
from permuquant_jax.train.loop import OptimConfig, train


@dataclasses.dataclass(frozen=True)
class AELossConfig:
    """Weights of the autoencoder loss (see the module docstring)."""

    batch_size: int = 32
    noise_std: float = 0.1
    latent_weight: float = 0.01


def ae_loss(model: AutoEncoder, x: jax.Array, eps: jax.Array, cfg: AELossConfig) -> jax.Array:
    """The autoencoder loss on images ``x`` ``[B, H, W, 3]`` with latent noise ``eps`` (like the latents)."""
    s = model.encode(x)
    rec = model.decode(s + cfg.noise_std * eps).astype(jnp.float32)
    err = rec - x
    recon = jnp.mean(jnp.abs(err)) + jnp.mean(err * err)
    flat = s.reshape(-1, s.shape[-1])
    moments = jnp.mean(jnp.mean(flat, axis=0) ** 2 + (jnp.var(flat, axis=0) - 1.0) ** 2)
    return recon + cfg.latent_weight * moments


def train_autoencoder(
    images: np.ndarray,
    config: AutoEncoderConfig,
    optim: OptimConfig,
    loss_cfg: AELossConfig = AELossConfig(),
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    log_every: int = 0,
    max_seconds: float | None = None,
) -> tuple[AutoEncoder, list[float]]:
    """Train an :class:`AutoEncoder` of ``config`` (float32) on uint8 or [-1, 1] float ``images`` ``[N, H, W, 3]``.

    Batches are drawn uniformly from ``images`` with the step's key; the model's initial weights come
    from ``optim.seed``. Returns the trained model and the per-step losses.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"train_autoencoder: images must be [N, H, W, 3], got shape {images.shape}")
    x = images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)
    model = AutoEncoder(config, rngs=nnx.Rngs(optim.seed))
    h, w, z = x.shape[1] // config.downscale, x.shape[2] // config.downscale, config.z_channels

    def loss_fn(m: AutoEncoder, key: jax.Array, data: jax.Array) -> jax.Array:
        k_idx, k_eps = jax.random.split(key)
        idx = jax.random.randint(k_idx, (loss_cfg.batch_size,), 0, data.shape[0])
        eps = jax.random.normal(k_eps, (loss_cfg.batch_size, h, w, z))
        return ae_loss(m, data[idx], eps, loss_cfg)

    losses = train(model, loss_fn, jax.device_put(x), optim, desc="autoencoder", progress=progress, log=log,
                   log_every=log_every, max_seconds=max_seconds)
    return model, losses


@nnx.jit
def encode_images(model: AutoEncoder, x: jax.Array) -> jax.Array:
    """Scaled latents of images in [-1, 1] (jitted ``model.encode``)."""
    return model.encode(x)


@nnx.jit
def decode_latents(model: AutoEncoder, z: jax.Array) -> jax.Array:
    """Images in [-1, 1] of scaled latents (jitted ``model.decode``, clipped)."""
    return jnp.clip(model.decode(z).astype(jnp.float32), -1.0, 1.0)


def encode_all(model: AutoEncoder, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Scaled latents ``[N, H/8, W/8, 16]`` float32 of uint8 ``images`` ``[N, H, W, 3]``, in batches."""
    out = []
    for i in range(0, images.shape[0], batch):
        chunk = images[i : i + batch]
        pad = batch - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        z = encode_images(model, jnp.asarray(chunk.astype(np.float32) / 127.5 - 1.0))
        out.append(np.asarray(z)[: batch - pad])
    return np.concatenate(out)
