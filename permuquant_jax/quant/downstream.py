"""Downstream acceptance: judge each candidate by the error of what the model computes after the layer.

Every quantized linear is replaced by a `TrialLinear`: it holds the candidate transforms of each site
part it reads (orders, scales, with the stack axes first) and a selection index per layer of the stack,
and computes the fake-quantized output of the SELECTED candidate (activations and weights quantized by
the format, the block Hadamard of the linear's setting applied after the order). Changing a selection
is a change of array values, not of the program: one compilation of the model forward serves every
evaluation.

Every enclosing block (a transformer block: an element of an `nnx.List`, a stacked module run under a
scan, or a path the caller names) is wrapped by a `BlockProbe`, which runs the block twice on the same
input: once with every trial in float (the reference) and once quantized; it accumulates the squared
error of the block's outputs (every array leaf: FLUX's residual streams) against that reference, per
layer of the stack, and passes the QUANTIZED output on. So block l's input comes from the already
quantized blocks < l (as GPTQ-style tools do), and one forward measures every block's error and the
model output's error (against the float model's outputs) at once, in constant memory.

Decisions are sequential, block by block (layer by layer of a stack), site by site within a block: the
current state (identity at undecided sites) is compared to the top-k candidates (prefiltered by the
layer-local error) on the choosing batches; the best is then validated on the held-out accepting
batches and kept only if it lowers the held-out error there by more than `tau` (relative).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.formats.hadamard import block_hadamard
from permuquant_jax.quant.calibrate import _zeros
from permuquant_jax.quant.linear import in_host_memory
from permuquant_jax.quant.paths import Path, get_node, path_str

ACCEPT_LEVELS: tuple[str, ...] = ("layer", "block", "model")

# Set while a BlockProbe computes its float reference: every TrialLinear then runs its float linear.
# Read at trace time only (a Python flag, not a traced value).
_FLOAT = [False]


class TrialSel(nnx.Variable):
    """Selections of the trial modules (candidate index per layer; Hadamard choice per layer)."""


class TrialInput(nnx.Variable):
    """Read-only candidate arrays of the trial modules (orders, scales; stack axes first)."""


class ProbeStat(nnx.Variable):
    """Accumulators of a downstream evaluation (block errors, transformed-input amax)."""


class TrialPart(nnx.Module):
    """The candidates for input columns `[start, start+size)`: perms `[*stack, C, size]`, scales or None."""

    def __init__(self, start: int, size: int, perms: np.ndarray, scales: np.ndarray | None):
        self.start = int(start)
        self.size = int(size)
        self.perms = TrialInput(jax.device_put(np.asarray(perms, np.int32)))
        self.scales = TrialInput(None if scales is None else jax.device_put(np.asarray(scales, np.float32)))
        self.sel = TrialSel(jax.device_put(np.zeros(perms.shape[:-2], np.int32)))


class TrialLinear(nnx.Module):
    """Stands in for a linear: the fake-quantized output of the selected candidate of every part.

    hadamard_blocks: the block sizes `hsel` chooses among (0 = none), e.g. (0,) or (0, 64).
    """

    def __init__(self, inner: nnx.Module, parts: Sequence[TrialPart], format: str,
                 hadamard_blocks: Sequence[int] = (0,), hsel: int = 0):
        self.inner = inner
        self.parts = nnx.List(sorted(parts, key=lambda p: p.start))
        self.format = format
        self.hadamard_blocks = tuple(int(b) for b in hadamard_blocks)
        stack = inner.kernel.get_value().shape[:-2]
        self.hsel = TrialSel(jax.device_put(np.full(stack, hsel, np.int32)))
        self.amax = ProbeStat(_zeros(stack, np.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if _FLOAT[0]:
            return self.inner(x)
        from permuquant_jax.formats.registry import get_format
        from permuquant_jax.quant.permute import EVAL_PRECISION, nvfp4_fake_quant_fast

        fmt = get_format(self.format)
        lead = x.shape[:-1]
        xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        w = self.inner.kernel[...].astype(jnp.float32)
        xs, ws, pos = [], [], 0
        for part in self.parts:
            s, n = part.start, part.size
            if s != pos:
                raise ValueError(f"trial parts leave input columns [{pos}, {s}) uncovered")
            c = part.sel[...]
            p = part.perms[...][c]
            xc, wc = xf[:, s : s + n], w[s : s + n]
            sc = part.scales.get_value()
            if sc is not None:
                v = sc[c]
                xc, wc = xc / v, wc * v[:, None]
            xs.append(jnp.take(xc, p, axis=1))
            ws.append(jnp.take(wc, p, axis=0))
            pos = s + n
        xt = jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]
        wt = (jnp.concatenate(ws, axis=0) if len(ws) > 1 else ws[0]).T  # [N, K]
        if len(self.hadamard_blocks) > 1 or self.hadamard_blocks[0]:
            branches = [(lambda a: a) if not b else (lambda a, b=b: block_hadamard(a, b))
                        for b in self.hadamard_blocks]
            h = self.hsel[...]
            if len(branches) == 1:
                xt, wt = branches[0](xt), branches[0](wt)
            else:
                xt = jax.lax.switch(h, branches, xt)
                wt = jax.lax.switch(h, branches, wt)
        self.amax[...] = jnp.maximum(self.amax[...], jnp.max(jnp.abs(xt)))
        if fmt.family == "nvfp4":
            xq = xt if fmt.act_bits is None else nvfp4_fake_quant_fast(xt)
            wq = nvfp4_fake_quant_fast(wt)
        else:
            xq, wq = fmt.act_fake_quant(xt), fmt.weight_fake_quant(wt)
        y = jnp.matmul(xq, wq.T, precision=EVAL_PRECISION)
        bias = getattr(self.inner, "bias", None)
        if bias is not None and bias.get_value() is not None:
            y = y + bias[...].astype(jnp.float32)
        return y.reshape(*lead, y.shape[-1]).astype(x.dtype)


def _sq(tree) -> jax.Array:
    leaves = [jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree.leaves(tree)
              if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)]
    return sum(leaves) if leaves else jnp.float32(0)


def _sq_diff(a, b) -> jax.Array:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    leaves = [jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))) for x, y in pairs
              if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(leaves) if leaves else jnp.float32(0)


class BlockProbe(nnx.Module):
    """Stands in for a block: runs it in float (reference) and quantized on the same input, accumulates
    the squared error of its outputs and the reference energy (per layer of a stack), returns the
    quantized output."""

    def __init__(self, inner: nnx.Module, stack: tuple[int, ...]):
        self.inner = inner
        self.err = ProbeStat(_zeros(stack, np.float32))
        self.ref = ProbeStat(_zeros(stack, np.float32))

    def __call__(self, *args, **kwargs):
        _FLOAT[0] = True
        try:
            ref = self.inner(*args, **kwargs)
        finally:
            _FLOAT[0] = False
        out = self.inner(*args, **kwargs)
        self.err[...] = self.err[...] + _sq_diff(out, ref)
        self.ref[...] = self.ref[...] + _sq(ref)
        return out


# --------------------------------------------------------------------------- blocks


def _var_leading(module: nnx.Module) -> set[tuple[int, ...]]:
    shapes = set()
    for _, v in nnx.to_flat_state(nnx.state(module)):
        a = v.get_value()
        if a is not None and hasattr(a, "shape"):
            shapes.add(tuple(a.shape))
    return shapes


def find_blocks(model: nnx.Module, targets: Sequence[Path], blocks: Sequence[str | Path] | None = None
                ) -> dict[Path, Path | None]:
    """The enclosing block of each target linear path (None: in no block).

    blocks: the block module paths (dotted or tuples); None detects them: the element of a list
    (`nnx.List` / `nnx.Sequential` layers: a path component that is an int), else, for a stacked linear
    (kernel with leading stack axes), the outermost ancestor whose every array carries those axes (the
    module a scan runs, e.g. FLUX's `double_blocks`).
    """
    from permuquant_jax.quant.paths import parse_path

    out: dict[Path, Path | None] = {}
    if blocks is not None:
        bl = sorted((parse_path(b) for b in blocks), key=len, reverse=True)
        for b in bl:
            get_node(model, b)  # raises KeyError naming a bad path
        for t in targets:
            out[t] = next((b for b in bl if t[: len(b)] == b and len(t) > len(b)), None)
        return out
    for t in targets:
        stack = tuple(get_node(model, t).kernel.get_value().shape[:-2])
        found = None
        if stack:
            for i in range(1, len(t)):
                node = get_node(model, t[:i])
                if isinstance(node, nnx.Module) and all(s[: len(stack)] == stack for s in _var_leading(node)):
                    found = t[:i]
                    break
        else:
            ints = [i for i, p in enumerate(t[:-1]) if isinstance(p, int)]
            if ints:
                found = t[: ints[-1] + 1]
        out[t] = found
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluator:
    """Runs the trial model over batches; returns per-block errors and the model-output error."""

    model: nnx.Module
    forward: Callable
    probes: dict[Path, BlockProbe]
    step: Callable = field(init=False)
    forwards: int = 0

    def __post_init__(self):
        graphdef, _, rest = nnx.split(self.model, (TrialSel, ProbeStat), ...)
        fwd = self.forward
        streamed = any(in_host_memory(x) for x in jax.tree.leaves(rest))

        def step(carried, rest, batch, ref):
            if streamed:
                return _streamed_eval_step(graphdef, fwd, carried, rest, batch, ref)
            return _eval_step(graphdef, fwd, carried, rest, batch, ref)

        self.step = step

    def run(self, batches: Sequence[Any], refs: Sequence[Any]) -> tuple[dict[Path, np.ndarray], float]:
        """(relative block errors {block path: [*stack]}, relative model-output error) over `batches`."""
        for _, v in nnx.to_flat_state(nnx.state(self.model, ProbeStat)):
            v.set_value(_zeros(np.shape(v.get_value()), np.float32))
        _, carried, rest = nnx.split(self.model, (TrialSel, ProbeStat), ...)
        nums, dens = [], []
        for b, r in zip(batches, refs, strict=True):  # no host sync per batch: the steps queue up
            carried, d, e = self.step(carried, rest, b, r)
            nums.append(d)
            dens.append(e)
            self.forwards += 1
        num = float(np.sum(np.asarray(jax.device_get(nums), np.float64)))
        den = float(np.sum(np.asarray(jax.device_get(dens), np.float64)))
        nnx.update(self.model, carried)
        errs = {p: np.asarray(pr.err[...], np.float64) / np.maximum(np.asarray(pr.ref[...], np.float64), 1e-30)
                for p, pr in self.probes.items()}
        return errs, num / max(den, 1e-30)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef, forward, carried, rest, batch, ref):
    m = nnx.merge(graphdef, carried, rest)
    out = forward(m, batch)
    return nnx.state(m, (TrialSel, ProbeStat)), _sq_diff(out, ref), _sq(ref)


_STREAMED_PROGRAMS: dict[Any, Any] = {}


def _leaf_key(x: Any) -> tuple:
    if isinstance(x, jax.Array):
        return x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding
    if isinstance(x, np.ndarray | np.generic):
        return "numpy", np.shape(x), x.dtype
    return type(x), x if isinstance(x, int | float | bool | str | None) else id(x)


def _streamed_eval_step(graphdef, forward, carried, rest, batch, ref):
    """`_eval_step` for a model whose blocks live in host memory (`models.flux.offload_blocks`), through a
    program compiled ahead of time once per (structure, shapes, shardings). jit's own cache missed on every
    call with such arguments on JAX 0.10 (the same arguments, shardings and graphdef; ~20x slower streamed
    acceptance on the CPU); the compiled program is the one jit builds, so results are the same."""
    args = (carried, rest, batch, ref)
    key = (graphdef, forward, jax.tree.structure(args), tuple(_leaf_key(x) for x in jax.tree.leaves(args)))
    exe = _STREAMED_PROGRAMS.get(key)
    if exe is None:
        if len(_STREAMED_PROGRAMS) >= 32:  # bounded: one model structure and batch shape need a few
            _STREAMED_PROGRAMS.clear()
        exe = _STREAMED_PROGRAMS[key] = _eval_step.lower(graphdef, forward, *args).compile()
    return exe(*args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _float_step(graphdef, forward, state, batch):
    return forward(nnx.merge(graphdef, state), batch)


def float_outputs(model: nnx.Module, batches: Sequence[Any], forward: Callable) -> list[Any]:
    """The float model's outputs on each batch (the model-level reference); one compilation per model
    structure and batch shape."""
    graphdef, state = nnx.split(model)
    return [_float_step(graphdef, forward, state, b) for b in batches]


@dataclass
class Decision:
    """One downstream decision: a site at one layer of its stack."""

    site: int
    layer: tuple[int, ...]
    block: Path | None


def measure(ev: Evaluator, level: str, block: Path | None, layer: tuple[int, ...], batches, refs) -> float:
    """The error at `level` for a decision in `block` (model level when there is no enclosing block)."""
    errs, model_err = ev.run(batches, refs)
    if level == "model" or block is None:
        return float(model_err)
    return float(errs[block][layer])


def set_selection(parts: Sequence[TrialPart], layer: tuple[int, ...], c: int) -> None:
    """Select candidate `c` at `layer` in every part."""
    for part in parts:
        sel = np.array(part.sel.get_value())
        sel[layer] = c
        part.sel.set_value(jax.device_put(sel))


def group_signature(perm: np.ndarray, group: int) -> tuple:
    """Which channels share each quantization group (the order inside a group changes nothing)."""
    p = np.asarray(perm)
    return tuple(tuple(sorted(p[i : i + group].tolist())) for i in range(0, p.size, group))


def timer() -> float:
    return time.perf_counter()


__all__ = [
    "ACCEPT_LEVELS", "BlockProbe", "Decision", "Evaluator", "ProbeStat", "TrialInput", "TrialLinear", "TrialPart",
    "TrialSel", "block_errors", "find_blocks", "float_outputs", "group_signature", "measure", "path_str",
    "set_selection",
]


# --------------------------------------------------------------------------- public: per-block errors


class _PairProbe(nnx.Module):
    """Stands in for a float block: runs it and the quantized block on the same (float) input, accumulates
    the squared error of the quantized outputs and the reference energy, returns the FLOAT output."""

    def __init__(self, ref: nnx.Module, quant: nnx.Module, stack: tuple[int, ...]):
        self.ref_block = ref
        self.quant_block = quant
        self.err = ProbeStat(_zeros(stack, np.float32))
        self.ref = ProbeStat(_zeros(stack, np.float32))

    def __call__(self, *args, **kwargs):
        ref = self.ref_block(*args, **kwargs)
        out = self.quant_block(*args, **kwargs)
        self.err[...] = self.err[...] + _sq_diff(out, ref)
        self.ref[...] = self.ref[...] + _sq(ref)
        return ref


def block_errors(float_model: nnx.Module, quant_model: nnx.Module, batches: Sequence[Any], *,
                 blocks: Sequence[str | Path] | None = None, forward: Callable | None = None
                 ) -> dict[str, np.ndarray]:
    """Relative squared error of every block of `quant_model` against `float_model`, on float inputs.

    Each block (an element of an `nnx.List`, a stacked module run under a scan, or a path in `blocks`)
    is run on the input the FLOAT model gives it, quantized and in float; the sum over `batches` of the
    squared difference of its outputs (every floating array leaf, bias included: residual streams)
    divided by the sum of the float outputs' squares. Returns {block path: array of the stack shape
    (`()` for an unstacked block)}. Both models keep their modules (the probes are removed afterwards).
    forward: `forward(model, batch)` (default: `calibrate.default_forward`).
    """
    from permuquant_jax.quant.calibrate import default_forward, restore, run_passes, substitute
    from permuquant_jax.quant.paths import find_linears

    if blocks is None:
        found = find_blocks(float_model, list(find_linears(float_model)))
        block_paths = list(dict.fromkeys(b for b in found.values() if b is not None))
    else:
        from permuquant_jax.quant.paths import parse_path

        block_paths = [parse_path(b) for b in blocks]
    if not block_paths:
        raise ValueError("no blocks found in the float model; pass blocks=[module paths]")

    def make(p, m):
        lin = find_linears(m)
        st = tuple(next(iter(lin.values())).kernel.get_value().shape[:-2]) if lin else ()
        return _PairProbe(m, get_node(quant_model, p), st)

    orig = substitute(float_model, block_paths, make)
    try:
        run_passes(float_model, batches, forward=forward or default_forward, variables=ProbeStat,
                   desc="block errors", progress=False)
        out = {}
        for p in block_paths:
            pr = get_node(float_model, p)
            out[path_str(p)] = (np.asarray(pr.err[...], np.float64)
                                / np.maximum(np.asarray(pr.ref[...], np.float64), 1e-30))
    finally:
        restore(float_model, orig)
    return out


# --------------------------------------------------------------------------- the decision loop


@dataclass
class SiteTrial:
    """What the decision loop needs of one site: its candidate arrays and their layer-local errors."""

    index: int
    name: str
    labels: list[list[str]]  # per layer (ndindex order of the stack), the candidate labels
    perms: np.ndarray  # [*stack, C, n]
    scales: np.ndarray | None  # [*stack, C, n]
    layer_choose: np.ndarray  # [*stack, C] layer-local relative error on the choosing batches
    noop: np.ndarray  # [*stack, C] bool: the candidate leaves every quantization group as identity does
    score: np.ndarray | None = None  # [*stack, n] channel score (log mu_a + log mu_w) for refinement
    segments: tuple[int, ...] | None = None
    group: int = 16
    refine_slot: int | None = None  # candidate index kept free for refined orders
    parts: list[TrialPart] = field(default_factory=list)


def _decide_stack(ev: Evaluator, t: SiteTrial, i: int, b: Path, top_k: int, tau: float, choose_batches, refs_c,
                  held_batches, refs_h, out: dict) -> None:
    """One site at every layer of a stacked block at once (schedule "parallel", block level): each pass
    sets the r-th best candidate (by layer-local error) of every layer and measures every layer's block
    error; per layer the best is validated on the held-out batches (one pass for all layers)."""
    stack = t.perms.shape[:-2]
    layers = list(np.ndindex(stack))
    t0, n0 = timer(), ev.forwards
    ranked = {}
    for layer in layers:
        rel = t.layer_choose[layer]
        ok = [c for c in range(1, rel.shape[-1]) if not t.noop[layer][c]]
        ranked[layer] = sorted(ok, key=lambda c, rel=rel: (rel[c], c))[:top_k]
    base = ev.run(choose_batches, refs_c)[0][b]
    tried = {layer: {} for layer in layers}
    for r in range(max((len(v) for v in ranked.values()), default=0)):
        for layer in layers:
            set_selection(t.parts, layer, ranked[layer][r] if r < len(ranked[layer]) else 0)
        errs = ev.run(choose_batches, refs_c)[0][b]
        for layer in layers:
            if r < len(ranked[layer]):
                tried[layer][ranked[layer][r]] = float(errs[layer])
    best = {layer: min(tried[layer], key=lambda c, tl=tried[layer]: (tl[c], c)) for layer in layers if tried[layer]}
    better = {layer: c for layer, c in best.items() if tried[layer][c] < base[layer]}
    for layer in layers:
        set_selection(t.parts, layer, 0)
    held_before = held_after = None
    if better:
        held_before = ev.run(held_batches, refs_h)[0][b]
        for layer, c in better.items():
            set_selection(t.parts, layer, c)
        held_after = ev.run(held_batches, refs_h)[0][b]
    for li, layer in enumerate(layers):
        info: dict[str, Any] = {"level": "block", "block": path_str(b), "schedule": "parallel", "note": ""}
        out["chosen"][i][layer] = 0
        if not ranked[layer]:
            info["note"] = "skipped: no candidate changes which channels share a quantization group"
            out["info"][(i, layer)] = info
            continue
        c = best[layer]
        info.update(tried=[{"label": t.labels[li][k], "choose": v} for k, v in tried[layer].items()],
                    best=t.labels[li][c], choose_before=float(base[layer]), choose_best=tried[layer][c])
        kept = False
        if layer in better:
            hb_, ha = float(held_before[layer]), float(held_after[layer])
            info.update(heldout_before=hb_, heldout_best=ha)
            kept = hb_ > 0 and (hb_ - ha) / hb_ > tau
        if kept:
            out["chosen"][i][layer] = c
        else:
            set_selection(t.parts, layer, 0)
        info.update(accepted=bool(kept), forwards=(ev.forwards - n0) / len(layers),
                    seconds=(timer() - t0) / len(layers))
        out["info"][(i, layer)] = info


def _guard(ev: Evaluator, guard: float, trials: dict[int, SiteTrial], trial_of: dict, hadamard: dict,
           block_of: dict, sites_in: dict, held_batches, refs_h, out: dict) -> dict:
    """No block (layer of a stack) and no model output left worse than the starting state on the held-out
    batches by more than `guard`: undo, in this order and measuring after each round, the site decisions
    of the blocks that are, the Hadamard choices of their linears, and finally every decision. Each round
    is two held-out passes at most (the starting state is measured once). Returns what was undone."""
    sel = {id(p): np.array(p.sel.get_value()) for t in trials.values() for p in t.parts}
    hsel = {p: np.array(tr.hsel.get_value()) for p, tr in trial_of.items()}

    def set_state(s_parts, s_h):
        for t in trials.values():
            for part in t.parts:
                part.sel.set_value(jax.device_put(s_parts[id(part)]))
        for p, tr in trial_of.items():
            tr.hsel.set_value(jax.device_put(s_h[p]))

    start_parts = {k: np.zeros_like(v) for k, v in sel.items()}
    start_h = {p: np.full_like(v, hadamard[p][1]) for p, v in hsel.items()}
    set_state(start_parts, start_h)
    ref_b, ref_m = ev.run(held_batches, refs_h)
    set_state(sel, hsel)
    cur_b, cur_m = ev.run(held_batches, refs_h)

    def worse():
        return [(b, layer) for b, e in cur_b.items() for layer in np.ndindex(np.shape(e))
                if e[layer] > (1 + guard) * ref_b[b][layer]]

    rep: dict[str, Any] = {"tolerance": guard, "start_model_error": float(ref_m), "model_error": float(cur_m),
                           "sites_undone": [], "hadamard_undone": [], "all_undone": False}
    bad = worse()
    if bad:  # round 1: the site decisions of the worse blocks (at the worse layers)
        for b, layer in bad:
            for i in sites_in.get(b, []):
                lay = layer if layer in out["chosen"][i] else None
                if lay is None or out["chosen"][i][lay] == 0:
                    continue
                set_selection(trials[i].parts, lay, 0)
                out["chosen"][i][lay] = 0
                out["info"][(i, lay)].update(accepted=False, note="undone by the block guard")
                out["refined"].pop((i, lay), None)
                rep["sites_undone"].append([trials[i].name, list(lay)])
        cur_b, cur_m = ev.run(held_batches, refs_h)
        bad = worse()
    if bad:  # round 2: the Hadamard choices of the linears of the blocks still worse (every layer)
        blocks = {b for b, _ in bad}
        for p, tr in trial_of.items():
            if block_of[p] in blocks and np.any(np.asarray(tr.hsel.get_value()) != hadamard[p][1]):
                tr.hsel.set_value(jax.device_put(start_h[p]))
                info = out["hadamard_info"].get(path_str(p))
                if info is not None:
                    info.update(kept=False, note="undone by the block guard")
                rep["hadamard_undone"].append(path_str(p))
        cur_b, cur_m = ev.run(held_batches, refs_h)
    if cur_m > (1 + guard) * ref_m:  # round 3: the model output is worse than the start: undo everything
        set_state(start_parts, start_h)
        for i, ch in out["chosen"].items():
            for lay, c in ch.items():
                if c:
                    ch[lay] = 0
                    out["info"][(i, lay)].update(accepted=False, note="undone by the model guard")
        out["refined"].clear()
        for info in out["hadamard_info"].values():
            if info.get("kept"):
                info.update(kept=False, note="undone by the model guard")
        rep["all_undone"] = True
        cur_b, cur_m = ref_b, ref_m
    rep["final_model_error"] = float(cur_m)
    rep["worst_block_ratio"] = max((float(e[lay] / max(ref_b[b][lay], 1e-30)) for b, e in cur_b.items()
                                    for lay in np.ndindex(np.shape(e))), default=None)
    return rep


def _refine(t: SiteTrial, layer, best: int, errs: dict, steps: int, measure_now, info: dict, flat: int) -> int:
    """Refine the order of candidate `best` by `steps` proposed swaps, each kept only if the measured
    error falls; the refined order goes to the site's free slot. Returns the index to use."""
    if t.scales is not None and not np.all(t.scales[layer][best] == 1):
        return best
    slot = t.refine_slot
    cur, cur_err, kept = np.array(t.perms[layer][best]), errs[best], 0
    trace = []
    for step in range(steps):
        prop = propose_swap(cur, t.score[layer], t.group, t.segments, step)
        if prop is None:
            break
        _write_slot(t, layer, slot, prop)
        set_selection(t.parts, layer, slot)
        e = measure_now()
        trace.append(e)
        if e < cur_err:
            cur, cur_err, kept = prop, e, kept + 1
    info["refine"] = {"steps": len(trace), "kept": kept, "errors": trace}
    if not kept:
        return best
    _write_slot(t, layer, slot, cur)
    errs[slot] = cur_err
    t.labels[flat][slot] = f"refined({t.labels[flat][best]}, {kept} swaps)"
    return slot


