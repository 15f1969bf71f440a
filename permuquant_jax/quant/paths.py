"""Module paths of an NNX model: tuple/dotted forms, lookup and replacement, linears, keep patterns.

The lowest layer of `quant`: nothing here knows about sites, folding or quantization.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from flax import nnx

Path = tuple[Any, ...]


def path_str(path: Path) -> str:
    """'double_blocks.img_attn.qkv' for ('double_blocks', 'img_attn', 'qkv')."""
    return ".".join(str(p) for p in path)


def parse_path(path: str | Path) -> Path:
    """The tuple form of a dotted module path (integers for list indices)."""
    if isinstance(path, tuple):
        return path
    return tuple(int(p) if p.isdigit() else p for p in path.split("."))




def get_node(model: nnx.Module, path: Path) -> Any:
    """The submodule / variable / attribute of `model` at `path`."""
    node: Any = model
    for p in parse_path(path):
        try:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        except (AttributeError, IndexError, KeyError, TypeError):
            raise KeyError(f"no module at path {path_str(parse_path(path))!r} (missing {p!r})") from None
    return node


def set_node(model: nnx.Module, path: Path, value: Any) -> None:
    """Replace the submodule of `model` at `path` by `value`."""
    path = parse_path(path)
    parent = get_node(model, path[:-1])
    last = path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def is_linear(node: Any) -> bool:
    """A float linear layer with `kernel [*stack, in, out]` and `bias [*stack, out]` or None: `nnx.Linear`
    or the model package's `Linear` (not `LinearGeneral`/`Einsum`, whose kernels mean something else)."""
    from permuquant_jax.models.layers import Linear as ModelLinear

    return isinstance(node, nnx.Linear | ModelLinear) and isinstance(getattr(node, "kernel", None), nnx.Param)


def find_linears(model: nnx.Module) -> dict[Path, nnx.Module]:
    """Every float linear of `model`, by path, in graph order."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if is_linear(node):
            out[tuple(path)] = node
    return out


def match_any(path: Path | str, patterns: Iterable[str]) -> bool:
    """Whether the dotted path matches one of the patterns (fnmatch globs, or `re:` regexes)."""
    s = path if isinstance(path, str) else path_str(path)
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                if re.fullmatch(pat[3:], s):
                    return True
            except re.error as e:
                raise ValueError(f"pattern {pat!r} is not a valid regular expression ({e}); write 're:' and "
                                 "a Python regex, or an fnmatch glob without 're:'") from None
        elif fnmatch.fnmatchcase(s, pat):
            return True
    return False


def kernel_of(model: nnx.Module, path: Path) -> np.ndarray:
    """The float kernel `[*stack, in, out]` of the linear at `path` (float32 numpy)."""
    return np.asarray(get_node(model, path).kernel.get_value(), np.float32)


def stack_shape(model: nnx.Module, path: Path) -> tuple[int, ...]:
    """Leading stack axes of a (possibly scanned) linear's kernel."""
    return tuple(get_node(model, path).kernel.get_value().shape[:-2])


def module_paths(model: nnx.Module) -> list[str]:
    """Every submodule's dotted path (graph order)."""
    return [path_str(tuple(p)) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and p]


def warn_unmatched_keep(keep: Iterable[str], linears: dict[Path, Any], model: nnx.Module | None = None) -> list[str]:
    """Warn (UserWarning) for every keep pattern that matches no linear, naming the closest module paths.
    Returns the unmatched patterns."""
    import difflib
    import warnings

    names = [path_str(p) for p in linears]
    bad = [pat for pat in keep if not any(match_any(n, [pat]) for n in names)]
    for pat in bad:
        pool = sorted(set(names) | {n.rsplit(".", 1)[0] for n in names if "." in n})
        # nnx.Sequential / nnx.List put `.layers.` before the index: 'mlp.0' is 'mlp.layers.0'
        seq = re.sub(r"(^|\.)(\d+)(?=\.|$)", r"\1layers.\2", pat)
        close = [n for n in names if seq != pat and match_any(n, [seq])][:3]
        close += [c for c in difflib.get_close_matches(pat[3:] if pat.startswith("re:") else pat, pool, n=3,
                                                       cutoff=0.3) if c not in close]
        hint = f"; closest module paths: {', '.join(close)}" if close else ""
        warnings.warn(f"keep pattern {pat!r} matches no linear layer{hint}", UserWarning, stacklevel=3)
    return bad


def skipped_modules(model: nnx.Module, keep: Iterable[str] = ()) -> dict[str, str]:
    """Modules with a kernel that are not quantized because of their type ({path: type name}), e.g.
    convolutions, `LinearGeneral`, `Einsum` (the method quantizes plain linears only)."""
    out = {}
    for p, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or is_linear(node):
            continue
        k = getattr(node, "kernel", None)
        if isinstance(k, nnx.Variable) and type(node).__name__ != "QuantLinear":
            out[path_str(tuple(p))] = type(node).__name__
    return out
