"""FLUX.1's flow-matching sampler (Black Forest Labs' ``sampling.py``) in JAX, for generation and calibration.

- :func:`get_schedule`: BFL's timesteps, shifted for FLUX.1-dev (mu linear in the image sequence
  length, as diffusers' ``FluxPipeline`` configures ``FlowMatchEulerDiscreteScheduler``), plain for
  schnell; the same numbers as ``quant.flux_plan.flux_schedule``.
- :func:`pack_latents` / :func:`unpack_latents`: NHWC latents <-> the DiT's 2x2-packed tokens, with
  each token's 64 features in BFL's (and diffusers') order (channel, row in patch, column in patch).
- :func:`prepare_img_ids`, :func:`prepare_txt_ids`: the DiT's 3-axis position ids.
- :func:`get_noise`: seeded initial latents (NHWC float32).
- :func:`denoise`: the Euler loop ``img += (t_next - t) * dit(img, ..., t)`` over a schedule, the
  whole loop in ONE jit (``jax.lax.fori_loop``; one compile per resolution, batch, text length and
  step count), latents in float32, for any module with ``FluxDiT``'s call signature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .frozen import frozen_jit

LATENT_CHANNELS = 16
PIXELS_PER_TOKEN = 16  # 8x autoencoder downscale, then 2x2 packing
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096


def get_schedule(
    num_steps: int, image_seq_len: int, *, shift: bool = True, base_shift: float = 0.5, max_shift: float = 1.15
) -> np.ndarray:
    """BFL's sampling timesteps: ``num_steps + 1`` float64 values from 1 down to 0.

    With ``shift`` (FLUX.1-dev) each t becomes ``e^mu / (e^mu + 1/t - 1)``, with mu linear in
    ``image_seq_len`` (the number of image tokens, (H/16)(W/16)): ``base_shift`` at 256 tokens,
    ``max_shift`` at 4096. Without (FLUX.1-schnell): ``linspace(1, 0, num_steps + 1)``.
    """
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"get_schedule: num_steps must be a positive integer, got {num_steps!r}")
    if image_seq_len < 1:
        raise ValueError(f"get_schedule: image_seq_len must be positive, got {image_seq_len}")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    if shift:
        mu = base_shift + (max_shift - base_shift) / (MAX_SEQ_LEN - BASE_SEQ_LEN) * (image_seq_len - BASE_SEQ_LEN)
        inner = t[:-1]  # the last t is 0, which the shift keeps at 0
        t[:-1] = np.exp(mu) / (np.exp(mu) + (1.0 / inner - 1.0))
    return t


def _check_latents(z: jax.Array, what: str) -> None:
    if z.ndim != 4:
        raise ValueError(f"{what}: z must be NHWC latents [batch, h, w, channels], got shape {tuple(z.shape)}")
    if z.shape[1] % 2 or z.shape[2] % 2:
        raise ValueError(
            f"{what}: latent height and width must be even (2x2 packing), got {z.shape[1]}x{z.shape[2]}; "
            f"images must be multiples of {PIXELS_PER_TOKEN} pixels"
        )


def pack_latents(z: jax.Array) -> jax.Array:
    """NHWC latents ``[B, h, w, C]`` -> DiT tokens ``[B, (h/2)(w/2), 4C]``, row-major over the 2x2
    patches, features ordered (channel, patch row, patch column) as BFL's ``prepare``."""
    z = jnp.asarray(z)
    _check_latents(z, "pack_latents")
    b, h, w, c = z.shape
    x = z.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: jax.Array, height: int, width: int) -> jax.Array:
    """DiT tokens ``[B, L, 4C]`` of an image of ``height x width`` pixels -> NHWC latents
    ``[B, 2 ceil(height/16), 2 ceil(width/16), C]`` (the inverse of :func:`pack_latents`)."""
    x = jnp.asarray(x)
    h, w = math.ceil(height / PIXELS_PER_TOKEN), math.ceil(width / PIXELS_PER_TOKEN)
    if x.ndim != 3 or x.shape[1] != h * w or x.shape[2] % 4:
        raise ValueError(
            f"unpack_latents: x must be [batch, {h}*{w} = {h * w} tokens, 4*channels] for a {height}x{width} "
            f"image, got shape {tuple(x.shape)}"
        )
    b, _, f = x.shape
    c = f // 4
    return x.reshape(b, h, w, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c)