def _write_slot(t: SiteTrial, layer, slot: int, perm: np.ndarray) -> None:
    t.perms[(*layer, slot)] = perm
    for part in t.parts:
        part.perms.set_value(jax.device_put(t.perms))


def propose_swap(perm: np.ndarray, score: np.ndarray, group: int, segments: Sequence[int] | None,
                 step: int) -> np.ndarray | None:
    """A deterministic refinement move: in the group of largest score spread (the `step`-th by spread),
    the channel farthest from the group's median goes to the group (same segment) whose median is
    closest to its score, swapped with that group's channel farthest from its own median."""
    perm = np.asarray(perm)
    n = perm.size
    segs = list(segments) if segments else [n]
    seg_of = np.repeat(np.arange(len(segs)), segs)[::group]  # segment of each group
    s = np.asarray(score, np.float64)[perm].reshape(-1, group)
    med = np.median(s, axis=1)
    far = np.abs(s - med[:, None])
    spread = s.max(1) - s.min(1)
    order = np.argsort(-spread, kind="stable")
    if len(order) < 2:
        return None
    g = int(order[step % len(order)])
    i = int(np.argmax(far[g]))
    others = [h for h in range(len(s)) if h != g and seg_of[h] == seg_of[g]]
    if not others:
        return None
    h = min(others, key=lambda h: (abs(med[h] - s[g, i]), h))
    j = int(np.argmax(far[h]))
    out = perm.copy()
    a, b = g * group + i, h * group + j
    out[a], out[b] = out[b], out[a]
    return out


