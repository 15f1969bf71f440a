"""`frozen_jit`: jit a function that only READS an nnx.Module (inference), without copying its weights.

`nnx.jit` writes the module's whole state back after every call: the compiled program returns every
variable as an output, so a forward pass holds a second copy of all weights on the device while it
runs (measured: a 22.2 GiB FLUX.1-dev DiT peaked at 44.4 GiB during sampling). For inference the
state does not change, so `frozen_jit` splits the module, jits a pure function of (graphdef, state,
*args) and returns only the function's result. The graphdef is a static argument: splitting the
same module again hits the same compilation.

Use it only where the function does not mutate the module (no RNG streams advanced, no batch
statistics, no caches written): such mutations would be silently dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx


def frozen_jit(
    fun: Callable[..., Any] | None = None, *, static_argnames: str | Sequence[str] = ()
) -> Callable[..., Any]:
    """Decorator: ``fun(module, *args, **kwargs)`` jitted over the module's arrays, returning only its result.

    ``static_argnames`` as in ``jax.jit`` (keyword arguments hashed into the compilation key).
    Usable as ``@frozen_jit`` or ``@frozen_jit(static_argnames=("tile",))``.
    """
    if fun is None:
        return functools.partial(frozen_jit, static_argnames=static_argnames)
    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)

    @functools.partial(jax.jit, static_argnums=0, static_argnames=names)
    def pure(graphdef, state, *args, **kwargs):
        return fun(nnx.merge(graphdef, state), *args, **kwargs)

    @functools.wraps(fun)
    def wrapper(module: nnx.Module, *args: Any, **kwargs: Any) -> Any:
        graphdef, state = nnx.split(module)
        return pure(graphdef, state, *args, **kwargs)

    wrapper.jitted = pure  # type: ignore[attr-defined]  # the jax.jit of (graphdef, state, *args)
    wrapper.lower = lambda module, *a, **k: pure.lower(*nnx.split(module), *a, **k)  # type: ignore[attr-defined]
    return wrapper
