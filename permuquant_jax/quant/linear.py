"""The quantized linear: an NNX module with the same `__call__(x)` as the model's `Linear`.

It holds the quantized weight (NVFP4: packed E2M1 codes `[*, N, K/2]`, E4M3 block scales `[*, N, K/16]`
and a float32 global scale per layer; other registry formats: the fake-quantized weight values
`[*, N, K]`), the bias, and the activation settings: an optional run-time smoothing vector (input
order), the gather index (`x[..., gather]`), the Hadamard block and the static activation global scale.
Leading `*` axes are stack axes of scanned blocks; a scan slices them like any other variable.

With `format=None` it is a float linear with the same input transforms (kernel `[*, K, N]`): that is
what folding a `gather` site into a float model produces, and the quantization step starts from it.
NVFP4 formats call `kernels.dispatch.nvfp4_linear`; the others use the registry's fake-quant math.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.formats.hadamard import block_hadamard
from permuquant_jax.models.flux import HOST_MEMORY_KIND
from permuquant_jax.quant.arrays import permute_axis


class QuantParam(nnx.Param):
    """Storage of a quantized weight (codes, block scales, global scales, or fake-quantized values)."""


class QuantInput(nnx.Variable):
    """Activation-side settings of a `QuantLinear`: gather index, smoothing vector, static global scale."""


class DeviceLayout(nnx.Variable):
    """A `QuantLinear`'s weight scales in this device's kernel layout (today: the Mosaic GPU kernel's scale
    words), built once by `prepare_device_layout`, which then drops the canonical `w_scales` (so the
    parameters take no more memory). Not the saved format: `drop_device_layouts` restores the canonical
    scales (lossless) before a model is written."""


def in_host_memory(x) -> bool:
    """Whether `x` is an array kept in host memory (a streamed model's blocks, `models.flux.offload_blocks`)."""
    return getattr(getattr(x, "sharding", None), "memory_kind", None) == HOST_MEMORY_KIND


def on_device(x):
    """`x` itself, or, for an array kept in host memory (`in_host_memory`), a copy in device memory to compute on."""
    if in_host_memory(x):
        return jax.device_put(x, jax.memory.Space.Device)
    return x


@jax.jit
def _mosaic_scale_words(scales: jax.Array) -> jax.Array:
    from permuquant_jax.kernels.nvfp4_matmul_mgpu import stored_scale_words

    return stored_scale_words(scales)


def _scales_from_words(words: jax.Array, n: int, k: int) -> jax.Array:
    """Canonical E4M3 scales `[*, n, k/16]` back from the Mosaic scale words `[*, Kp/64, Np]` (lossless)."""
    from permuquant_jax.kernels.nvfp4_matmul_mgpu import unpack_scale_words

    b = unpack_scale_words(words)[..., :n, : k // 16]
    return jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn)


# {layer key: largest number of rows seen} while `layer_rows` traces an example forward
_ROWS_SEEN: dict[str, int] | None = None


def _is_nvfp4(format: str | None) -> bool:
    return format is not None and format.startswith("nvfp4")


def _host_full(shape: Sequence[int], dtype, value: float = 0) -> jax.Array:
    """A constant array built on the host and copied over (building it with jax.numpy compiles one tiny
    XLA program per shape and dtype, which adds up to seconds when a model's layers are rebuilt)."""
    return jax.device_put(np.full(tuple(shape), value, dtype=jnp.dtype(dtype)))


def _vmap_leading(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


def _quantize_kernel(kernel: jax.Array, format: str, hadamard_block: int | None):
    """kernel `[*, K, N]` -> (the stored weight of rows `[*, N, K]` (rotated first), one global scale per
    layer; whether every kernel value is finite, as a device scalar). A stack larger than one chunk is
    quantized a layer at a time (each layer's numbers depend on that layer only, so the result is the
    same), which bounds the float32 working copy to one layer: for FLUX.1-dev's `linear1` [38, 3072,
    21504] that is 0.26 GB instead of ~19 GiB of transients."""
    stack = kernel.shape[:-2]
    if stack and int(np.prod(kernel.shape, dtype=np.int64)) // 16 > _MAX_CHUNK:
        layers = [_quantize_kernel(layer, format, hadamard_block) for layer in kernel.reshape(-1, *kernel.shape[-2:])]
        finite = jnp.all(jnp.stack([f for _, f in layers]))
        # the per-layer results (arrays, or NVFP4Tensor pytrees) stacked back to the kernel's leading shape
        return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*stack, *xs[0].shape), *(q for q, _ in layers)), finite
    if not _is_nvfp4(format):
        return _fake_quant_kernel(kernel, format, hadamard_block), _all_finite(kernel)
    from permuquant_jax.formats.nvfp4 import NVFP4Tensor

    stack, (k, n) = kernel.shape[:-2], kernel.shape[-2:]
    rows = int(np.prod(stack, dtype=np.int64)) * n * k // 16
    chunk = min(_MAX_CHUNK, max(_MIN_BUCKET, 1 << (rows - 1).bit_length()))
    blocks, amax, finite = _weight_blocks(kernel, hadamard_block, chunk)
    parts = [_quantize_blocks(blocks[i], amax[i]) for i in range(blocks.shape[0])]
    codes, scales, gs = _unblock(parts, (*stack, n, k))
    return NVFP4Tensor(codes=codes, scales=scales, global_scale=gs), finite