def quantized_amax(
    model: nnx.Module,
    *,
    targets: Sequence[Path],
    parts_of: dict[Path, list[tuple[int, int, int]]],
    sites: dict[int, tuple[np.ndarray, np.ndarray | None, dict[tuple[int, ...], int]]],
    hadamard: dict[Path, int | None],
    format: str,
    forward: Callable,
    batches: Sequence[Any],
    progress: bool = False,
) -> dict[Path, np.ndarray]:
    """Static activation amax `[*stack]` of every target: the largest |input| it sees, after its site transforms
    and Hadamard, in the fake-quantized model (every target quantized with its chosen candidate) over `batches`
    (one pass). The same measure `decide` ends with, for methods and levels that do not run it, so that every
    method's static scales come from the same data.

    sites: per site (perms `[*stack, C, n]`, scales or None, the chosen candidate per layer)."""
    from permuquant_jax.quant.calibrate import restore, run_passes, substitute

    def make_trial(p, lin):
        parts = []
        for i, start, size in parts_of.get(p, []):
            perms, scales, chosen = sites[i]
            part = TrialPart(start, size, perms, scales)
            sel = np.zeros(perms.shape[:-2], np.int32)
            for idx, c in chosen.items():
                sel[idx] = c
            part.sel.set_value(jax.device_put(sel))
            parts.append(part)
        return TrialLinear(lin, parts, format, (hadamard.get(p) or 0,), 0)

    orig = substitute(model, targets, make_trial)
    try:
        run_passes(model, batches, forward=forward, variables=ProbeStat, desc="activation amax", progress=progress)
        return {p: np.asarray(get_node(model, p).amax[...]) for p in targets}
    finally:
        restore(model, orig)


