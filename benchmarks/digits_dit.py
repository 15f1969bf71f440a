"""Two small diffusion transformers trained on scikit-learn's digits, for measuring quantization on real weights.

    python benchmarks/digits_dit.py            # load the cached weights, write a sample grid
    python benchmarks/digits_dit.py --train    # retrain both (CPU, a few minutes each), cache, write grids

Data: `sklearn.datasets.load_digits` (1797 handwritten digits, 8x8, 17 grey levels), bilinearly upsampled
to 16x16 and scaled to [-1, 1]. No download: the data ships with scikit-learn.

Models (both class-conditional, trained with FLUX's rectified-flow objective: x_t = (1 - t) x0 + t noise,
the network predicts the velocity noise - x0, t drawn logit-normal (sigmoid of a standard normal); optax
AdamW; every random draw from fixed seeds, so a rerun on the CPU gives the same weights bit for bit):

- `flux`: the project's FLUX.1 architecture (`permuquant_jax.models.flux.FluxDiT`) at a small width, see
  `flux_digits_config()` (0.47M parameters). Pixel space: the 16x16 image is cut into 4x4-pixel patches,
  16 image tokens of 16 channels (as FLUX packs 2x2 patches of a 4-channel 8x8 "latent"). The class
  reaches the DiT through FLUX's own inputs: a fixed random "T5-like" token sequence per class (`txt`,
  8 tokens of 64 channels) and a fixed random "CLIP-like" pooled vector (`y`, 64 channels); no guidance
  embedder (as FLUX.1-schnell). Sampler: 20 Euler steps on BFL's linear schedule.
- `generic`: a DiT of the common research layout in plain Flax NNX (`GenericDiT`, 0.26M parameters): a
  convolutional patch embedding (4x4 patches), fixed 2-D sin-cos positions, blocks of LayerNorm without
  affine followed by SEPARATE shift / scale / gate linears (adaLN-Zero), multi-head attention and an
  `nnx.Sequential` MLP, a class embedding table, 50-step Euler sampling. 3 blocks of width 64: the
  configuration of the report in issue 11.

Weights are cached under `benchmarks/assets/` (safetensors, float16 storage, float32 compute); the
loaders return `(model, calib_batches, heldout_batches, sample_fn)`: batches are lists of the model's
call kwargs along the float model's own sampling trajectories, split by trajectory (calibration and
held-out trajectories differ in noise seed and class order), and `sample_fn(model)` runs the full sampler
from the held-out noise (or given labels / seed / steps) and returns images `[B, 16, 16, 1]` in [-1, 1].
The training code (`train_flow`) is generic: a model, a velocity function and data in, losses out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from permuquant_jax.models.flux import FluxConfig, FluxDiT

ASSETS = Path(__file__).resolve().parent / "assets"
IMAGE = 16  # side in pixels after upsampling
PATCH = 4  # pixels per token side: a 2x2 space-to-depth "latent" (4 channels) packed 2x2 as FLUX packs latents
NUM_CLASSES = 10
TXT_LEN = 8
TXT_DIM = 64
VEC_DIM = 64
COND_SEED = 1234  # the fixed random per-class conditioning tables
CALIB_SEED, HELDOUT_SEED = 0, 1

Batch = dict[str, Any]
Velocity = Callable[[nnx.Module, jax.Array, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------- data


def digits_data(size: int = IMAGE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits as float32 images `[N, size, size, 1]` in [-1, 1] and int32 labels `[N]`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # 0..16 grey levels -> [0, 1]
    if size != 8:
        x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], size, size), "linear"))
    x = np.clip(x, 0.0, 1.0) * 2.0 - 1.0
    return x[..., None].astype(np.float32), d.target.astype(np.int32)


def conditioning_tables(seed: int = COND_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random per-class text tokens `[10, TXT_LEN, TXT_DIM]` and pooled vectors `[10, VEC_DIM]`."""
    rng = np.random.default_rng(seed)
    txt = rng.standard_normal((NUM_CLASSES, TXT_LEN, TXT_DIM)).astype(np.float32)
    vec = rng.standard_normal((NUM_CLASSES, VEC_DIM)).astype(np.float32)
    return txt, vec


