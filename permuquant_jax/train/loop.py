"""A small deterministic optax training loop for Flax NNX modules (one jitted step, fixed seeds).

With ``OptimConfig.ema`` > 0 the loop also keeps an exponential moving average of the parameters
(decay ``min(ema, (1 + i) / (10 + i))`` at step ``i``, the usual warm-up) and the model ends with the
averaged weights: a short run's last steps are noisy, their average is not.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

# loss_fn(model, key, data) -> scalar float32 loss; `data` is the pytree of device arrays given to `train`.
LossFn = Callable[[nnx.Module, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``lr * final_lr_frac``, global-norm clipping."""

    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 50
    final_lr_frac: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    ema: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"OptimConfig.steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"OptimConfig.lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"OptimConfig.ema must lie in [0, 1) (0: no averaging), got {self.ema!r}")


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation of ``cfg``."""
    warmup = min(cfg.warmup, max(cfg.steps - 1, 0))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                               cfg.lr * cfg.final_lr_frac)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.adamw(sched, weight_decay=cfg.weight_decay))


@functools.lru_cache(maxsize=8)
def _step_fn(graphdef: Any, loss_fn: LossFn, cfg: OptimConfig):
    """(optax transformation, jitted step) for one model structure, loss and config: a second run with
    the same three reuses the compiled step."""
    tx = optimizer(cfg)
    base = jax.random.PRNGKey(cfg.seed)

    @jax.jit
    def step(params, ema, rest, opt_state, i, data):
        key = jax.random.fold_in(base, i)

        def objective(p):
            return loss_fn(nnx.merge(graphdef, p, rest), key, data).astype(jnp.float32)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if cfg.ema:
            fi = i.astype(jnp.float32)
            d = jnp.minimum(cfg.ema, (1.0 + fi) / (10.0 + fi))
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        return params, ema, opt_state, loss

    return tx, step


def train(
    model: nnx.Module,
    loss_fn: LossFn,
    data: Any,
    cfg: OptimConfig,
    *,
    desc: str = "training",
    progress: bool = True,
    log_every: int = 0,
    log: Callable[[str], None] | None = None,
    max_seconds: float | None = None,
) -> list[float]:
    """Train ``model`` in place for ``cfg.steps`` steps of ``loss_fn``; returns the loss of every step.

    Step ``i`` gets the key ``fold_in(PRNGKey(cfg.seed), i)``, so a run is reproducible bit for bit on
    the same machine. Only ``nnx.Param`` variables are trained. ``max_seconds``: a safety stop (wall
    clock, checked every 50 steps) for runs under a hard time limit; a stopped run returns fewer losses
    than ``cfg.steps`` (the caller records it), with the learning-rate schedule not finished.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, step = _step_fn(graphdef, loss_fn, cfg)
    opt_state = tx.init(params)
    ema = jax.tree.map(jnp.copy, params) if cfg.ema else None

    from tqdm.auto import tqdm

    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, mininterval=2.0)
    pending: list[jax.Array] = []
    for i in bar:
        params, ema, opt_state, loss = step(params, ema, rest, opt_state, jnp.int32(i), data)
        pending.append(loss)
        log_now = log is not None and log_every and ((i + 1) % log_every == 0 or i == cfg.steps - 1)
        if len(pending) >= 50 or i == cfg.steps - 1 or log_now:
            vals = [float(v) for v in jax.device_get(pending)]
            losses.extend(vals)
            pending = []
            bar.set_postfix(loss=f"{np.mean(vals):.4f}")
        if log_now:
            recent = losses[-log_every:]
            log(f"{desc} step {i + 1}/{cfg.steps} loss {np.mean(recent):.5f} ({time.perf_counter() - t0:.0f} s)")
        if max_seconds is not None and not pending and time.perf_counter() - t0 > max_seconds:
            if log is not None:
                log(f"{desc}: stopped at step {i + 1}/{cfg.steps} by the {max_seconds:.0f} s limit")
            break
    bar.close()
    nnx.update(model, ema if cfg.ema else params)
    return losses