def decide(
    model: nnx.Module,
    *,
    targets: Sequence[Path],
    parts_of: dict[Path, list[tuple[int, int, int]]],
    trials: dict[int, SiteTrial],
    format: str,
    hadamard: dict[Path, tuple[tuple[int, ...], int]],
    choose_hadamard: bool,
    level: str,
    top_k: int,
    tau: float,
    blocks: Sequence[str | Path] | None,
    forward: Callable,
    choose_batches: Sequence[Any],
    held_batches: Sequence[Any],
    all_batches: Sequence[Any],
    refine: int = 0,
    progress: bool = False,
    schedule: str = "sequential",
    hadamard_sizes: bool = True,
    hadamard_start: str = "none",
    guard: float | None = 0.01,
) -> dict[str, Any]:
    """Sequential downstream decisions (see the module docstring).

    hadamard: per linear (the block sizes its trial chooses among, 0 = none; the starting index).
    choose_hadamard: choose among them (method auto). hadamard_sizes: a linear with ONE block b > 0
    (PermuQuant-H) chooses among b, the other sizes aligned with the format's groups and its column
    parts (`permute.aligned_hadamard_blocks`) and none, starting from no rotation (`hadamard_start`
    "none": RTN is the reference, as for every other decision) or from b ("block": plain Hadamard is);
    each change is kept only if it lowers the held-out error at `level` by more than `tau`.
    guard: after every decision, the held-out error of each block (each layer of a stack) and of the model
    output is compared with the starting state's (RTN, or plain Hadamard with `hadamard_start` "block");
    a block more than `guard` (relative) worse gets its site decisions undone, then, if still worse, its
    linears' Hadamard choices; a model output still worse than the start undoes everything (`_guard`).
    None: no guard.
    Returns {"chosen": {site: {layer: c}}, "info": {(site, layer): dict}, "hadamard": {path: block or None},
    "amax": {path: [*stack]}, "hadamard_info": {path: dict}, "forwards": int, "seconds": float,
    "blocks": {path: block path}, "guard": dict (what the guard undid)}."""
    t_start = timer()
    block_of = find_blocks(model, targets, blocks)
    refs_all = float_outputs(model, all_batches, forward)
    ref_of = {id(b): r for b, r in zip(all_batches, refs_all, strict=True)}

    def refs_for(batches):
        missing = [b for b in batches if id(b) not in ref_of]
        ref_of.update({id(b): r for b, r in zip(missing, float_outputs(model, missing, forward), strict=True)})
        return [ref_of[id(b)] for b in batches]

    refs_c, refs_h = refs_for(choose_batches), refs_for(held_batches)
    hadamard = dict(hadamard)
    if hadamard_sizes and not choose_hadamard:
        from permuquant_jax.formats.registry import get_format
        from permuquant_jax.quant.permute import aligned_hadamard_blocks

        group = get_format(format).group
        for p in targets:
            hb0, _ = hadamard[p]
            if len(hb0) == 1 and hb0[0]:
                k = get_node(model, p).kernel.get_value().shape[-2]
                cuts = [c for _, s, n in parts_of.get(p, []) for c in (s, s + n)]
                sizes = aligned_hadamard_blocks(k, group, starts=cuts)
                opts = (hb0[0], *(b for b in sizes if b != hb0[0]))
                hadamard[p] = ((0, *opts), 0) if hadamard_start == "none" else ((*opts, 0), 0)

    def make_trial(p, lin):
        parts = []
        for i, start, size in parts_of[p]:
            t = trials[i]
            part = TrialPart(start, size, t.perms, t.scales)
            t.parts.append(part)
            parts.append(part)
        hb, h0 = hadamard[p]
        trial_of[p] = TrialLinear(lin, parts, format, hb, h0)
        return trial_of[p]

    from permuquant_jax.quant.calibrate import restore, substitute

    trial_of: dict[Path, TrialLinear] = {}
    orig_t = substitute(model, targets, make_trial)
    block_paths: list[Path] = []
    for p in targets:
        b = block_of[p]
        if b is not None and b not in block_paths:
            block_paths.append(b)
    stack_of = {b: tuple(trial_of[next(p for p in targets if block_of[p] == b)].inner.kernel.get_value()
                         .shape[:-2]) for b in block_paths}
    try:
        orig_b = substitute(model, block_paths, lambda p, m: BlockProbe(m, stack_of[p]))
    except Exception:
        restore(model, orig_t)
        raise
    out: dict[str, Any] = {"chosen": {i: {} for i in trials}, "info": {}, "hadamard": {}, "hadamard_info": {},
                           "refined": {},
                           "amax": {}, "blocks": {path_str(p): (None if b is None else path_str(b))
                                                  for p, b in block_of.items()}}
    try:
        probes = {b: get_node(model, b) for b in block_paths}
        ev = Evaluator(model, forward, probes)
        cache: dict[Any, list] = {}

        def site_block(i: int) -> Path | None:
            bs = {block_of[r] for r, lst in parts_of.items() for (j, _, _) in lst if j == i}
            return bs.pop() if len(bs) == 1 else None

        def key(b, layer):
            return "model" if (level == "model" or b is None) else (b, layer)

        def err_at(b, layer, batches, refs):
            return measure(ev, level, b, layer, batches, refs)

        # ---- the Hadamard block per linear (auto: none or its block; permuquant-h: its block, the other
        # aligned sizes or none), all layers of a stack together, each change validated on held-out batches
        cur: dict[Any, tuple[float, float | None]] = {}  # error key -> (choose, held-out) in the current state
        for p in targets:
            hb, h0 = hadamard[p]
            if len(hb) < 2 or not (choose_hadamard or hadamard_sizes):
                continue
            trial = trial_of[p]
            b = block_of[p]
            n0 = ev.forwards
            hk = "model" if (level == "model" or b is None) else b
            stack = np.shape(trial.hsel.get_value())

            def total(batches, refs, b=b):
                errs, me = ev.run(batches, refs)
                return float(me) if (level == "model" or b is None) else float(np.sum(errs[b]))

            def select(h, trial=trial, stack=stack):
                trial.hsel.set_value(jax.device_put(np.full(stack, h, np.int32)))

            if hk not in cur:
                cur[hk] = (total(choose_batches, refs_c), None)
            before_c = cur[hk][0]
            tried = {}
            for h in range(len(hb)):
                if h != h0:
                    select(h)
                    tried[h] = total(choose_batches, refs_c)
            best = min(tried, key=lambda h: (tried[h], h))
            kept = False
            before_h = after_h = None
            if tried[best] < before_c:
                select(best)
                after_h = total(held_batches, refs_h)
                select(h0)
                if cur[hk][1] is None:
                    cur[hk] = (before_c, total(held_batches, refs_h))
                before_h = cur[hk][1]
                kept = before_h > 0 and (before_h - after_h) / before_h > tau
            select(best if kept else h0)
            if kept:
                cur.clear()
                cur[hk] = (tried[best], after_h)
            cache.clear()
            out["hadamard_info"][path_str(p)] = {
                "block": hb[best] or None, "start": hb[h0] or None, "kept": bool(kept),
                "tried": {str(hb[h] or "none"): e for h, e in tried.items()},
                "choose_before": before_c, "choose_after": tried[best],
                "heldout_before": before_h, "heldout_after": after_h, "forwards": ev.forwards - n0}

        # ---- site decisions, block by block, layer by layer, site by site
        order: list[tuple[int, tuple[int, ...], Path | None]] = []
        sites_in: dict[Path | None, list[int]] = {}
        for i in sorted(trials):
            sites_in.setdefault(site_block(i), []).append(i)
        parallel = schedule == "parallel" and level == "block"
        for b in block_paths:
            if parallel and stack_of[b]:
                order += [(i, None, b) for i in sites_in.get(b, [])]  # every layer of the stack at once
                continue
            for layer in np.ndindex(stack_of[b]):
                order += [(i, layer, b) for i in sites_in.get(b, [])]
        for i in sites_in.get(None, []):
            order += [(i, layer, None) for layer in np.ndindex(trials[i].perms.shape[:-2])]

        from tqdm.auto import tqdm

        for i, layer, b in tqdm(order, desc=f"{level}-level decisions", disable=not progress, leave=False):
            t = trials[i]
            if layer is None:
                _decide_stack(ev, t, i, b, top_k, tau, choose_batches, refs_c, held_batches, refs_h, out)
                cache.clear()
                continue
            t0, n0 = timer(), ev.forwards
            flat = int(np.ravel_multi_index(layer, t.perms.shape[:-2])) if layer else 0
            rel = t.layer_choose[layer]
            cands = [c for c in range(1, rel.shape[-1]) if not t.noop[layer][c]]
            info: dict[str, Any] = {"level": "model" if (level == "model" or b is None) else "block",
                                    "block": None if b is None else path_str(b), "tried": [], "note": ""}
            out["chosen"][i][layer] = 0
            if not cands:
                info["note"] = "skipped: no candidate changes which channels share a quantization group"
                out["info"][(i, layer)] = info
                continue
            cands = sorted(cands, key=lambda c: (rel[c], c))[:top_k]
            k = key(b, layer)
            if k not in cache:
                cache[k] = [err_at(b, layer, choose_batches, refs_c), None]
            before_c = cache[k][0]
            errs = {}
            for c in cands:
                set_selection(t.parts, layer, c)
                errs[c] = err_at(b, layer, choose_batches, refs_c)
            best = min(cands, key=lambda c: (errs[c], c))
            if refine and t.refine_slot is not None and t.score is not None and errs[best] < before_c:
                def again(b=b, layer=layer):
                    return err_at(b, layer, choose_batches, refs_c)

                best = _refine(t, layer, best, errs, refine, again, info, flat)
            info.update(tried=[{"label": t.labels[flat][c], "choose": errs[c]} for c in cands],
                        best=t.labels[flat][best], choose_before=before_c, choose_best=errs[best])
            kept = False
            if errs[best] < before_c:
                set_selection(t.parts, layer, 0)
                if cache[k][1] is None:
                    cache[k][1] = err_at(b, layer, held_batches, refs_h)
                before_h = cache[k][1]
                set_selection(t.parts, layer, best)
                best_h = err_at(b, layer, held_batches, refs_h)
                info.update(heldout_before=before_h, heldout_best=best_h)
                kept = before_h > 0 and (before_h - best_h) / before_h > tau
            set_selection(t.parts, layer, best if kept else 0)
            if kept and best == t.refine_slot:
                out["refined"][(i, layer)] = (t.labels[flat][best], np.array(t.perms[layer][best]))
            if kept:
                out["chosen"][i][layer] = best
                cache.pop("model", None)
                cache[k] = [errs[best], info["heldout_best"]]
            info.update(accepted=bool(kept), forwards=ev.forwards - n0, seconds=timer() - t0)
            out["info"][(i, layer)] = info

        if guard is not None and (out["info"] or out["hadamard_info"]):
            out["guard"] = _guard(ev, guard, trials, trial_of, hadamard, block_of, sites_in, held_batches, refs_h,
                                  out)

        # ---- the final state over every batch: static activation amax of each transformed input
        errs_all, out["model_error"] = ev.run(all_batches, refs_all)
        out["block_errors"] = {path_str(b): np.asarray(e).tolist() for b, e in errs_all.items()}
        for p in targets:
            trial = trial_of[p]
            out["amax"][p] = np.asarray(trial.amax[...])
            hb, _ = hadamard[p]
            h = np.asarray(trial.hsel.get_value())
            out["hadamard"][p] = (hb[int(h.reshape(-1)[0])] or None) if h.size else (hb[int(h)] or None)
        out["forwards"] = ev.forwards
    finally:
        restore(model, orig_b)
        restore(model, orig_t)
    out["seconds"] = timer() - t_start
    return out
