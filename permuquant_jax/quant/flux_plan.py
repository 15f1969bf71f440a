"""The FLUX.1 site plan, calibration batches along the sampling schedule, and `quantize_flux`.

Sites of a stacked `DoubleStreamBlock` (per stream s in img, txt; one permutation per block):
- `s_norm1` (norm): LayerNorm+modulation -> `s_attn.qkv`; modulation rows shift1 [0, H), scale1 [H, 2H);
- `s_norm2` (norm): -> `s_mlp.fc1`; rows shift2 [3H, 4H), scale2 [4H, 5H);
- `s_mlp` (rows): `s_mlp.fc1` output rows -> GELU -> `s_mlp.fc2` input;
- `attn_v` (heads): the V rows [2H, 3H) of img and txt `qkv` -> img and txt `proj`, one permutation
  shared by both streams (the joint attention mixes their tokens), within each head;
- `s_mod` (gather): the modulation linear's input silu(vec).
Sites of a stacked `SingleStreamBlock`: `norm` (-> linear1; shift [0, H), scale [H, 2H) of
`modulation.lin`), `attn_v` (heads: linear1 rows [2H, 3H) -> linear2 columns [0, H)), `mlp` (rows:
linear1 rows [3H, 3H+M) -> GELU -> linear2 columns [H, H+M)), `mod` (gather).
The last layer: `final_mod` (gather on `adaLN_modulation`), `final_norm` (norm -> `linear`, used only
when the final projection is quantized). The embedders stay in 16 bits by default (`FLUX_KEEP`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from permuquant_jax.models.frozen import frozen_jit
from permuquant_jax.quant.permute import DEFAULT_ALPHAS
from permuquant_jax.quant.report import QuantReport
from permuquant_jax.quant.sites import NormRef, Ref, Site

# Embeddings in and out and the final projection stay in 16 bits, as in SVDQuant.
FLUX_KEEP: tuple[str, ...] = (
    "img_in", "txt_in", "time_in.*", "vector_in.*", "guidance_in.*", "final_layer.linear",
)


def flux_sites(model: nnx.Module) -> list[Site]:
    """The complete PermuQuant site plan of a `FluxDiT` (see the module docstring)."""
    cfg = model.config
    h, m, hd, nh = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim, cfg.num_heads
    heads = (hd,) * nh
    db, sb = "double_blocks", "single_blocks"
    sites: list[Site] = []
    for s in ("img", "txt"):
        mod = (db, f"{s}_mod", "lin")
        sites += [
            Site(f"{db}.{s}_mod", "gather", h, consumers=(Ref(mod),)),
            Site(f"{db}.{s}_norm1", "norm", h, consumers=(Ref((db, f"{s}_attn", "qkv")),),
                 norm=NormRef((db, f"{s}_norm1", "perm"), mod, 0, h), scalable=True),
            Site(f"{db}.{s}_norm2", "norm", h, consumers=(Ref((db, f"{s}_mlp", "fc1")),),
                 norm=NormRef((db, f"{s}_norm2", "perm"), mod, 3 * h, 4 * h), scalable=True),
            Site(f"{db}.{s}_mlp", "rows", m, consumers=(Ref((db, f"{s}_mlp", "fc2")),),
                 producers=(Ref((db, f"{s}_mlp", "fc1")),)),
        ]
    sites.append(Site(
        f"{db}.attn_v", "heads", h,
        consumers=(Ref((db, "img_attn", "proj")), Ref((db, "txt_attn", "proj"))),
        producers=(Ref((db, "img_attn", "qkv"), 2 * h), Ref((db, "txt_attn", "qkv"), 2 * h)),
        segments=heads, scalable=True,
    ))
    smod = (sb, "modulation", "lin")
    sites += [
        Site(f"{sb}.mod", "gather", h, consumers=(Ref(smod),)),
        Site(f"{sb}.norm", "norm", h, consumers=(Ref((sb, "linear1")),),
             norm=NormRef((sb, "pre_norm", "perm"), smod, 0, h), scalable=True),
        Site(f"{sb}.attn_v", "heads", h, consumers=(Ref((sb, "linear2"), 0),),
             producers=(Ref((sb, "linear1"), 2 * h),), segments=heads, scalable=True),
        Site(f"{sb}.mlp", "rows", m, consumers=(Ref((sb, "linear2"), h),),
             producers=(Ref((sb, "linear1"), 3 * h),)),
        Site("final_layer.mod", "gather", h, consumers=(Ref(("final_layer", "adaLN_modulation")),)),
        Site("final_layer.norm", "norm", h, consumers=(Ref(("final_layer", "linear")),),
             norm=NormRef(("final_layer", "norm_final", "perm"), ("final_layer", "adaLN_modulation"), 0, h),
             scalable=True),
    ]
    return sites


# --------------------------------------------------------------------------- calibration data


def flux_schedule(num_steps: int, image_seq_len: int, *, shift: bool = True, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> np.ndarray:
    """BFL's sampling timesteps (num_steps + 1 values from 1 to 0).

    With `shift` (FLUX.1-dev), t -> e^mu / (e^mu + 1/t - 1) with mu linear in the image sequence length
    (base_shift at 256 tokens, max_shift at 4096 tokens); FLUX.1-schnell uses the plain linear schedule.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, found {num_steps}")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    if shift:
        slope = (max_shift - base_shift) / (4096 - 256)
        mu = base_shift + slope * (image_seq_len - 256)
        with np.errstate(divide="ignore"):
            t = np.where(t > 0, np.exp(mu) / (np.exp(mu) + (1.0 / np.maximum(t, 1e-30) - 1.0)), 0.0)
    return t.astype(np.float64)