def prepare_img_ids(batch: int, h: int, w: int) -> jax.Array:
    """Position ids ``(0, row, col)`` of the packed tokens of NHWC latents with height ``h`` and width
    ``w`` (latent pixels, i.e. image pixels / 8, both even): ``[batch, (h/2)(w/2), 3]`` float32."""
    if h % 2 or w % 2 or h < 2 or w < 2:
        raise ValueError(
            f"prepare_img_ids: h and w are the latents' height and width (image pixels / 8) and must be even, "
            f"got {h}x{w}"
        )
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return jax.device_put(np.broadcast_to(ids.reshape(1, -1, 3), (batch, ids.shape[0] * ids.shape[1], 3)).copy())


def prepare_txt_ids(batch: int, length: int) -> jax.Array:
    """The text tokens' position ids: zeros ``[batch, length, 3]`` float32."""
    return jax.device_put(np.zeros((batch, length, 3), np.float32))


def get_noise(key_or_seed: int | jax.Array, batch: int, height: int, width: int) -> jax.Array:
    """Standard-normal initial latents for ``batch`` images of ``height x width`` pixels:
    ``[batch, 2 ceil(height/16), 2 ceil(width/16), 16]`` float32 (NHWC).

    Sample i is drawn from ``fold_in(key, i)``, so image i of a batch is the same whatever the batch
    size (a seed reproduces its images on any backend JAX's threefry runs on, not torch's generator).
    """
    if batch < 1 or height < 1 or width < 1:
        raise ValueError(f"get_noise: batch, height and width must be positive, got {batch}, {height}x{width}")
    key = jax.random.key(key_or_seed) if isinstance(key_or_seed, int | np.integer) else key_or_seed
    shape = (2 * math.ceil(height / PIXELS_PER_TOKEN), 2 * math.ceil(width / PIXELS_PER_TOKEN), LATENT_CHANNELS)
    return _noise(key, batch, shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noise(key: jax.Array, batch: int, shape: tuple[int, int, int]) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def denoise(
    dit: nnx.Module,
    img: jax.Array,
    img_ids: jax.Array,
    txt: jax.Array,
    txt_ids: jax.Array,
    y: jax.Array,
    timesteps: Sequence[float] | np.ndarray,
    guidance: float | jax.Array | None = None,
) -> jax.Array:
    """BFL's Euler sampler: for each consecutive (t, t_next) of ``timesteps``,
    ``img = img + (t_next - t) * dit(img, img_ids, txt, txt_ids, t, y, guidance)``; returns ``img``.

    ``img`` is the packed latents ``[B, L, 64]`` (kept in float32 between steps, as the DiT's output
    is cast up); ``timesteps`` from :func:`get_schedule` (``num_steps + 1`` values);
    ``guidance`` a scalar or ``[B]`` for guidance-distilled models (dev), None for schnell. The whole
    loop is one jitted ``fori_loop``: one compile per shape set and step count. Any module called as
    ``FluxDiT`` is (e.g. the quantized model from ``permuquant_jax.load``) works; its forward must not
    mutate its variables.
    """
    sched = np.asarray(timesteps, np.float64)
    if sched.ndim != 1 or sched.size < 2:
        raise ValueError(
            f"denoise: timesteps must be a 1-D schedule of num_steps + 1 >= 2 values (get_schedule), got shape "
            f"{sched.shape}"
        )
    img = jnp.asarray(img)
    if img.ndim != 3:
        raise ValueError(f"denoise: img must be packed latents [batch, tokens, channels], got shape {tuple(img.shape)}")
    b = img.shape[0]
    # Times in float32 as the DiT sees them; each step's dt is rounded from the float64 difference
    # (as quant.flux_plan's trajectory sampler does), not taken between float32-rounded times.
    t_curr = jax.device_put(sched[:-1].astype(np.float32))
    dt = jax.device_put(np.diff(sched).astype(np.float32))
    if guidance is not None:
        g = np.asarray(guidance, np.float32)
        if g.ndim == 0:
            g = np.full((b,), g, np.float32)
        if g.shape != (b,):
            raise ValueError(f"denoise: guidance must be a scalar or [{b}], got shape {g.shape}")
        guidance = jax.device_put(g)
    return _denoise_loop(dit, img.astype(jnp.float32), img_ids, txt, txt_ids, y, t_curr, dt, guidance)


@frozen_jit  # reads the DiT only: no second copy of its weights during sampling
def _denoise_loop(dit, img, img_ids, txt, txt_ids, y, t_curr, dt, guidance):
    b = img.shape[0]

    def step(i, x):
        t = jnp.full((b,), t_curr[i], jnp.float32)
        pred = dit(x, img_ids, txt, txt_ids, t, y, guidance)
        return x + dt[i] * pred.astype(jnp.float32)

    return jax.lax.fori_loop(0, t_curr.shape[0], step, img)