def pack(x: jax.Array) -> jax.Array:
    """Images `[B, H, W, C]` -> FLUX tokens `[B, (H/2)(W/2), C*4]` (channel-major within a patch, as BFL)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: jax.Array, h: int = IMAGE, w: int = IMAGE) -> jax.Array:
    """The inverse of `pack`."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, h // PATCH, w // PATCH, c, PATCH, PATCH)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)


def img_ids(batch: int, h: int = IMAGE // PATCH, w: int = IMAGE // PATCH) -> np.ndarray:
    """FLUX position ids (0, row, col) of the image tokens, `[batch, h*w, 3]`."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return np.broadcast_to(ids.reshape(1, h * w, 3), (batch, h * w, 3)).copy()


# ---------------------------------------------------------------------------------------------- models


def flux_digits_config() -> FluxConfig:
    """The FLUX architecture at width 64 (2 heads of 32, RoPE axes 8/12/12), MLP 256, 2 double + 2 single
    blocks, 16-channel pixel tokens, 64-channel text tokens and pooled vector, no guidance embedder.

    Every quantized linear reads 64, 256 or 320 channels: multiples of the 64-wide groups and Hadamard
    blocks of the benchmark's formats. Sized to train in minutes on two shared CPU cores."""
    return FluxConfig(
        in_channels=PATCH * PATCH, out_channels=PATCH * PATCH, vec_in_dim=VEC_DIM, context_in_dim=TXT_DIM,
        hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12),
        guidance_embed=False,
    )


@dataclasses.dataclass(frozen=True)
class GenericDiTConfig:
    """The common research DiT layout (see `GenericDiT`)."""

    width: int = 64
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: int = 4
    patch: int = PATCH
    image: int = IMAGE
    channels: int = 1
    num_classes: int = NUM_CLASSES
    time_dim: int = 256

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"GenericDiTConfig: width {self.width} must be divisible by num_heads {self.num_heads}")
        if self.image % self.patch:
            raise ValueError(f"GenericDiTConfig: image {self.image} must be divisible by patch {self.patch}")
        if self.width % 4:
            raise ValueError(f"GenericDiTConfig: width {self.width} must be a multiple of 4 (2-D sin-cos positions)")


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, side: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table `[side*side, dim]` (half the channels per axis, as DiT/MAE)."""
    gy, gx = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, gy), _sincos_1d(dim // 2, gx)], axis=1).astype(np.float32)


def _timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
    args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _zeros_linear(i: int, o: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(i, o, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention: fused qkv linear, softmax attention, output projection."""

    def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
        o = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        return self.proj(o.reshape(b, n, d))


