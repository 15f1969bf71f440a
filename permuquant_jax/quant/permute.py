"""Choosing channel orders: the joint second-moment criterion, candidate orders, and acceptance.

The paper's score for input channel i of a linear y = x W^T is
v_i = (mu_a[i]^2)^alpha * (mu_w[i]^2)^(1 - alpha), with mu_a[i] = E[x_i^2] over calibration tokens and
mu_w[i] = mean_j W[j, i]^2. Only the order matters, so we sort by alpha*log(mu_a) + (1-alpha)*log(mu_w)
(descending, stable, so equal scores keep their original order and results are deterministic).

Every candidate order is judged by the error it gives where it matters: the relative error of the
quantized layer output against float on calibration data. `part_errors` is that measurement, shared by
the single-layer `choose_for_layer` and the model-wide acceptance pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from permuquant_jax.formats.hadamard import block_hadamard

DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
# Matmuls of the error measurement: bf16x3 on GPUs (about float32 accuracy, far below the quantization
# error being measured, at half the cost of full float32 emulation); CPUs compute float32 anyway.
EVAL_PRECISION = jax.lax.Precision.HIGH
_EPS = 1e-30


def _segment_lengths(
    size: int, segments: Sequence[int] | int | None, group: int, what: str
) -> tuple[int, ...]:
    """Normalize `segments`: None (one segment), an int (equal segments) or a sequence of lengths."""
    if segments is None:
        segs: tuple[int, ...] = (size,)
    elif isinstance(segments, int | np.integer):
        if segments <= 0 or size % int(segments):
            raise ValueError(f"{what}: segment length {segments} must divide the channel count {size}")
        segs = (int(segments),) * (size // int(segments))
    else:
        segs = tuple(int(s) for s in segments)
        if sum(segs) != size or min(segs) <= 0:
            raise ValueError(f"{what}: segment lengths {segs} must be positive and sum to {size}")
    bad = [s for s in segs if s % group]
    if bad:
        raise ValueError(
            f"{what}: every segment must hold whole quantization groups of {group} channels; "
            f"found segment lengths {sorted(set(bad))}"
        )
    return segs


def order_from_moments(
    act_sq_mean: np.ndarray,
    weight_sq_mean: np.ndarray,
    alpha: float = 0.5,
    segments: Sequence[int] | int | None = None,
    group: int = 16,
) -> np.ndarray:
    """Channels sorted by the joint score (descending) within each segment; int32 permutation."""
    mu_a = np.asarray(act_sq_mean, np.float64)
    mu_w = np.asarray(weight_sq_mean, np.float64)
    if mu_a.shape != mu_w.shape or mu_a.ndim != 1:
        raise ValueError(
            f"activation and weight moments must be 1-D of one length; found {mu_a.shape} and {mu_w.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], found {alpha}")
    score = alpha * np.log(np.maximum(mu_a, _EPS)) + (1.0 - alpha) * np.log(np.maximum(mu_w, _EPS))
    segs = _segment_lengths(mu_a.size, segments, group, "order_from_moments")
    out = []
    start = 0
    for n in segs:
        out.append(start + np.argsort(-score[start : start + n], kind="stable"))
        start += n
    return np.concatenate(out).astype(np.int32)


def joint_order(
    act_sq_mean: np.ndarray | jax.Array,
    weight: np.ndarray | jax.Array,
    alpha: float = 0.5,
    group: int = 16,
    segments: Sequence[int] | int | None = None,
) -> np.ndarray:
    """The paper's joint second-moment order of the input channels of one linear layer.

    act_sq_mean: `[K]` mean of x_i^2 over calibration tokens. weight: `[N, K]` (PyTorch layout: rows
    are output channels; pass `kernel.T` for an NNX kernel `[K, N]`). Returns an int32 permutation
    `p` (`x[..., p]` and `weight[:, p]` are the reordered operands), channels sorted by descending
    score, within each segment if `segments` is given (an int length or a sequence of lengths).
    """
    w = np.asarray(weight, np.float64)
    k = np.asarray(act_sq_mean).shape[-1]
    if w.ndim != 2 or w.shape[1] != k:
        raise ValueError(
            f"weight must be [N, K] with K = len(act_sq_mean) = {k} (PyTorch layout; pass kernel.T for an "
            f"NNX kernel [K, N]); found shape {w.shape}"
        )
    if k % group:
        raise ValueError(f"the channel count {k} must be a multiple of the group size {group}")
    return order_from_moments(np.asarray(act_sq_mean), np.mean(w * w, axis=0), alpha, segments, group)


def deal_order(order: np.ndarray, block: int, segments: Sequence[int] | int | None = None) -> np.ndarray:
    """Deal a sorted order round-robin into blocks of `block` channels (within each segment).

    Position j of the sorted order goes to block j mod n_blocks, so every block (a quantization group or
    a Hadamard block) receives one channel of each rank band: large channels are spread out instead of
    packed together (DuQuant's zigzag). Used as an extra candidate before a block Hadamard rotation.
    """
    order = np.asarray(order)
    segs = _segment_lengths(order.size, segments, block, "deal_order")
    out = []
    start = 0
    for n in segs:
        seg = order[start : start + n]
        nb = n // block
        # sorted position j -> block j % nb, slot j // nb
        out.append(seg.reshape(block, nb).T.reshape(-1))
        start += n
    return np.concatenate(out).astype(np.int32)


@dataclass(frozen=True)
class Candidate:
    """One candidate transform of a channel space: an order and (SmoothQuant) per-channel scales."""

    label: str
    perm: np.ndarray  # int32 [n]
    scale: np.ndarray | None = None  # float32 [n] in original channel order: x / scale, W * scale


def make_candidates(
    act_sq_mean: np.ndarray,
    weight_sq_mean: np.ndarray,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    segments: Sequence[int] | int | None = None,
    group: int = 16,
    deal_block: int | None = None,
    include_identity: bool = True,
    dedup: bool = True,
    act_absmax: np.ndarray | None = None,
    weight_absmax: np.ndarray | None = None,
    deal_groups: bool = False,
) -> list[Candidate]:
    """Identity (first, the reference the acceptance rule compares to) and the joint order per alpha.

    With `deal_block`, each sorted order is also offered dealt into blocks of that size (for the
    Hadamard variant). With `act_absmax` / `weight_absmax` (`[n]`, max |x_i| and max_j |W_ji|), the
    orders by each alone are added; with `deal_groups`, the balanced order that deals the alpha=0.5
    joint order into quantization groups (every group gets one channel of each rank band, DuQuant's
    zigzag). With `dedup`, orders equal to one already listed are dropped (keep them to get the same
    number of candidates for every layer of a stack).
    """
    n = np.asarray(act_sq_mean).size
    cands: list[Candidate] = []
    seen: set[bytes] = set()

    def add(label: str, perm: np.ndarray) -> None:
        key = perm.tobytes()
        if not dedup or key not in seen:
            seen.add(key)
            cands.append(Candidate(label, perm))

    if include_identity:
        add("identity", np.arange(n, dtype=np.int32))
    if deal_block and any(sg % deal_block for sg in _segment_lengths(n, segments, group, "make_candidates")):
        deal_block = None  # a segment (e.g. a 32-wide head) is narrower than the block: no dealt orders
    for a in alphas:
        order = order_from_moments(act_sq_mean, weight_sq_mean, float(a), segments, group)
        add(f"sort(a={a:g})", order)
        if deal_block:
            add(f"deal{deal_block}(a={a:g})", deal_order(order, deal_block, segments))
    for label, m in (("act-absmax", act_absmax), ("weight-absmax", weight_absmax)):
        if m is not None:
            v = np.asarray(m, np.float64) ** 2
            add(f"sort({label})", order_from_moments(v, v, 0.5, segments, group))
    if deal_groups:
        segs = _segment_lengths(n, segments, group, "make_candidates")
        if any(sg > group for sg in segs):
            order = order_from_moments(act_sq_mean, weight_sq_mean, 0.5, segments, group)
            add("deal-groups(a=0.5)", deal_order(order, group, segments))
    if not cands:
        raise ValueError("no candidate orders: give at least one alpha or include the identity")
    return cands


def part_errors(
    x: jax.Array,
    w_kn: jax.Array,
    perms: jax.Array,
    scales: jax.Array | None,
    act_fake_quant,
    weight_fake_quant,
    hadamard_block: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Squared output error of each candidate for one linear (or one column range of it). Jittable.

    x `[T, n]`, w_kn `[n, N]` (NNX kernel layout), perms `[C, n]` int, scales `[C, n]` or None.
    For candidate c: x' = (x / s)[:, p], W' = (W * s)[p]; optionally block-Hadamard both along n;
    y_q = Q_a(x') Q_w(W'^T)^T. Returns (sum of (y_q - y)^2 per candidate `[C]`, sum of y^2 (scalar),
    max |x'| per candidate `[C]`), all float32; matmuls at `EVAL_PRECISION`.
    """
    hi = EVAL_PRECISION
    pair = _joint_quantizer(act_fake_quant, weight_fake_quant)
    x = x.astype(jnp.float32)
    w = w_kn.astype(jnp.float32)
    y = jnp.matmul(x, w, precision=hi)
    ref = jnp.sum(y * y)

    def one(args):
        p, s = args
        xc, wc = x, w
        if s is not None:
            xc = xc / s
            wc = wc * s[:, None]
        xc = jnp.take(xc, p, axis=1)
        wt = jnp.take(wc, p, axis=0).T  # [N, n]
        if hadamard_block:
            xc = block_hadamard(xc, hadamard_block)
            wt = block_hadamard(wt, hadamard_block)
        if pair is not None:
            xq, wq = pair(xc, wt)
        else:
            xq, wq = act_fake_quant(xc), weight_fake_quant(wt)
        yq = jnp.matmul(xq, wq.T, precision=hi)
        d = yq - y
        return jnp.sum(d * d), jnp.max(jnp.abs(xc))

    err, amax = jax.lax.map(one, (perms, scales))
    return err, ref, amax


def _joint_quantizer(act_fake_quant, weight_fake_quant):
    """For W4A4 NVFP4 (both operands fake-quantized with a dynamic per-tensor global scale): a function
    quantizing both operands `(x [T, n], w [N, n])` with `nvfp4_fake_quant_fast` (the quantizer's
    correctly rounded division loops dominate the compile time of the acceptance passes), else None."""
    from permuquant_jax.formats.registry import get_format

    fq = get_format("nvfp4").weight_fake_quant
    if act_fake_quant is not fq or weight_fake_quant is not fq:
        return None

    def pair(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        return nvfp4_fake_quant_fast(a), nvfp4_fake_quant_fast(b)

    return pair


def nvfp4_fake_quant_fast(x: jax.Array) -> jax.Array:
    """NVFP4 fake quantization with a dynamic per-tensor global scale, with plain float32 divisions.

    The arithmetic of `formats.nvfp4.fake_quant` (block scale amax/6 over the global scale, E4M3,
    clipped to its normal range; E2M1 round half to even), without its correctly rounded division
    loops, which dominate compile time: values can differ where a division rounds differently, which
    moves a decision's measured error by far less than the candidates differ. For trials only; the
    quantized model uses the exact quantizer.
    """
    from permuquant_jax.formats import nvfp4

    x = x.astype(jnp.float32)
    gs = jnp.max(jnp.abs(x)) / jnp.float32(nvfp4.F8E4M3_MAX * nvfp4.F4_E2M1_MAX)
    gs = jnp.where(gs < nvfp4.MIN_GLOBAL_SCALE, jnp.float32(1.0), gs)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // 16, 16)
    sc = jnp.max(jnp.abs(xb), axis=-1) / jnp.float32(nvfp4.F4_E2M1_MAX) / gs
    sc = jnp.clip(sc, nvfp4.F8E4M3_MIN_NORMAL, nvfp4.F8E4M3_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    v = jnp.clip(xb * ((jnp.float32(1.0) / gs) / sc)[..., None], -6.0, 6.0)
    m = jnp.abs(v)
    idx = ((m > 0.25).astype(jnp.int32) + (m >= 0.75) + (m > 1.25) + (m >= 1.75) + (m > 2.5) + (m >= 3.5)
           + (m > 5.0))
    mag = jnp.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], jnp.float32)[idx]
    return (jnp.sign(v) * mag * (gs * sc)[..., None]).reshape(x.shape)


def _fmt(format):
    from permuquant_jax.formats.registry import get_format

    return get_format(format) if isinstance(format, str) else format


@functools.partial(jax.jit, static_argnames=("format_name", "hadamard_block"))
def _layer_errors(x, w_kn, perms, scales, format_name, hadamard_block):
    fmt = _fmt(format_name)
    return part_errors(x, w_kn, perms, scales, fmt.act_fake_quant, fmt.weight_fake_quant, hadamard_block)


def accept(errors: Sequence[float], tau: float = 0.0, identity_index: int = 0) -> tuple[int, bool, float]:
    """The acceptance rule: (index kept, accepted?, relative gain of the best candidate).

    The best candidate is kept only if (E_identity - E_best) / E_identity > tau; otherwise the
    identity (`identity_index`) is kept. A zero identity error accepts nothing.
    """
    e = np.asarray(errors, np.float64)
    best = int(np.argmin(e))
    e_id = float(e[identity_index])
    gain = (e_id - float(e[best])) / e_id if e_id > 0 else 0.0
    if best != identity_index and gain > tau:
        return best, True, gain
    return identity_index, False, gain


LAYER_METHODS: tuple[str, ...] = ("permuquant", "permuquant-h", "auto")
SMOOTH_ALPHAS: tuple[float, ...] = (0.25, 0.5, 0.75)
# The per-layer acceptance threshold, measured on all-MiniLM-L6-v2's real activations (methods_real.py,
# NVFP4, auto): tau 0 kept two layers that came out 1.3% / 1.6% worse than RTN on held-out documents
# (mean 0.895x RTN); tau 0.02 kept none worse (worst 1.000x) at the same mean (0.896x).
LAYER_TAU = 0.02


def aligned_hadamard_blocks(k: int, group: int, sizes: Sequence[int] = (16, 32, 64, 128),
                            starts: Sequence[int] = ()) -> tuple[int, ...]:
    """The block Hadamard sizes aligned with a format's groups for `k` input channels: each size divides
    `k` (and every column offset in `starts`) and either divides the group or is a multiple of it, so
    block and group boundaries coincide."""
    return tuple(int(b) for b in sizes
                 if k % b == 0 and (b % group == 0 or group % b == 0) and all(s % b == 0 for s in starts))


def choose_for_layer(
    x_calib: np.ndarray | jax.Array,
    weight: np.ndarray | jax.Array,
    *,
    format: str = "nvfp4",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tau: float = LAYER_TAU,
    segments: Sequence[int] | int | None = None,
    hadamard_block: int | None = None,
    method: str | None = None,
    x_accept: np.ndarray | jax.Array | None = None,
    hadamard_blocks: Sequence[int] | None = None,
    smooth_alphas: Sequence[float] = SMOOTH_ALPHAS,
) -> tuple[np.ndarray | None, dict]:
    """Choose the transform of one linear from its calibration activations (validated on `x_accept`).

    x_calib `[..., K]` (activations of the layer input), weight `[N, K]` (PyTorch layout). Every candidate
    is scored by the relative squared output error (bias excluded) of the quantized layer (`format` from
    the registry) against float on `x_calib`; the best is kept only if it lowers the error of plain RTN
    (identity, no rotation) by more than `tau` (relative) on `x_accept` (held-out tokens of OTHER
    samples; None: on `x_calib` itself). Candidates by `method`:
    - "permuquant" (default; with `hadamard_block` given and no method: "permuquant-h" at that one block):
      the joint order per alpha, the orders by activation absmax and by weight column absmax, the
      alpha=0.5 order dealt into groups;
    - "permuquant-h": those orders without rotation, and the identity, the alpha=0.5 joint order and that
      order dealt into the Hadamard blocks, each followed by a block Hadamard of each size in
      `hadamard_blocks` (default: `aligned_hadamard_blocks` of at least one group);
    - "auto": as "permuquant-h", plus SmoothQuant scales per `smooth_alphas` (no rotation), alone and
      followed by the joint order of the smoothed moments.
    Returns `(perm, report)`: `perm` is None when the order stays the identity; the report names the
    chosen candidate, its `hadamard_block` (None: no rotation) and `smooth` scales (None: none), and the
    choosing / held-out errors of every candidate.
    """
    from permuquant_jax.quant.baselines import smoothquant_scales

    fmt = _fmt(format)
    if method is None:
        method = "permuquant" if hadamard_block is None else "permuquant-h"
    if method not in LAYER_METHODS:
        raise ValueError(f"method must be one of {LAYER_METHODS}, found {method!r}")
    x = jnp.asarray(x_calib, jnp.float32)
    w = np.asarray(weight, np.float32)
    k = x.shape[-1]
    if w.ndim != 2 or w.shape[1] != k:
        raise ValueError(f"weight must be [N, K] with K = x_calib.shape[-1] = {k}; found shape {w.shape}")
    x = x.reshape(-1, k)
    xa = None if x_accept is None else jnp.asarray(x_accept, jnp.float32).reshape(-1, k)
    if xa is not None and xa.shape[-1] != k:
        raise ValueError(f"x_accept must have K = {k} channels last, found shape {np.shape(x_accept)}")
    mu_a = np.asarray(jnp.mean(x * x, axis=0), np.float64)
    a_max = np.asarray(jnp.max(jnp.abs(x), axis=0), np.float64)
    mu_w = np.mean(w.astype(np.float64) ** 2, axis=0)
    w_max = np.max(np.abs(w), axis=0).astype(np.float64)
    if method == "permuquant":
        blocks: tuple[int | None, ...] = (None,)
    elif hadamard_blocks is not None:
        blocks = (None, *(int(b) for b in hadamard_blocks))
    elif hadamard_block is not None and method == "permuquant-h" and x_accept is None:
        blocks = (int(hadamard_block),)  # the single-block variant (the identity is then plain Hadamard)
    else:
        blocks = (None, *(b for b in aligned_hadamard_blocks(k, fmt.group) if b >= fmt.group))
    # (label, perm, scale, block): the first is RTN, the reference of the acceptance rule
    cands: list[tuple[str, np.ndarray, np.ndarray | None, int | None]] = [
        ("identity", np.arange(k, dtype=np.int32), None, None)]
    for b in blocks:
        tag = "" if b is None else f" + H{b}"
        if b is None:  # every order
            orders = make_candidates(mu_a, mu_w, alphas=alphas, segments=segments, group=fmt.group,
                                     act_absmax=a_max, weight_absmax=w_max, deal_groups=True, dedup=False)
        else:  # before a rotation (cost): the identity, the alpha=0.5 order and that order dealt into blocks
            orders = make_candidates(mu_a, mu_w, alphas=(0.5,), segments=segments, group=fmt.group,
                                     deal_block=b if b > fmt.group else None, dedup=False)
        for c in orders:
            if c.label == "identity" and b is None:
                continue
            cands.append((c.label + tag, c.perm, None, b))
        if method == "auto" and b is None:
            for sa in smooth_alphas:
                s = smoothquant_scales(a_max, w_max, float(sa)).astype(np.float64)
                ident = np.arange(k, dtype=np.int32)
                cands.append((f"smooth(a={sa:g}){tag}", ident, s.astype(np.float32), b))
                order = order_from_moments(mu_a / s**2, mu_w * s**2, 0.5, segments, fmt.group)
                cands.append((f"smooth(a={sa:g}) + sort(a=0.5){tag}", order, s.astype(np.float32), b))
    rel_c, rel_h = np.zeros(len(cands)), np.zeros(len(cands))
    w_kn = jnp.asarray(w.T)
    # zero token rows add nothing to either sum (a zero row quantizes to zero and leaves every maximum as
    # it is): pad both halves to one length, so they share compilations
    t_pad = -(-max(x.shape[0], 0 if xa is None else xa.shape[0]) // 256) * 256
    x = jnp.pad(x, ((0, t_pad - x.shape[0]), (0, 0)))
    xa = None if xa is None else jnp.pad(xa, ((0, t_pad - xa.shape[0]), (0, 0)))
    for b in dict.fromkeys(c[3] for c in cands):
        idx = [i for i, c in enumerate(cands) if c[3] == b]
        perms = jnp.asarray(np.stack([cands[i][1] for i in idx]))
        scales = None
        if any(cands[i][2] is not None for i in idx):
            one = np.ones(k, np.float32)
            scales = jnp.asarray(np.stack([one if cands[i][2] is None else cands[i][2] for i in idx]))
        for data, out in ((x, rel_c), (xa, rel_h)):
            if data is None:
                continue
            err, ref, _ = _layer_errors(data, w_kn, perms, scales, fmt.name, b)
            out[idx] = np.asarray(err, np.float64) / max(float(ref), _EPS)
    if xa is None:
        rel_h = rel_c
    best = int(np.argmin(rel_c))
    gain = (rel_h[0] - rel_h[best]) / rel_h[0] if rel_h[0] > 0 else 0.0
    accepted = best != 0 and gain > tau
    idx = best if accepted else 0
    label, perm, scale, block = cands[idx]
    report = {
        "method": method,
        "candidates": [{"label": c[0], "error": float(e), "heldout_error": float(h)}
                       for c, e, h in zip(cands, rel_c, rel_h, strict=True)],
        "best": cands[best][0],
        "chosen": label,
        "accepted": bool(accepted),
        "gain": float(gain),
        "error_identity": float(rel_c[0]),
        "error_chosen": float(rel_c[idx]),
        "heldout_identity": float(rel_h[0]),
        "heldout_chosen": float(rel_h[idx]),
        "hadamard_block": block,
        "smooth": scale,
    }
    keep_perm = accepted and not np.array_equal(perm, np.arange(k))
    return (perm if keep_perm else None), report
