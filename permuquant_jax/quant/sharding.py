"""Several devices with `jax.sharding`: data-parallel calibration / acceptance, FSDP-style float DiT.

No communication is written by hand: the model's state and the batches are placed with a
`NamedSharding` on a one-axis `Mesh` ("data") of the local devices, and `jax.jit` (GSPMD) partitions
the passes. The observers' and probes' accumulators are sums / maxima over the batch axis, so jit
reduces them across devices with its own collectives; the results equal one device's up to the
order of fp32 summation.

- `data_mesh(n)`: a mesh of the first `n` devices (None: all, multi-host included once
  `jax.distributed.initialize` has run).
- `shard_batch(batch, mesh)`: every array whose leading (sample) axis the mesh size divides is split
  along it; the others (e.g. shared position ids of another batch size) are replicated.
- `place_model(model, mesh, fsdp=False)`: the model's state replicated on every device, or with
  `fsdp=True` each stacked weight (ndim >= 3: [*stack, in, out]) split along its output axis where
  the mesh size divides it (the rest replicated), so a model that fits no single device can still
  run: jit gathers the slices each layer needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def data_mesh(n: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ("data") over the first `n` of `devices` (default: `jax.devices()`, every
    process's devices in a multi-host run)."""
    devs = list(devices if devices is not None else jax.devices())
    if n is None:
        n = len(devs)
    if not 1 <= n <= len(devs):
        raise ValueError(f"devices: asked for {n}, {len(devs)} available ({devs[0].platform}); pass a number "
                         f"between 1 and {len(devs)}")
    return Mesh(np.array(devs[:n]), (AXIS,))


def _leaf_sharding(x: Any, mesh: Mesh) -> NamedSharding:
    n = mesh.shape[AXIS]
    if getattr(x, "ndim", 0) >= 1 and x.shape[0] % n == 0 and n > 1:
        return NamedSharding(mesh, P(AXIS))
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """`batch` (any pytree of arrays, None leaves kept) with each array split along its leading axis
    over the mesh where the mesh size divides it, else replicated."""
    return jax.tree.map(lambda x: jax.device_put(x, _leaf_sharding(x, mesh)), batch)


def shard_batches(batches: Sequence[Any], mesh: Mesh) -> list[Any]:
    """`shard_batch` of every batch."""
    return [shard_batch(b, mesh) for b in batches]


def _param_spec(x: Any, mesh: Mesh, fsdp: bool) -> P:
    n = mesh.shape[AXIS]
    if fsdp and n > 1 and getattr(x, "ndim", 0) >= 3 and x.shape[-1] % n == 0:
        return P(*([None] * (x.ndim - 1)), AXIS)
    return P()


def place_model(model: nnx.Module, mesh: Mesh, *, fsdp: bool = False) -> nnx.Module:
    """Put every array of `model`'s state on the mesh (in place; returns `model`): replicated, or with
    `fsdp` stacked weights split along their output axis (see the module docstring)."""
    graphdef, state = nnx.split(model)

    def put(x):
        if not isinstance(x, jax.Array | np.ndarray):
            return x
        return jax.device_put(x, NamedSharding(mesh, _param_spec(x, mesh, fsdp)))

    nnx.update(model, jax.tree.map(put, state))
    return model


def sharded_bytes_per_device(model: nnx.Module) -> int:
    """Bytes of `model`'s state held by the most loaded device (its addressable shards)."""
    per: dict[Any, int] = {}
    for x in jax.tree.leaves(nnx.state(model)):
        if isinstance(x, jax.Array):
            for s in x.addressable_shards:
                per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values(), default=0)