def img_position_ids(batch: int, h: int, w: int) -> np.ndarray:
    """Position ids (0, row, col) of packed latents, `[batch, h*w, 3]` float32."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return np.broadcast_to(ids.reshape(1, h * w, 3), (batch, h * w, 3)).copy()


def load_text_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed text conditioning from an .npz: `txt` [N, S, 4096] (T5) and `y` [N, 768] (CLIP pooled)."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz of text embeddings ({' '.join(str(e).split())[:200]})") from None
    if not hasattr(z, "files"):
        raise ValueError(f"{path}: a single .npy array, expected an .npz with 'txt' [N, S, D] and 'y' [N, V]")
    with z:
        missing = [k for k in ("txt", "y") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected 'txt' [N, S, D] and 'y' [N, V] "
                             f"(found {z.files})")
        txt, y = np.asarray(z["txt"], np.float32), np.asarray(z["y"], np.float32)
    if txt.ndim != 3 or y.ndim != 2 or txt.shape[0] != y.shape[0]:
        raise ValueError(f"{path}: 'txt' must be [N, S, D] and 'y' [N, V] with the same N; found "
                         f"{txt.shape} and {y.shape}")
    return txt, y


class FluxBatches(list):
    """Calibration batches (a list of dicts of DiT inputs) that record the schedule they were sampled on:
    `schedule` (the sampler's num_steps + 1 timesteps, 1 -> 0) and `steps` (per batch, the index of its
    step in it), so a rollout from a batch's state follows the sampler (`flux_rollout_batches`). Slicing
    keeps the record; `like(batches)` puts the same record on transformed batches (e.g. sharded)."""

    def __init__(self, batches: Sequence[Any] = (), *, schedule: Sequence[float] | np.ndarray, steps: Sequence[int]):
        super().__init__(batches)
        self.schedule = np.asarray(schedule, np.float64)
        self.steps = [int(i) for i in steps]
        if len(self.steps) != len(self):
            raise ValueError(f"FluxBatches: {len(self.steps)} step indices for {len(self)} batches; give one per batch")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FluxBatches(list.__getitem__(self, i), schedule=self.schedule, steps=self.steps[i])
        return list.__getitem__(self, i)

    def like(self, batches: Sequence[Any]) -> FluxBatches:
        """`batches` (the same batches transformed, in the same order) with this schedule and these steps."""
        return FluxBatches(batches, schedule=self.schedule, steps=self.steps)


def flux_rollout_batches(batches: FluxBatches, k: int) -> list[dict[str, Any]]:
    """Batches for `RolloutForward(None)`: from each batch's state, `k` Euler steps of the schedule it was
    sampled on (`sigmas` = schedule[i : i + k + 1]; a rollout that would pass the end of the schedule stops
    there, its `sigmas` padded with the last value, so every batch has one shape). The other inputs
    (text, ids, `guidance`) travel with the batch (the same arrays: trajectories stay recognizable)."""
    n = batches.schedule.size - 1
    if not 1 <= k <= n:
        raise ValueError(f"rollout={k}: the batches were sampled on a {n}-step schedule; use 1 <= rollout <= {n}")
    out = []
    for b, i in zip(batches, batches.steps, strict=True):
        sig = batches.schedule[i : i + k + 1]
        sig = np.concatenate([sig, np.full(k + 1 - sig.size, batches.schedule[-1])])
        rest = {key: v for key, v in b.items() if key != "timesteps"}
        out.append(dict(rest, sigmas=jnp.asarray(sig, jnp.float32)))
    return out


@frozen_jit
def flux_forward(model: nnx.Module, batch: dict[str, Any]) -> jax.Array:
    """`model(**batch)` under one module-level jit (every caller shares its compilations); the model is only
    read, so its weights are not copied by the call (`models.frozen`)."""
    return model(**batch)


def default_num_steps(config: Any) -> int:
    """The sampler's default number of steps: 50 for a guidance-distilled model (FLUX.1-dev), else 4 (schnell)."""
    return 50 if config.guidance_embed else 4


