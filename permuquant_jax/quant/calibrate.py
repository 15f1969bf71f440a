"""Calibration: jitted passes over a model with observer modules in place of its linears.

`calibrate(model, batches)` substitutes an `InputObserver` for every chosen linear, runs the model over
the batches inside `jax.jit` (one compilation, float32 accumulators whatever the model dtype, nothing
stored per token, so memory does not grow with the number of samples), restores the linears and returns
`CalibrationStats`: per linear input, the per-channel sum of x^2, max |x|, the token count and the
tensor amax (for static activation global scales). Stats save to / load from a single .npz.

Observers are ordinary NNX modules holding `nnx.Variable` accumulators, so they work inside scanned
(stacked) blocks: their accumulators carry the stack axes and the model's scan writes them back.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from permuquant_jax.quant.paths import Path, get_node, parse_path, path_str, set_node

Forward = Callable[[nnx.Module, object], object]
STATS_KIND = "permuquant-calibration-stats"
STATS_VERSION = 1


def default_forward(model: nnx.Module, batch: object) -> object:
    """Call the model on a batch: a dict as keyword arguments, a tuple/list as positional, else one arg."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def _zeros(shape, dtype) -> jax.Array:
    """Zeros built on the host (with jax.numpy, every new shape compiles a tiny XLA program)."""
    return jax.device_put(np.zeros(shape, dtype))


class ObserverStat(nnx.Variable):
    """An accumulator of an observer module (mutated by every forward pass)."""


class InputObserver(nnx.Module):
    """Stands in for a linear: returns `inner(x)` and accumulates statistics of x (float32)."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner
        kernel = inner.kernel.get_value()
        stack, k = kernel.shape[:-2], kernel.shape[-2]
        self.sumsq = ObserverStat(_zeros((*stack, k), np.float32))
        self.absmax = ObserverStat(_zeros((*stack, k), np.float32))
        self.count = ObserverStat(_zeros(stack, np.int32))
        self.amax = ObserverStat(_zeros(stack, np.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        ax = jnp.max(jnp.abs(xf), axis=0)
        self.sumsq[...] = self.sumsq[...] + jnp.sum(xf * xf, axis=0)
        self.absmax[...] = jnp.maximum(self.absmax[...], ax)
        self.count[...] = self.count[...] + xf.shape[0]
        self.amax[...] = jnp.maximum(self.amax[...], jnp.max(ax))
        return self.inner(x)


def substitute(
    model: nnx.Module, paths: Iterable[Path], make: Callable[[Path, nnx.Module], nnx.Module]
) -> dict:
    """Replace the modules at `paths` by `make(path, module)`; return {path: original} to `restore`."""
    originals = {}
    for p in paths:
        p = parse_path(p)
        orig = get_node(model, p)
        originals[p] = orig
        set_node(model, p, make(p, orig))
    return originals


def restore(model: nnx.Module, originals: dict) -> None:
    """Put back the modules replaced by `substitute`."""
    for p, orig in originals.items():
        set_node(model, p, orig)


def run_passes(
    model: nnx.Module,
    batches: Iterable[object],
    *,
    forward: Forward = default_forward,
    variables: type[nnx.Variable] = ObserverStat,
    desc: str = "calibration",
    progress: bool = True,
    total: int | None = None,
) -> int:
    """Run `forward(model, batch)` for every batch inside one jitted step that carries only the
    `variables` (donated, updated in place); the rest of the model is a read-only argument. Returns
    the number of batches run. The model's variables of that type hold the result afterwards."""
    graphdef, carried, rest = nnx.split(model, variables, ...)

    def step(carried, rest, batch):
        return _pass_step(graphdef, forward, variables, carried, rest, batch)

    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    n = 0
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        carried = step(carried, rest, batch)
        n += 1
    if n == 0:
        raise ValueError(f"{desc}: no calibration batches were given (expected at least one)")
    nnx.update(model, carried)
    return n


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pass_step(graphdef, forward, variables, carried, rest, batch):
    """One batch of a pass; module level with the graph static, so repeated passes over the same model
    structure (e.g. choosing and held-out batches) share one compilation."""
    m = nnx.merge(graphdef, carried, rest)
    forward(m, batch)
    return nnx.state(m, variables)


@dataclass
class LayerStats:
    """Input statistics of one (possibly stacked) linear; arrays carry the stack axes first."""

    sumsq: np.ndarray  # [*stack, K]
    absmax: np.ndarray  # [*stack, K]
    count: np.ndarray  # [*stack]
    amax: np.ndarray  # [*stack]

    @property
    def sq_mean(self) -> np.ndarray:
        """Per-channel E[x^2] `[*stack, K]` (float64)."""
        c = np.maximum(self.count.astype(np.float64), 1.0)[..., None]
        return self.sumsq.astype(np.float64) / c