# NVFP4 weights are quantized as a flat list of 16-value blocks, in chunks of a power of two blocks (at
# least _MIN_BUCKET, at most _MAX_CHUNK; the last chunk padded with zero blocks): one compilation of
# the quantizer serves every weight of a chunk size instead of one per weight shape (the quantizer
# dominates those compile times), and every layer above _MAX_CHUNK blocks shares one.
_MIN_BUCKET = 1 << 12
_MAX_CHUNK = 1 << 22


@jax.jit
def _all_finite(kernel: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(kernel))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _weight_blocks(kernel: jax.Array, hadamard_block: int | None, chunk: int):
    """The blocks `[chunks, chunk, 16]` of the rows `[*, N, K]` (rotated), each block's layer amax
    `[chunks, chunk, 1]`, and whether the kernel is finite."""
    finite = jnp.all(jnp.isfinite(kernel))
    w = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)
    if hadamard_block:
        w = block_hadamard(w, hadamard_block)
    per_layer = w.shape[-2] * w.shape[-1] // 16
    w = w.reshape(-1, per_layer, 16)
    amax = jnp.broadcast_to(jnp.max(jnp.abs(w), axis=(1, 2))[:, None], w.shape[:2]).reshape(-1, 1)
    pad = -amax.shape[0] % chunk
    blocks = jnp.pad(w.reshape(-1, 16), ((0, pad), (0, 0))).reshape(-1, chunk, 16)
    return blocks, jnp.pad(amax, ((0, pad), (0, 0))).reshape(-1, chunk, 1), finite


@jax.jit
def _quantize_blocks(blocks: jax.Array, amax: jax.Array):
    """NVFP4 of each block with its layer's global scale (as `nvfp4.quantize` of the layer computes it)."""
    from permuquant_jax.formats import nvfp4

    q = nvfp4.quantize(blocks, nvfp4.global_scale_from_amax(amax))
    return q.codes, q.scales, q.global_scale


