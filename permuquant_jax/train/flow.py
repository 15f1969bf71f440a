"""Training a FLUX DiT (``models/flux.py``) with FLUX's rectified-flow objective on autoencoder latents.

``x_t = (1 - t) x0 + t noise`` with ``t = sigmoid(N(0, 1))`` (logit-normal, as FLUX / SD3 train), the
DiT predicts the velocity ``noise - x0`` (BFL's sampler integrates ``x += (t_next - t) v`` from t = 1 to
0), mean squared error. The text reaches the DiT through FLUX's own inputs: the T5 token embeddings
(``txt``) and the CLIP pooled vector (``y``) of each caption, computed once by the fixed encoders.
A fraction ``drop_text`` of the captions is replaced by the empty prompt's embeddings (so the model
also learns the unconditional velocity, which classifier-free guidance would need).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.flux import FluxConfig, FluxDiT
from permuquant_jax.models.sampling import denoise, get_schedule, prepare_img_ids, prepare_txt_ids
from permuquant_jax.train.loop import OptimConfig, train


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Rectified-flow batch settings."""

    batch_size: int = 64
    drop_text: float = 0.1
    guidance: float = 1.0  # the value fed to a guidance embedder, if the DiT has one (not distilled)


@dataclasses.dataclass
class FlowData:
    """Training data: packed latents ``[N, seq, 64]``, caption index per latent ``[N]``, text embeddings
    per caption ``txt [C, L, T5 width]`` and ``y [C, CLIP width]``; caption ``empty`` is the empty prompt."""

    latents: np.ndarray
    caption_ids: np.ndarray
    txt: np.ndarray
    y: np.ndarray
    empty: int
    latent_hw: tuple[int, int]


def flow_loss(model: FluxDiT, key: jax.Array, data: dict, cfg: FlowConfig, latent_hw: tuple[int, int]) -> jax.Array:
    """One batch of FLUX's rectified-flow loss (velocity target, logit-normal t) drawn with ``key``."""
    k_idx, k_t, k_noise, k_drop = jax.random.split(key, 4)
    b = cfg.batch_size
    idx = jax.random.randint(k_idx, (b,), 0, data["latents"].shape[0])
    x0 = data["latents"][idx]
    cap = data["caption_ids"][idx]
    cap = jnp.where(jax.random.uniform(k_drop, (b,)) < cfg.drop_text, data["empty"], cap)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
    noise = jax.random.normal(k_noise, x0.shape)
    xt = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
    txt, y = data["txt"][cap], data["y"][cap]
    guidance = jnp.full((b,), cfg.guidance, jnp.float32) if model.config.guidance_embed else None
    v = model(xt, prepare_img_ids(b, *latent_hw), txt, prepare_txt_ids(b, txt.shape[1]), t, y, guidance=guidance)
    return jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2)


def train_dit(
    data: FlowData,
    config: FluxConfig,
    optim: OptimConfig,
    flow: FlowConfig = FlowConfig(),
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    log_every: int = 0,
    max_seconds: float | None = None,
) -> tuple[FluxDiT, list[float]]:
    """Train a float32 :class:`FluxDiT` of ``config`` on ``data``; returns it and the per-step losses."""
    if data.latents.shape[-1] != config.in_channels:
        raise ValueError(f"train_dit: latents have {data.latents.shape[-1]} channels but the DiT's in_channels is "
                         f"{config.in_channels}")
    if data.txt.shape[-1] != config.context_in_dim or data.y.shape[-1] != config.vec_in_dim:
        raise ValueError(f"train_dit: text widths {data.txt.shape[-1]} / {data.y.shape[-1]} differ from the DiT's "
                         f"context_in_dim {config.context_in_dim} / vec_in_dim {config.vec_in_dim}")
    model = FluxDiT(config, rngs=nnx.Rngs(optim.seed))
    arrays = jax.device_put(dict(latents=data.latents.astype(np.float32), caption_ids=data.caption_ids.astype(np.int32),
                                 txt=data.txt.astype(np.float32), y=data.y.astype(np.float32),
                                 empty=np.int32(data.empty)))

    def loss_fn(m: FluxDiT, key: jax.Array, d: dict) -> jax.Array:
        return flow_loss(m, key, d, flow, data.latent_hw)

    losses = train(model, loss_fn, arrays, optim, desc="dit", progress=progress, log=log, log_every=log_every,
                   max_seconds=max_seconds)
    return model, losses


def sample_latents(model: FluxDiT, txt: np.ndarray, y: np.ndarray, noise_nhwc: jax.Array, *, steps: int,
                   shift: bool, guidance: float = 1.0) -> jax.Array:
    """BFL's Euler sampler (``models.sampling.denoise``) from NHWC noise; returns packed latents."""
    from permuquant_jax.models.sampling import pack_latents

    b, h, w = noise_nhwc.shape[:3]
    img = pack_latents(jnp.asarray(noise_nhwc, jnp.float32))
    sched = get_schedule(steps, img.shape[1], shift=shift)
    g = jnp.full((b,), guidance, jnp.float32) if model.config.guidance_embed else None
    return denoise(model, img, prepare_img_ids(b, h, w), jnp.asarray(txt), prepare_txt_ids(b, txt.shape[1]),
                   jnp.asarray(y), sched, guidance=g)