class DiTBlock(nnx.Module):
    """adaLN-Zero block with separate shift / scale / gate linears on the conditioning vector."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs)
        self.shift1 = _zeros_linear(width, width, rngs)
        self.scale1 = _zeros_linear(width, width, rngs)
        self.gate1 = _zeros_linear(width, width, rngs)
        self.attn = Attention(width, num_heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs)
        self.shift2 = _zeros_linear(width, width, rngs)
        self.scale2 = _zeros_linear(width, width, rngs)
        self.gate2 = _zeros_linear(width, width, rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(width, mlp_ratio * width, rngs=rngs),
            lambda h: jax.nn.gelu(h, approximate=True),
            nnx.Linear(mlp_ratio * width, width, rngs=rngs),
        )

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        c = jax.nn.silu(c)[:, None, :]
        h = self.norm1(x) * (1 + self.scale1(c)) + self.shift1(c)
        x = x + self.gate1(c) * self.attn(h)
        h = self.norm2(x) * (1 + self.scale2(c)) + self.shift2(c)
        return x + self.gate2(c) * self.mlp(h)


class GenericDiT(nnx.Module):
    """A class-conditional DiT of the common research layout: `model(x, t, y) -> velocity`.

    x `[B, H, W, C]` images, t `[B]` in [0, 1], y `[B]` int class labels; returns `[B, H, W, C]`.
    """

    def __init__(self, config: GenericDiTConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        p, w = cfg.patch, cfg.width
        self.patch_embed = nnx.Conv(cfg.channels, w, kernel_size=(p, p), strides=(p, p), padding="VALID", rngs=rngs)
        self.pos = nnx.Variable(jnp.asarray(sincos_2d(w, cfg.image // p)))
        self.t_embed = nnx.Sequential(
            nnx.Linear(cfg.time_dim, w, rngs=rngs), jax.nn.silu, nnx.Linear(w, w, rngs=rngs)
        )
        self.y_embed = nnx.Embed(cfg.num_classes, w, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(w, cfg.num_heads, cfg.mlp_ratio, rngs=rngs) for _ in range(cfg.depth)])
        self.norm_final = nnx.LayerNorm(w, epsilon=1e-6, use_bias=False, use_scale=False, rngs=rngs)
        self.shift_final = _zeros_linear(w, w, rngs)
        self.scale_final = _zeros_linear(w, w, rngs)
        self.out = _zeros_linear(w, p * p * cfg.channels, rngs)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        cfg = self.config
        b, hh, ww, ch = x.shape
        if (hh, ww, ch) != (cfg.image, cfg.image, cfg.channels):
            raise ValueError(
                f"GenericDiT: x must be (batch, {cfg.image}, {cfg.image}, {cfg.channels}), got shape {x.shape}"
            )
        p = cfg.patch
        h = self.patch_embed(x).reshape(b, -1, cfg.width) + self.pos[...][None]
        c = self.t_embed(_timestep_embedding(t, cfg.time_dim)) + self.y_embed(y)
        for block in self.blocks:
            h = block(h, c)
        cs = jax.nn.silu(c)[:, None, :]
        h = self.norm_final(h) * (1 + self.scale_final(cs)) + self.shift_final(cs)
        h = self.out(h)  # [B, tokens, p*p*C]
        s = cfg.image // p
        return h.reshape(b, s, s, p, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, cfg.image, cfg.image, ch)


# ---------------------------------------------------------------------------------------------- calling


def flux_velocity(model: FluxDiT, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    """The FLUX DiT's velocity for images `[B, 16, 16, 1]` at times t `[B]` given class labels `[B]`."""
    return unpack(model(**flux_inputs(x, t, labels)))


def flux_inputs(x: jax.Array, t: jax.Array, labels: jax.Array) -> Batch:
    """FluxDiT call kwargs (img, img_ids, txt, txt_ids, timesteps, y) for images, times and labels."""
    txt_table, vec_table = conditioning_tables()
    labels = jnp.asarray(labels)
    b = x.shape[0]
    return dict(
        img=pack(x),
        img_ids=jnp.asarray(img_ids(b)),
        txt=jnp.asarray(txt_table)[labels],
        txt_ids=jnp.zeros((b, TXT_LEN, 3), jnp.float32),
        timesteps=jnp.asarray(t, jnp.float32),
        y=jnp.asarray(vec_table)[labels],
    )