@dataclass
class CalibrationStats:
    """Statistics of every observed linear input, by module path; `fingerprint` names shapes seen."""

    layers: dict[Path, LayerStats]
    batches: int = 0
    meta: dict = field(default_factory=dict)

    def __getitem__(self, path: Path | str) -> LayerStats:
        return self.layers[parse_path(path)]

    def fingerprint(self) -> str:
        """A hash of the observed paths and shapes (checked when stats are reused on a model)."""
        desc = sorted((path_str(p), list(s.sumsq.shape)) for p, s in self.layers.items())
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def save(self, file: str, meta: dict | None = None) -> None:
        """Write all statistics to one .npz (keys '<path>/<field>'), atomically (a temporary file in the
        same folder, then renamed): an interrupted write leaves no file. `meta` (JSON-safe: e.g. the
        model config and calibration settings) is stored with them and comes back in `meta` on load."""
        import os

        info = {"kind": STATS_KIND, "version": STATS_VERSION, "batches": self.batches,
                "fingerprint": self.fingerprint(), "meta": meta if meta is not None else self.meta}
        arrays = {"__meta__": np.frombuffer(json.dumps(info).encode(), np.uint8)}
        for p, s in self.layers.items():
            for f in ("sumsq", "absmax", "count", "amax"):
                arrays[f"{path_str(p)}/{f}"] = np.asarray(getattr(s, f))
        file = os.fspath(file)
        tmp = os.path.join(os.path.dirname(os.path.abspath(file)), f".{os.path.basename(file)}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, file: str) -> CalibrationStats:
        """Read statistics written by `save`; anything else (not an .npz, another kind or version of
        file, missing or malformed fields, non-finite values) is a one-line ValueError."""
        try:
            z = np.load(file, allow_pickle=False)
        except FileNotFoundError:
            raise ValueError(f"{file}: no such file (expected calibration statistics written by --save-stats)") \
                from None
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{file}: not a readable .npz of calibration statistics "
                             f"({' '.join(str(e).split())[:160]})") from None
        if not hasattr(z, "files"):
            raise ValueError(f"{file}: a single .npy array, not calibration statistics (write them with --save-stats)")
        with z:
            try:
                info = json.loads(bytes(z["__meta__"]).decode())
            except (KeyError, ValueError, UnicodeDecodeError):
                raise ValueError(f"{file}: an .npz without calibration-statistics metadata; write the file with "
                                 "--save-stats") from None
            if not isinstance(info, dict) or info.get("kind", STATS_KIND) != STATS_KIND:
                raise ValueError(f"{file}: not a calibration-statistics file (kind {info.get('kind')!r})")
            version = info.get("version", 0)
            if version > STATS_VERSION:
                raise ValueError(f"{file}: statistics format version {version}, this permuquant-jax reads up to "
                                 f"{STATS_VERSION}; upgrade permuquant-jax or recalibrate")
            fields: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                if key == "__meta__":
                    continue
                if "/" not in key:
                    raise ValueError(f"{file}: unexpected array {key!r} (expected '<module path>/<field>')")
                p, f = key.rsplit("/", 1)
                if f not in ("sumsq", "absmax", "count", "amax"):
                    raise ValueError(f"{file}: unexpected field {f!r} of {p!r} (expected sumsq, absmax, count, amax)")
                try:
                    fields.setdefault(p, {})[f] = z[key]
                except (OSError, ValueError, EOFError) as e:
                    raise ValueError(f"{file}: array {key!r} is unreadable ({' '.join(str(e).split())[:120]})") \
                        from None
        layers = {}
        for p, d in fields.items():
            missing = sorted({"sumsq", "absmax", "count", "amax"} - set(d))
            if missing:
                raise ValueError(f"{file}: statistics of {p!r} lack {', '.join(missing)}; recalibrate")
            st = LayerStats(**d)
            if st.sumsq.shape != st.absmax.shape or st.count.shape != st.sumsq.shape[:-1] \
                    or st.amax.shape != st.count.shape:
                raise ValueError(f"{file}: statistics of {p!r} have inconsistent shapes {st.sumsq.shape}, "
                                 f"{st.absmax.shape}, {st.count.shape}, {st.amax.shape}; recalibrate")
            for f in ("sumsq", "absmax", "amax"):
                a = getattr(st, f)
                if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
                    raise ValueError(f"{file}: {p}/{f} is not finite float data; recalibrate")
            layers[parse_path(p)] = st
        out = cls(layers=layers, batches=int(info.get("batches", 0)), meta=info.get("meta") or {})
        if "fingerprint" in info and info["fingerprint"] != out.fingerprint():
            raise ValueError(f"{file}: the arrays do not match the recorded fingerprint (a modified or mixed file); "
                             "recalibrate")
        return out

    def check_model(self, model: nnx.Module, paths: Sequence[Path]) -> None:
        """Raise ValueError if these stats do not cover `paths` with matching input shapes."""
        for p in paths:
            p = parse_path(p)
            if p not in self.layers:
                raise ValueError(
                    f"calibration statistics have no entry for {path_str(p)!r}; recalibrate this model "
                    f"(the stats cover {len(self.layers)} layers)"
                )
            shape = tuple(get_node(model, p).kernel.get_value().shape[:-1])
            if tuple(self.layers[p].sumsq.shape) != shape:
                raise ValueError(
                    f"calibration statistics for {path_str(p)!r} have shape {self.layers[p].sumsq.shape}, "
                    f"the model's input is {shape}; recalibrate this model"
                )


def calibrate(
    model: nnx.Module,
    batches: Iterable[object],
    paths: Sequence[Path],
    *,
    forward: Forward = default_forward,
    progress: bool = True,
) -> CalibrationStats:
    """Collect `CalibrationStats` for the inputs of the linears at `paths` (the model is left unchanged)."""
    originals = substitute(model, paths, lambda p, m: InputObserver(m))
    try:
        n = run_passes(model, batches, forward=forward, desc="calibration", progress=progress)
        layers = {}
        for p in originals:
            o = get_node(model, p)
            layers[p] = LayerStats(
                sumsq=np.asarray(o.sumsq[...]), absmax=np.asarray(o.absmax[...]),
                count=np.asarray(o.count[...]), amax=np.asarray(o.amax[...]),
            )
    finally:
        restore(model, originals)
    return CalibrationStats(layers=layers, batches=n)
