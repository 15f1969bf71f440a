"""The site plan of a model: completing a plan with gather sites, the dry-run summary, and giving a
float model the structure of a quantized one (for loading saved weights)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.quant.linear import QuantLinear
from permuquant_jax.quant.paths import (
    Path,
    find_linears,
    get_node,
    match_any,
    parse_path,
    path_str,
    set_node,
    stack_shape,
)
from permuquant_jax.quant.report import QuantReport
from permuquant_jax.quant.sites import Site, gather_sites, validate_sites


def plan_sites(model: nnx.Module, targets: Sequence[Path], sites: Sequence[Site] | None) -> list[Site]:
    """The plan completed with gather sites; ValueError if a target is only partly covered."""
    sites = list(sites or [])
    validate_sites(model, sites)
    covered: dict[Path, list[tuple[int, int]]] = {}
    for s in sites:
        for r in s.consumers:
            covered.setdefault(r.path, []).append((r.start, r.start + s.size))
    extra = []
    for p in targets:
        k = get_node(model, p).kernel.get_value().shape[-2]
        ranges = sorted(covered.get(p, []))
        if not ranges:
            extra.append(p)
            continue
        pos = 0
        for a, b in ranges:
            if a != pos:
                break
            pos = b
        if pos != k:
            raise ValueError(
                f"the site plan covers input columns {ranges} of {path_str(p)!r}, which has {k}: a quantized "
                "linear must be covered completely by non-overlapping sites (or by none: it then gets a "
                "gather site)"
            )
    return sites + gather_sites(model, extra)


def plan_summary(
    model: nnx.Module, *, sites: Sequence[Site] | None = None, keep: Sequence[str] = (), format: str = "nvfp4"
) -> dict[str, Any]:
    """What `quantize_model` would do, without calibrating: for a dry run.

    Returns {"layers": [{path, in_features, out_features, stack, keep, bytes_before, bytes_after}],
    "sites": [{name, kind, size, consumers, producers, layers}], "bytes_before", "bytes_after"}. Bytes
    count kernels and biases; quantized weights at the format's bits per weight (+ 4 bytes of global
    scale per layer), biases unchanged.
    """
    from permuquant_jax.formats.registry import get_format

    fmt = get_format(format)
    linears = find_linears(model)
    targets = [p for p in linears if not match_any(p, keep)]
    plan = plan_sites(model, targets, sites)
    layers, before, after = [], 0, 0
    for p, lin in linears.items():
        k = lin.kernel.get_value()
        bias = getattr(lin, "bias", None)
        nb = 0 if bias is None else bias.get_value().size * bias.get_value().dtype.itemsize
        b0 = k.size * k.dtype.itemsize + nb
        kept = p not in set(targets)
        n_layers = int(np.prod(k.shape[:-2], dtype=np.int64))
        b1 = b0 if kept else int(k.size * fmt.bits_per_weight / 8) + 4 * n_layers + nb
        before, after = before + b0, after + b1
        layers.append({"path": path_str(p), "in_features": int(k.shape[-2]), "out_features": int(k.shape[-1]),
                       "stack": list(k.shape[:-2]), "keep": kept, "bytes_before": int(b0), "bytes_after": int(b1)})
    site_rows = [{
        "name": s.name, "kind": s.kind, "size": s.size,
        "consumers": [path_str(r.path) for r in s.consumers],
        "producers": [path_str(r.path) for r in s.producers] + ([path_str(s.norm.modulation)] if s.norm else []),
        "layers": int(np.prod(stack_shape(model, s.consumers[0].path), dtype=np.int64)),
    } for s in plan if any(r.path in set(targets) for r in s.consumers)]
    return {"layers": layers, "sites": site_rows, "bytes_before": int(before), "bytes_after": int(after)}


def apply_structure(model: nnx.Module, report: QuantReport) -> nnx.Module:
    """Give a float model (e.g. a freshly built or abstract FluxDiT) the structure of the quantized
    model that `report` describes: a `QuantLinear` of the right format and shapes at every quantized
    path and the norm gather indices, all with placeholder values. Then `nnx.update(model, state)` with
    the quantized model's saved state (e.g. from orbax) restores it exactly. Returns `model`.
    """
    for path, d in report.layers.items():
        q = QuantLinear(
            d["in_features"], d["out_features"], format=d["format"], stack=tuple(d["stack"]),
            use_bias=d["use_bias"], hadamard_block=d["hadamard_block"], param_dtype=jnp.dtype(d["param_dtype"]),
        )
        stack, k = tuple(d["stack"]), d["in_features"]
        if d["gather"]:
            q.gather.set_value(jax.device_put(np.zeros((*stack, k), np.int32)))
        if d["smooth"]:
            q.smooth.set_value(jax.device_put(np.ones((*stack, k), np.float32)))
        if d["act_global_scale"] is not None:
            q.act_scale.set_value(jax.device_put(np.ones(stack, np.float32)))
        set_node(model, parse_path(path), q)
    for path, shape in report.gather_indices.items():
        pp = parse_path(path)
        try:
            var = get_node(model, pp)
        except KeyError:
            if pp[-1] != "index":
                raise
            from permuquant_jax.quant.fold import GatheredNorm

            norm = GatheredNorm(get_node(model, pp[:-1]), shape[-1])  # an adaln site's gathered norm
            set_node(model, pp[:-1], norm)
            var = norm.index
        var.set_value(jax.device_put(np.zeros(tuple(shape), np.int32)))
    return model