def generic_velocity(model: GenericDiT, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    return model(x, t, labels)


# ---------------------------------------------------------------------------------------------- training


def flow_draws(k_t: jax.Array, k_noise: jax.Array, x0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The random part of a rectified-flow step: t = sigmoid(N(0, 1)) (logit-normal) `[B]`, noise like x0."""
    return jax.nn.sigmoid(jax.random.normal(k_t, (x0.shape[0],))), jax.random.normal(k_noise, x0.shape)


def flow_loss(
    model: nnx.Module, velocity: Velocity, x0: jax.Array, labels: jax.Array, t: jax.Array, noise: jax.Array
) -> jax.Array:
    """FLUX's rectified-flow loss: x_t = (1 - t) x0 + t noise; mean squared error of
    `velocity(model, x_t, t, labels)` against the velocity noise - x0 (images `[B, H, W, C]`)."""
    tb = t[:, None, None, None]
    xt = (1.0 - tb) * x0 + tb * noise
    v = velocity(model, xt, t, labels)
    return jnp.mean((v.astype(jnp.float32) - (noise - x0)) ** 2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Rectified-flow training settings."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(sched, weight_decay=cfg.weight_decay))


@functools.partial(jax.jit, static_argnames=("graphdef", "velocity", "cfg"))
def _train_step(params, rest, opt_state, key, data_x, data_y, *, graphdef, velocity: Velocity, cfg: TrainConfig):
    """One AdamW step on a random batch (module level: one compilation per model structure and config)."""
    k_idx, k_t, k_noise = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, data_x.shape[0])
    x0, y = data_x[idx], data_y[idx]
    t, noise = flow_draws(k_t, k_noise, x0)

    def loss_fn(p):
        return flow_loss(nnx.merge(graphdef, p, rest), velocity, x0, y, t, noise)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_flow(
    model: nnx.Module, velocity: Velocity, images: np.ndarray, labels: np.ndarray, cfg: TrainConfig,
    *, log_every: int = 100, log: Callable[[str], None] | None = print,
) -> list[float]:
    """Train `model` in place with FLUX's rectified-flow objective; returns the loss of every step.

    Each step draws a batch of (image, label) pairs uniformly, t = sigmoid(N(0, 1)) (logit-normal) and
    noise; x_t = (1 - t) x0 + t noise; loss = mean squared error of `velocity(model, x_t, t, labels)`
    against noise - x0. AdamW with linear warm-up and cosine decay, gradient clipping. Deterministic:
    every draw comes from `cfg.seed`.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = _optimizer(cfg).init(params)
    data_x, data_y = jnp.asarray(images), jnp.asarray(labels)
    step = functools.partial(_train_step, graphdef=graphdef, velocity=velocity, cfg=cfg)

    keys = jax.random.split(jax.random.key(cfg.seed), cfg.steps)
    losses = []
    t0 = time.time()
    for i in range(cfg.steps):
        params, opt_state, loss = step(params, rest, opt_state, keys[i], data_x, data_y)
        losses.append(float(loss))
        if log and ((i + 1) % log_every == 0 or i == 0):
            recent = losses[-log_every:]
            log(f"  step {i + 1:5d}  loss {np.mean(recent):.4f}  ({time.time() - t0:.0f} s)")
    nnx.update(model, params)
    return losses


# ---------------------------------------------------------------------------------------------- sampling


def euler_sample(
    model: nnx.Module, task: Task, noise: np.ndarray, labels: np.ndarray, num_steps: int
) -> tuple[np.ndarray, list[Batch]]:
    """Euler from t=1 (noise) to t=0 on the linear schedule; returns (final images, the call kwargs of
    every step: the model's inputs along its own trajectory, i.e. calibration batches)."""
    ts = np.linspace(1.0, 0.0, num_steps + 1).astype(np.float32)
    x = jnp.asarray(noise, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    batches = []
    for i in range(num_steps):
        batch = task.record(x, jnp.full((x.shape[0],), ts[i], jnp.float32), y)
        batches.append(batch)
        v = task.output(call_model(model, batch))
        x = x + float(ts[i + 1] - ts[i]) * v.astype(jnp.float32)
    return np.asarray(x), batches


@nnx.jit
def call_model(model: nnx.Module, batch: Batch) -> jax.Array:
    """`model(**batch)`, jitted (one compilation per model structure and batch shape, shared by callers)."""
    return model(**batch)


def _noise(seed: int, n: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, IMAGE, IMAGE, 1)), np.float32)


def split_labels(n: int, heldout: bool) -> np.ndarray:
    """Class labels of the calibration (0, 1, ..., 9, 0, ...) or held-out (a different order) trajectories."""
    base = np.arange(n) % NUM_CLASSES
    return ((base * 3 + 7) % NUM_CLASSES if heldout else base).astype(np.int32)


# ---------------------------------------------------------------------------------------------- caching


def save_weights(model: nnx.Module, path: Path, meta: dict[str, Any]) -> None:
    """The model's parameters as float16 safetensors (keys: dotted module paths), with `meta` in the header."""
    from safetensors.numpy import save_file

    tensors = {
        ".".join(map(str, p)): np.asarray(v.get_value(), np.float16)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})