@functools.partial(jax.jit, static_argnums=1)
def _unblock(parts, shape: tuple[int, ...]):
    """The quantized chunks `[(codes, scales, gs), ...]` -> codes `[*, N, K/2]`, scales `[*, N, K/16]`,
    global scales `[*]` (float32)."""
    *stack, n, k = shape
    codes, scales, gs = (jnp.concatenate(p) if len(parts) > 1 else p[0] for p in zip(*parts, strict=True))
    layers = int(np.prod(stack, dtype=np.int64))
    rows = layers * n * k // 16
    codes = codes[:rows].reshape(*stack, n, k // 2)
    scales = scales[:rows].reshape(*stack, n, k // 16)
    gs = gs[:rows].reshape(layers, -1)[:, 0].reshape(stack).astype(jnp.float32)
    return codes, scales, gs


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fake_quant_kernel(kernel: jax.Array, format: str, hadamard_block: int | None):
    from permuquant_jax.formats.registry import get_format

    n_stack = kernel.ndim - 2
    w = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)
    if hadamard_block:
        w = block_hadamard(w, hadamard_block)
    return _vmap_leading(get_format(format).weight_fake_quant, n_stack)(w).astype(kernel.dtype)


class QuantLinear(nnx.Module):
    """A linear layer with a quantized weight and quantized (or float) activations. See the module doc."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        format: str | None,
        stack: Sequence[int] = (),
        use_bias: bool = True,
        hadamard_block: int | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        backend: str = "auto",
        _arrays: dict[str, jax.Array] | None = None,
    ):
        """An empty layer (zero weights) of this shape; `from_linear` fills one from a float linear.

        `_arrays` (internal): the storage arrays by attribute name (`kernel`, `w_codes`, ... `bias`), used
        instead of zeros (building zeros of a large model on the host costs seconds)."""
        stack = tuple(stack)
        given = dict(_arrays or {})
        full = lambda name, shape, dtype, value=0: given.pop(name) if name in given else _host_full(shape, dtype, value)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.format = format
        self.hadamard_block = hadamard_block
        self.backend = backend
        k, n = self.in_features, self.out_features
        if format is None:
            self.kernel = nnx.Param(full("kernel", (*stack, k, n), param_dtype))
        elif _is_nvfp4(format):
            self.w_codes = QuantParam(full("w_codes", (*stack, n, k // 2), jnp.uint8))
            self.w_scales = QuantParam(full("w_scales", (*stack, n, k // 16), jnp.float8_e4m3fn))
            self.w_global = QuantParam(full("w_global", stack, jnp.float32, 1))
        else:
            self.w_values = QuantParam(full("w_values", (*stack, n, k), param_dtype))
        self.bias = nnx.Param(full("bias", (*stack, n), param_dtype)) if use_bias else None
        if given:
            raise ValueError(f"QuantLinear: arrays {sorted(given)} do not belong to format {format!r}")
        self.gather = QuantInput(None)
        self.smooth = QuantInput(None)
        self.act_scale = QuantInput(None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(
        cls,
        linear: nnx.Module,
        *,
        format: str | None,
        hadamard_block: int | None = None,
        act_global_scale: np.ndarray | float | None = None,
        name: str = "linear",
        backend: str = "auto",
    ) -> QuantLinear:
        """Quantize a float linear (kernel `[*, K, N]`, bias) or a float `QuantLinear` (keeps its gather
        index and smoothing). The kernel is taken as is: fold permutations and scales into it first.

        hadamard_block: rotate the weight offline along K (activations are rotated at run time).
        act_global_scale: static activation global scale per layer (`[*stack]` or scalar); None = dynamic.
        """
        kernel = on_device(jnp.asarray(linear.kernel.get_value()))
        stack = kernel.shape[:-2]
        k, n = kernel.shape[-2:]
        bias = getattr(linear, "bias", None)
        bias = None if bias is None else on_device(bias.get_value())
        arrays: dict[str, jax.Array] = {} if bias is None else {"bias": bias}
        fmt = None
        if format is None:
            if hadamard_block:
                raise ValueError("a float QuantLinear (format=None) takes no Hadamard block")
            arrays["kernel"] = kernel
        else:
            from permuquant_jax.formats.common import check_finite
            from permuquant_jax.formats.registry import get_format

            fmt = get_format(format)
            if k % fmt.group:
                raise ValueError(
                    f"{name}: {k} input channels are not a multiple of the {format} group size {fmt.group}; "
                    "keep this layer in 16 bits (keep patterns) or pad it"
                )
            if isinstance(kernel, jax.core.Tracer):
                check_finite(kernel, name)  # raises its TypeError: quantization runs eagerly
            if hadamard_block and k % hadamard_block:
                raise ValueError(f"{name}: Hadamard block {hadamard_block} does not divide K = {k}")
            out, finite = _quantize_kernel(kernel, fmt.name, hadamard_block)
            if not bool(finite):
                check_finite(kernel, name)  # names the NaN/Inf and raises
            if _is_nvfp4(format):
                arrays.update(w_codes=out.codes, w_scales=out.scales, w_global=out.global_scale)
            else:
                arrays["w_values"] = out
        q = cls(k, n, format=format, stack=stack, use_bias=bias is not None, hadamard_block=hadamard_block,
                param_dtype=kernel.dtype, backend=backend, _arrays=arrays)
        if isinstance(linear, QuantLinear):
            q.gather.set_value(linear.gather.get_value())
            q.smooth.set_value(linear.smooth.get_value())
        if fmt is not None and act_global_scale is not None and fmt.act_bits is not None:
            gs = np.broadcast_to(np.asarray(act_global_scale, np.float32), stack)
            q.act_scale.set_value(jax.device_put(np.array(gs)))
        return q

    def compose_gather(self, perm: np.ndarray, start: int, size: int) -> None:
        """Reorder the gathered input columns `[start, start+size)` by `perm [*stack, size]`."""
        perm = np.asarray(perm, np.int32)
        g = self.gather.get_value()
        if g is None:
            stack = perm.shape[:-1]
            g = jax.device_put(np.tile(np.arange(self.in_features, dtype=np.int32), (*stack, 1)))
        self.gather.set_value(permute_axis(g, perm, -1, start, size).astype(jnp.int32))

    def set_smoothing(self, inv_scale: np.ndarray, start: int, size: int) -> None:
        """Multiply input columns `[start, start+size)` by `inv_scale [*stack, size]` at run time.

        Must come before any gather (the vector is in input order, which then equals kernel order).
        """
        if self.gather.get_value() is not None:
            raise ValueError("set_smoothing must be applied before a gather permutation on the same layer")
        v = jnp.asarray(inv_scale, jnp.float32)
        sm = self.smooth.get_value()
        if sm is None:
            sm = _host_full((*v.shape[:-1], self.in_features), jnp.float32, 1)
        self.smooth.set_value(sm.at[..., start : start + size].multiply(v))

    def prepare_device_layout(self, *, rows: int | None = None, force: bool = False) -> bool:
        """Hold the weight's scales in the Mosaic GPU kernel's layout (`w_mosaic_scales`, a `DeviceLayout`)
        instead of the canonical `w_scales` when this device's dispatch runs that kernel for this layer:
        at `rows` rows per call (None: judged at a large M, `tuning.LARGE_M`), or always with `force`.
        Returns whether the layer holds the layout now. Outputs are bit-identical either way; the layout
        takes the canonical scales' bytes and saves a scale transpose per Mosaic call (other GEMM paths
        rebuild the canonical scales per call). `drop_device_layouts` undoes it."""
        if not _is_nvfp4(self.format):
            return False
        from permuquant_jax.kernels import dispatch, tuning

        has = getattr(self, "w_mosaic_scales", None) is not None
        m = tuning.LARGE_M if rows is None else rows
        n, k = self.out_features, self.in_features
        on_gpu = dispatch.resolve_backend(self.backend) == "pallas"
        want = force or (on_gpu and dispatch.gemm_choice(m, n, k) == "mosaic")
        if want and not has:
            self.w_mosaic_scales = DeviceLayout(_mosaic_scale_words(self.w_scales.get_value()))
            self.w_scales.set_value(None)
        elif has and not want:
            self._drop_device_layout()
        return want

    def _drop_device_layout(self) -> None:
        words = self.w_mosaic_scales.get_value()
        self.w_scales.set_value(_scales_from_words(words, self.out_features, self.in_features))
        del self.w_mosaic_scales

    # ------------------------------------------------------------------ forward

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight storage (codes and scales, or values) and bias."""
        total = 0
        for _, v in nnx.state(self, (nnx.Param, DeviceLayout)).flat_state():
            a = v.get_value()
            total += 0 if a is None else a.size * a.dtype.itemsize
        return int(total)

    def _input(self, x: jax.Array) -> jax.Array:
        sm = self.smooth.get_value()
        if sm is not None:
            x = (x.astype(jnp.float32) * sm).astype(x.dtype)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects {self.in_features} input features, found shape {x.shape}")
        if _ROWS_SEEN is not None and getattr(self, "_layout_key", None):
            rows = int(np.prod(x.shape[:-1], dtype=np.int64))
            _ROWS_SEEN[self._layout_key] = max(rows, _ROWS_SEEN.get(self._layout_key, 0))
        x = self._input(x)
        g = self.gather.get_value()
        bias = None if self.bias is None else self.bias.get_value()
        if self.format is None:
            if g is not None:
                x = jnp.take(x, g, axis=-1)
            y = jnp.dot(x, self.kernel.get_value())
            return y if bias is None else y + bias
        if _is_nvfp4(self.format):
            from permuquant_jax.formats.nvfp4 import NVFP4Tensor
            from permuquant_jax.formats.registry import get_format
            from permuquant_jax.kernels.dispatch import nvfp4_linear

            ms = getattr(self, "w_mosaic_scales", None)
            ms = None if ms is None else ms.get_value()
            scales = self.w_scales.get_value()
            if scales is None:  # held in the Mosaic layout: canonical scales for the other GEMM paths
                if ms is None:
                    raise ValueError("QuantLinear: w_scales is empty and no device layout holds the scales; "
                                     "rebuild the layer (from_linear or a saved model)")
                scales = _scales_from_words(ms, self.out_features, self.in_features)
            w = NVFP4Tensor(codes=self.w_codes.get_value(), scales=scales, global_scale=self.w_global.get_value())
            return nvfp4_linear(
                x, w, bias, act_global_scale=self.act_scale.get_value(), gather=g,
                hadamard_block=self.hadamard_block, w4a16=get_format(self.format).act_bits is None,
                out_dtype=x.dtype, backend=self.backend, mosaic_scales=ms,
            )
        from permuquant_jax.formats.registry import get_format

        fmt = get_format(self.format)
        xf = x.astype(jnp.float32)
        if g is not None:
            xf = jnp.take(xf, g, axis=-1)
        if self.hadamard_block:
            xf = block_hadamard(xf, self.hadamard_block)
        if fmt.act_bits is not None:
            xf = fmt.act_fake_quant(xf)
        y = jnp.matmul(xf, self.w_values.get_value().astype(jnp.float32).T)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(x.dtype)