def flux_calibration_batches(
    model: nnx.Module,
    *,
    text: str | tuple[np.ndarray, np.ndarray] | None = None,
    num_samples: int = 2,
    num_steps: int | None = None,
    calib_steps: int | None = None,
    height: int = 256,
    width: int = 256,
    txt_len: int = 32,
    guidance: float = 3.5,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = False,
    place: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> FluxBatches:
    """DiT inputs along real sampling trajectories of the float `model`, for calibration.

    For each sample: noise latents, then BFL's Euler sampler over `num_steps` steps of the schedule
    (shifted for guidance-distilled models, i.e. dev; 50 steps for dev, 4 for schnell by default),
    recording the DiT inputs at `calib_steps` of them spread over the schedule (default: all).
    text: an .npz path or (txt, y) arrays; None generates synthetic embeddings (only sensible for the
    tiny model). height/width are image pixels (latent tokens: height/16 * width/16). progress: a bar
    over the sampling steps. The list records the schedule and each batch's step (`FluxBatches`), which
    `quantize_flux(rollout=k)` follows. place: puts a trajectory's input arrays where the sampler runs, e.g.
    `lambda b: sharding.shard_batch(b, mesh)` with a model placed on `mesh` and `batch_size` a multiple of
    the mesh size: the trajectories of one batch are then sampled data parallel, one slice per device.
    """
    cfg = model.config
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, found {height}x{width}")
    rng = np.random.default_rng(seed)
    if text is None:
        txt_all = rng.standard_normal((num_samples, txt_len, cfg.context_in_dim)).astype(np.float32)
        y_all = rng.standard_normal((num_samples, cfg.vec_in_dim)).astype(np.float32)
    else:
        txt_all, y_all = load_text_embeddings(text) if isinstance(text, str) else text
        if txt_all.shape[-1] != cfg.context_in_dim or y_all.shape[-1] != cfg.vec_in_dim:
            raise ValueError(f"text embeddings have widths {txt_all.shape[-1]}/{y_all.shape[-1]}, the model "
                             f"expects {cfg.context_in_dim}/{cfg.vec_in_dim}")
        reps = -(-num_samples // txt_all.shape[0])
        txt_all, y_all = np.tile(txt_all, (reps, 1, 1))[:num_samples], np.tile(y_all, (reps, 1))[:num_samples]
    hl, wl = height // 16, width // 16
    dev = bool(cfg.guidance_embed)
    steps = num_steps or default_num_steps(cfg)
    sched = flux_schedule(steps, hl * wl, shift=dev)
    pick = np.arange(steps) if not calib_steps else np.unique(np.linspace(0, steps - 1, calib_steps).round())
    pick = set(int(i) for i in pick)
    last = max(pick)  # a trajectory stops at its last recorded step (later steps would be thrown away)

    batches, steps_of = [], []
    n_traj = -(-num_samples // batch_size)
    bar = tqdm(total=n_traj * (last + 1), desc="calibration trajectories", disable=not progress, leave=False)
    for b0 in range(0, num_samples, batch_size):
        txt = jnp.asarray(txt_all[b0 : b0 + batch_size])
        y = jnp.asarray(y_all[b0 : b0 + batch_size])
        bs = txt.shape[0]
        img = jnp.asarray(rng.standard_normal((bs, hl * wl, cfg.in_channels)).astype(np.float32))
        img_ids = jnp.asarray(img_position_ids(bs, hl, wl))
        txt_ids = jnp.zeros((bs, txt.shape[1], 3), jnp.float32)
        g = jnp.full((bs,), guidance, jnp.float32) if dev else None
        if place is not None:  # once per trajectory: its text arrays stay one object (flux_trajectory)
            a = place(dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=y, guidance=g))
            img, img_ids, txt, txt_ids, y, g = (a[k] for k in ("img", "img_ids", "txt", "txt_ids", "y", "guidance"))
        for i in range(last + 1):
            t = jnp.full((bs,), sched[i], jnp.float32)
            if place is not None:
                t = place(dict(timesteps=t))["timesteps"]
            batch = dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=g)
            if i in pick:
                batches.append(batch)
                steps_of.append(i)
            if i < last:
                v = flux_forward(model, batch)
                img = (img + (sched[i + 1] - sched[i]) * v.astype(jnp.float32)).astype(jnp.float32)
            bar.update(1)
    bar.close()
    return FluxBatches(batches, schedule=sched, steps=steps_of)


def flux_trajectory(batch: dict[str, Any]) -> int:
    """The sample group of a FLUX calibration batch (for splitting choosing / accepting batches): the
    text conditioning array, which `flux_calibration_batches` shares across one trajectory's steps."""
    return id(batch["txt"])


def quantize_flux(
    model: nnx.Module,
    batches: Sequence[Any],
    *,
    method: str = "permuquant",
    format: str = "nvfp4",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tau: float = 0.0,
    keep_bf16: Sequence[str] = FLUX_KEEP,
    hadamard_block: int | None = 64,
    smooth_alpha: float = 0.5,
    act_scale: str = "static",
    stats=None,
    backend: str = "auto",
    progress: bool = False,
    accept: str | None = None,
    accept_batches: Sequence[Any] | None = None,
    top_k: int = 3,
    refine: int = 0,
    schedule: str = "sequential",
    hadamard_sizes: bool = True,
    hadamard_start: str = "none",
    guard: float | None = 0.01,
    forward=None,
    rollout: int = 0,
    act_amax: str | None = None,
) -> tuple[nnx.Module, QuantReport]:
    """Quantize a `FluxDiT` in place with the FLUX site plan; returns `(model, report)`.

    batches: from `flux_calibration_batches` (dicts of DiT inputs); they are split into choosing and
    accepting halves unless `accept_batches` is given: by sample within each batch when batches hold
    several samples, else by trajectory (`flux_trajectory`). keep_bf16: module-path patterns left
    in float (default: embedders and final projection). accept: "layer" | "block" (the double/single
    block's residual-stream outputs) | "model" (the DiT output); None: the library default. See
    forward: how a batch runs the model (None: `model(**batch)`; `quant.CFGForward(scale)` for the
    sampler's doubled [cond; uncond] batches, so acceptance measures the guided velocity). See
    `api.quantize_model` for the other options (hadamard_sizes, hadamard_start, guard, act_amax); the report's
    `permutations`, `layers[...]["act_global_scale"]` and `arrays()` hold the metadata.
    rollout: k >= 1 (model-level acceptance only): the choosing and accepting batches become k-step Euler
    rollouts from their trajectory states along the schedule they were sampled on (`flux_rollout_batches`;
    the batches must be `flux_calibration_batches`' own), and the layer pass, acceptance and guard measure
    the distance the quantized model travels (`RolloutForward`, no CFG: `guidance` travels with the batch);
    the calibration statistics stay one-step. 0: one step.
    """
    from permuquant_jax.quant.api import DEFAULT_ACCEPT, RolloutForward, quantize_model
    from permuquant_jax.quant.batches import can_split_samples, materialize
    from permuquant_jax.quant.calibrate import default_forward
    from permuquant_jax.quant.paths import find_linears, match_any

    if isinstance(rollout, bool) or not isinstance(rollout, int | np.integer) or rollout < 0:
        raise ValueError(f"rollout must be an integer >= 0 (Euler steps per accepting batch; 0: one step), "
                         f"found {rollout!r}")
    accept = accept or DEFAULT_ACCEPT
    if rollout:
        if accept != "model":
            raise ValueError(f"rollout={rollout} needs model-level acceptance (a rollout ends in the model's state, "
                             f"not a block's output); found accept={accept!r}: pass accept='model' or rollout=0")
        if forward is not None:
            raise ValueError("rollout sets the forward (RolloutForward without CFG); pass forward=None, or rollout=0 "
                             "to use your own forward")
        for name, b in (("batches", batches), ("accept_batches", accept_batches)):
            if b is not None and not isinstance(b, FluxBatches):
                raise ValueError(f"rollout={rollout}: {name} must be flux_calibration_batches' own list (a "
                                 f"FluxBatches, which records the sampling schedule); found {type(b).__name__}")
    split = None
    if not rollout:
        batches = materialize(batches)
        split = None if can_split_samples(batches) else flux_trajectory
    # FLUX_KEEP names the embedders of both FLUX.1 variants: drop those this model lacks (no warning)
    names = [".".join(map(str, p)) for p in find_linears(model)]
    keep = tuple(p for p in keep_bf16 if p not in FLUX_KEEP or any(match_any(n, [p]) for n in names))
    if rollout:
        batches, accept_batches, split, stats = _rollout_inputs(model, batches, accept_batches, rollout, keep, stats,
                                                               progress)
        forward = RolloutForward(None)

    model, report = quantize_model(
        model, batches, method=method, format=format, sites=flux_sites(model), keep=keep,
        alphas=alphas, tau=tau, hadamard_block=hadamard_block, smooth_alpha=smooth_alpha,
        act_scale=act_scale, stats=stats, backend=backend, progress=progress,
        accept=accept, accept_batches=accept_batches, top_k=top_k, refine=refine,
        schedule=schedule, hadamard_sizes=hadamard_sizes, hadamard_start=hadamard_start, guard=guard,
        split=split, forward=default_forward if forward is None else forward, act_amax=act_amax,
    )
    report.config["rollout"] = int(rollout)
    return model, report


def _rollout_inputs(model, batches: FluxBatches, accept_batches: FluxBatches | None, k: int, keep, stats, progress):
    """(calibration batches, accept batches, split, stats) for `quantize_model` with k-step rollouts: the split
    into choosing / accepting parts is made on the trajectory batches (by sample within each batch when
    batches hold several samples, else by trajectory) and each part becomes rollouts; the statistics are
    the one-step calibration pass over the trajectory batches, as without rollouts."""
    from permuquant_jax.quant.batches import can_split_samples, split_samples
    from permuquant_jax.quant.calibrate import calibrate
    from permuquant_jax.quant.paths import find_linears, match_any

    if accept_batches is not None:
        out = flux_rollout_batches(batches, k), flux_rollout_batches(accept_batches, k), None
    elif can_split_samples(batches):  # the sample split, done before the rollouts add their [k+1] sigmas
        choose, held = split_samples(batches)
        cr, hr = flux_rollout_batches(batches.like(choose), k), flux_rollout_batches(batches.like(held), k)
        out = cr + hr, None, [0] * len(cr) + [1] * len(hr)
    else:
        out = flux_rollout_batches(batches, k), None, flux_trajectory
    if stats is None:
        targets = [p for p in find_linears(model) if not match_any(p, keep)]
        stats = calibrate(model, list(batches) + list(accept_batches or []), targets, progress=progress)
    return (*out, stats)

