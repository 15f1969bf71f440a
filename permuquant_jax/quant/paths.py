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
            if re.fullmatch(pat[3:], s):
                return True
        elif fnmatch.fnmatchcase(s, pat):
            return True
    return False


def kernel_of(model: nnx.Module, path: Path) -> np.ndarray:
    """The float kernel `[*stack, in, out]` of the linear at `path` (float32 numpy)."""
    return np.asarray(get_node(model, path).kernel.get_value(), np.float32)


def stack_shape(model: nnx.Module, path: Path) -> tuple[int, ...]:
    """Leading stack axes of a (possibly scanned) linear's kernel."""
    return tuple(get_node(model, path).kernel.get_value().shape[:-2])