def layer_rows(model: nnx.Module, example_call) -> dict[str, int]:
    """Rows per call each quantized linear of `model` sees in `example_call(model)` (traced abstractly
    with `jax.eval_shape`, nothing runs), keyed by module path ('single_blocks.linear1'); layers the
    call does not reach are absent."""
    global _ROWS_SEEN
    layers = [(".".join(map(str, p)), q) for p, q in nnx.iter_graph(model) if isinstance(q, QuantLinear)]
    for key, q in layers:
        q._layout_key = key
    graphdef, state = nnx.split(model)
    _ROWS_SEEN = {}
    try:
        jax.eval_shape(lambda st: example_call(nnx.merge(graphdef, st)), state)
        return dict(_ROWS_SEEN)
    finally:
        _ROWS_SEEN = None
        for _, q in layers:
            del q._layout_key


def prepare_device_layouts(model: nnx.Module, example_call=None, *, force: bool = False) -> int:
    """`QuantLinear.prepare_device_layout` on every quantized linear of `model` (after loading or quantizing,
    before the jitted forward); returns how many layers hold a device layout now. `example_call(model)`: a
    forward at the sizes that will run (e.g. `lambda m: m(*inputs)`), traced to learn each layer's rows per
    call, so that only layers that run the Mosaic kernel are converted (the image stream, not the text
    stream or the modulation at the same weight shape); None judges every layer at a large M."""
    rows = layer_rows(model, example_call) if example_call is not None else {}
    layers = [(".".join(map(str, p)), q) for p, q in nnx.iter_graph(model) if isinstance(q, QuantLinear)]
    done = 0
    for key, q in layers:
        if example_call is not None and key not in rows and not force:
            continue
        done += q.prepare_device_layout(rows=rows.get(key), force=force)
    return done


def drop_device_layouts(model: nnx.Module) -> int:
    """Put the canonical scales back and remove every `DeviceLayout` (before saving a prepared model: the
    saved format holds the canonical arrays only); returns how many layers had one."""
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)]
    had = [q for q in layers if getattr(q, "w_mosaic_scales", None) is not None]
    for q in had:
        q._drop_device_layout()
    return len(had)