def load_weights(model: nnx.Module, path: Path) -> dict[str, Any]:
    """Fill `model`'s parameters from `save_weights`' file (float32); returns the stored metadata."""
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python benchmarks/digits_dit.py --train` to make it")
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    with safe_open(str(path), "numpy") as f:
        keys = set(f.keys())
        want = {".".join(map(str, p)) for p, _ in flat}
        if keys != want:
            raise ValueError(
                f"{path}: stored tensors do not match the model (missing {sorted(want - keys)[:3]}, "
                f"unexpected {sorted(keys - want)[:3]}); retrain with --train"
            )
        for p, v in flat:
            arr = f.get_tensor(".".join(map(str, p)))
            if arr.shape != tuple(v.get_value().shape):
                raise ValueError(
                    f"{path}: {'.'.join(map(str, p))} has shape {arr.shape}, the model {v.get_value().shape}; "
                    "retrain with --train"
                )
            v.set_value(jnp.asarray(arr.astype(np.float32)))
        meta = json.loads(f.metadata().get("meta", "{}"))
    nnx.update(model, state)
    return meta


# ---------------------------------------------------------------------------------------------- the two tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """One of the two trained models: how to build, call, train and sample it."""

    name: str
    build: Callable[[], nnx.Module]
    velocity: Velocity
    record: Callable[[jax.Array, jax.Array, jax.Array], Batch]  # (x, t, labels) -> call kwargs (numpy)
    output: Callable[[jax.Array], jax.Array]  # the model's output -> velocity image [B, H, W, C]
    train: TrainConfig
    num_steps: int
    file: str


def _flux_record(x, t, y) -> Batch:
    return {k: np.asarray(v) for k, v in flux_inputs(x, t, y).items()}


def _generic_record(x, t, y) -> Batch:
    return dict(x=np.asarray(x), t=np.asarray(t), y=np.asarray(y))


TASKS = {
    "flux": Task(
        "flux", lambda: FluxDiT(flux_digits_config(), rngs=nnx.Rngs(0)), flux_velocity, _flux_record, unpack,
        TrainConfig(steps=1000, batch_size=32, lr=2e-3), 20, "flux_digits.safetensors",
    ),
    "generic": Task(
        "generic", lambda: GenericDiT(GenericDiTConfig(), rngs=nnx.Rngs(0)), generic_velocity, _generic_record,
        lambda v: v,
        TrainConfig(steps=1500, batch_size=32, lr=2e-3), 50, "generic_dit_digits.safetensors",
    ),
}


def _load(task: Task, num_calib: int, num_heldout: int, num_steps: int | None, path: Path | None):
    model = task.build()
    load_weights(model, path or ASSETS / task.file)
    steps = num_steps or task.num_steps

    def sample_fn(m: nnx.Module, labels: np.ndarray | None = None, seed: int = HELDOUT_SEED,
                  num_steps: int | None = None) -> np.ndarray:
        """The full sampler from `seed`'s noise for `labels` (default: the held-out trajectories)."""
        labels = split_labels(num_heldout, True) if labels is None else np.asarray(labels, np.int32)
        out, _ = euler_sample(m, task, _noise(seed, len(labels)), labels, num_steps or steps)
        return out

    _, calib = euler_sample(model, task, _noise(CALIB_SEED, num_calib), split_labels(num_calib, False), steps)
    _, held = euler_sample(model, task, _noise(HELDOUT_SEED, num_heldout), split_labels(num_heldout, True), steps)
    return model, calib, held, sample_fn


def load_flux_digits(
    num_calib: int = 10, num_heldout: int = 10, num_steps: int | None = None, path: Path | None = None
) -> tuple[FluxDiT, list[Batch], list[Batch], Callable[..., np.ndarray]]:
    """The trained FLUX-architecture digits DiT (float32) with calibration and held-out batches and its sampler.

    Batches: `FluxDiT` call kwargs at every step of `num_calib` (resp. `num_heldout`) Euler trajectories of
    the float model (20 steps by default); calibration and held-out trajectories use different noise seeds
    and class orders. `sample_fn(model, labels=None, seed=HELDOUT_SEED, num_steps=None)` -> images.
    """
    return _load(TASKS["flux"], num_calib, num_heldout, num_steps, path)


def load_generic_digits(
    num_calib: int = 10, num_heldout: int = 10, num_steps: int | None = None, path: Path | None = None
) -> tuple[GenericDiT, list[Batch], list[Batch], Callable[..., np.ndarray]]:
    """The trained generic research-layout DiT (3 blocks, width 64; 50 Euler steps), as `load_flux_digits`."""
    return _load(TASKS["generic"], num_calib, num_heldout, num_steps, path)


def write_grid(images: np.ndarray, path: Path, cols: int = 10, scale: int = 4) -> None:
    """A PNG grid of images `[N, H, W, 1]` in [-1, 1]."""
    from PIL import Image

    x = np.clip((np.asarray(images)[..., 0] + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w = x.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + 1), cols * (w + 1)), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = x[i]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def train_task(task: Task, steps: int | None = None) -> tuple[nnx.Module, list[float], float]:
    """Train one task's model from its seed; returns (model, losses, seconds)."""
    images, labels = digits_data()
    cfg = task.train if steps is None else dataclasses.replace(task.train, steps=steps)
    model = task.build()
    t0 = time.time()
    losses = train_flow(model, task.velocity, images, labels, cfg)
    return model, losses, time.time() - t0


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true", help="retrain and overwrite the cached weights")
    ap.add_argument("--models", default="flux,generic", help="comma-separated: flux, generic")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: each task's)")
    ap.add_argument("--out", default=str(ASSETS), help="where the weights, loss curves and grids go")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        task = TASKS[name]
        if args.train:
            print(f"training {name} ({task.train})", flush=True)
            model, losses, secs = train_task(task, args.steps)
            meta = dict(task=name, steps=len(losses), train=dataclasses.asdict(task.train), seconds=round(secs, 1),
                        final_loss=float(np.mean(losses[-100:])), jax=jax.__version__)
            save_weights(model, out / task.file, meta)
            with open(out / f"{Path(task.file).stem}_loss.json", "w") as f:
                json.dump(dict(meta=meta, loss=[round(v, 5) for v in losses]), f)
            print(f"{name}: {len(losses)} steps in {secs:.0f} s, final loss {meta['final_loss']:.4f}", flush=True)
        model = task.build()
        load_weights(model, out / task.file)
        labels = np.tile(np.arange(NUM_CLASSES), 4)
        imgs, _ = euler_sample(model, task, _noise(HELDOUT_SEED, len(labels)), labels, task.num_steps)
        write_grid(imgs, out / f"{Path(task.file).stem}_samples.png")
        print(f"{name}: samples -> {out / (Path(task.file).stem + '_samples.png')}", flush=True)


if __name__ == "__main__":
    main()
