"""The one entry point the library calls for NVFP4 linears: picks the kernel by device.

- "pallas": the Pallas kernels (Triton backend), on a GPU with Triton (compute capability 8.0-9.x,
  the H100 and H200 here): `act_quant` (W4A4), then the GEMM backend that `tuning.DISPATCH_TABLE`
  picks for the device class and M (the in-register `nvfp4_matmul`, or a decode of W to exact 16-bit
  values + cuBLAS); unknown devices use the table's fallback class.
- "scaled_matmul": `jax.nn.scaled_matmul` with float4_e2m1fn values and float8_e4m3fn scales, which
  cuDNN runs natively on compute capability >= 10 (elsewhere XLA decomposes it, slowly).
- "reference": the pure-JAX reference (`reference.py`), used on CPUs.
- "pallas_interpret": the Pallas kernels in interpret mode (CPU tests).

`backend="auto"` chooses by the default device; the environment variable
`PERMUQUANT_KERNEL_BACKEND` (one of the names above) overrides "auto", and `PERMUQUANT_GEMM_BACKEND`
(one of `tuning.GEMM_BACKENDS`) overrides the table's GEMM choice.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp

from permuquant_jax.formats import nvfp4
from permuquant_jax.formats.nvfp4 import NVFP4Tensor
from permuquant_jax.kernels import act_quant as _aq
from permuquant_jax.kernels import decode as _decode
from permuquant_jax.kernels import gemv as _gemv
from permuquant_jax.kernels import reference, tuning
from permuquant_jax.kernels.nvfp4_matmul import PrepackedNVFP4, nvfp4_matmul, prepack, unprepack

BACKENDS = ("auto", "pallas", "pallas_interpret", "scaled_matmul", "reference")
ENV_BACKEND = "PERMUQUANT_KERNEL_BACKEND"
# overrides the tuning table's GEMM choice on the "pallas" backend (one of tuning.GEMM_BACKENDS)
ENV_GEMM = "PERMUQUANT_GEMM_BACKEND"

# JAX 0.11 warns at every lowering of a Triton-backend pallas_call. Tested range: jax 0.10.2 (CPU,
# interpret mode) and 0.11.2 (H100). Filtered by its exact text and category, nothing else.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated and will be removed in a future JAX version\."


@functools.cache
def filter_triton_deprecation() -> None:
    """Ignore exactly JAX's Triton-backend deprecation warning (installed once the kernels are used).

    It is raised when the enclosing jit lowers, which can be after our call returns, so the filter is
    process-wide rather than scoped to the call.
    """
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


def _compute_capability() -> float | None:
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if dev.platform != "gpu" or cc is None:
        return None
    return float(cc)


def device_class() -> str | None:
    """The tuning-table class of this process's default device (`tuning.device_class`)."""
    dev = jax.devices()[0]
    return tuning.device_class(getattr(dev, "device_kind", ""), _compute_capability())


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend for `backend` on this process's default device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, found {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND)
        if env:
            if env not in BACKENDS or env == "auto":
                raise ValueError(f"{ENV_BACKEND}={env!r}: expected one of {BACKENDS[1:]}")
            return env
        cc = _compute_capability()
        if cc is None:
            return "reference"
        if cc >= 10.0:
            return "scaled_matmul"
        return "pallas" if cc >= 8.0 else "reference"
    return backend


def prepack_weight(w: NVFP4Tensor | PrepackedNVFP4) -> PrepackedNVFP4:
    """Weights in the Pallas matmul's layout (do it once, offline; `nvfp4_linear` accepts either)."""
    return w if isinstance(w, PrepackedNVFP4) else prepack(w)


def _canonical(w: NVFP4Tensor | PrepackedNVFP4) -> NVFP4Tensor:
    return unprepack(w) if isinstance(w, PrepackedNVFP4) else w


def _check(x: jax.Array, w, bias, gather) -> tuple[int, int]:
    if not isinstance(w, NVFP4Tensor | PrepackedNVFP4):
        raise TypeError(f"w must be an NVFP4Tensor or a PrepackedNVFP4, found {type(w).__name__}")
    n, k = w.shape
    if len(w.shape) != 2:
        raise ValueError(f"w must be 2-D [N, K] (rows are output channels), found logical shape {w.shape}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input channels but w expects K = {k} (w is [N, K] = {w.shape})")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), found {bias.shape}")
    if gather is not None and gather.shape != (k,):
        raise ValueError(f"gather must have shape ({k},), found {gather.shape}")
    return n, k


def nvfp4_linear(
    x: jax.Array,
    w: NVFP4Tensor | PrepackedNVFP4,
    bias: jax.Array | None = None,
    *,
    act_global_scale: nvfp4.GlobalScale = None,
    gather: jax.Array | None = None,
    hadamard_block: int | None = None,
    w4a16: bool = False,
    out_dtype: jnp.dtype | None = None,
    backend: str = "auto",
    mosaic_scales: jax.Array | None = None,
) -> jax.Array:
    """`y [..., N] = Q(T(x)) W^T + bias` for NVFP4 weights `w [N, K]`, `x [..., K]`.

    T = channel gather then block Hadamard (both optional; weights given with a Hadamard are already
    rotated offline). Q = NVFP4 quantization with `act_global_scale` (None: dynamic per call; a float32
    scalar: static; "per_row": per token), skipped when `w4a16`. fp32 accumulation; `out_dtype`
    defaults to x's dtype. Semantics: `reference.nvfp4_linear_ref`.

    `mosaic_scales`: the weight's scales in the Mosaic kernel's layout (`nvfp4_matmul_mgpu.
    stored_scale_words`, built once ahead of time); used when the Mosaic kernel runs, ignored otherwise
    (same outputs either way: without them the layout is converted per call).
    """
    n, k = _check(x, w, bias, gather)
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    be = resolve_backend(backend)
    if be == "reference":
        return reference.nvfp4_linear_ref(
            x,
            _canonical(w),
            bias,
            act_global_scale=act_global_scale,
            gather=gather,
            hadamard_block=hadamard_block,
            w4a16=w4a16,
            out_dtype=out_dtype,
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if be == "scaled_matmul" and not w4a16:
        y = _scaled_matmul_linear(x2, _canonical(w), bias, act_global_scale, gather, hadamard_block, out_dtype)
        return y.reshape(*lead, n)
    interpret = be == "pallas_interpret"
    if not interpret:
        filter_triton_deprecation()
    wp = prepack_weight(w)
    gemm = "triton" if interpret else gemm_choice(m, n, k)
    if gemm == "triton":
        cfg = tuning.matmul_config(m, n, k)
        mm = functools.partial(nvfp4_matmul, config=cfg, out_dtype=out_dtype, interpret=interpret)
    elif gemm == "xla_gemv":
        mm = functools.partial(_gemv.nvfp4_gemv, out_dtype=out_dtype)
    elif gemm == "mosaic":
        extra = {} if mosaic_scales is None else {"scale_words": mosaic_scales}
        mm = functools.partial(mosaic_dot, out_dtype=out_dtype, **extra)
    else:
        decoder = "pallas" if gemm == "decode_cublas" else "bits"
        mm = functools.partial(dequant_dot, out_dtype=out_dtype, decoder=decoder)
    if w4a16:
        xin = reference.transform_act(x2, gather=gather, hadamard_block=hadamard_block)
        y = mm(xin, wp, None, bias)
    else:
        gs = _aq.act_global_scale_rows(x2, gather=gather, hadamard_block=hadamard_block, global_scale=act_global_scale)
        xv = _aq.act_quant(
            x2,
            gs,
            gather,
            hadamard_block=hadamard_block,
            out="values",
            interpret=interpret,
            **tuning.act_quant_config(m, k, hadamard_block),
        )
        y = mm(xv, wp, gs, bias)
    return y.reshape(*lead, n)


def gemm_choice(m: int, n: int | None = None, k: int | None = None) -> str:
    """The GEMM backend for `m` rows, `n` outputs and `k` inputs on this device: `PERMUQUANT_GEMM_BACKEND`,
    else the tuning table."""
    env = os.environ.get(ENV_GEMM)
    if env:
        if env not in tuning.GEMM_BACKENDS:
            raise ValueError(f"{ENV_GEMM}={env!r}: expected one of {tuning.GEMM_BACKENDS}")
        return env
    return tuning.gemm_backend(device_class(), m, n, k)


def wants_mosaic_layout(n: int, k: int, backend: str = "auto") -> bool:
    """Whether this device runs the Mosaic kernel for a `[n, k]` weight at large M (the step's image and
    single-stream GEMMs), so that storing its scale layout ahead of time (`nvfp4_matmul_mgpu.
    stored_scale_words`) saves a per-call conversion."""
    if resolve_backend(backend) != "pallas":
        return False
    return gemm_choice(tuning.LARGE_M, n, k) == "mosaic"


def mosaic_dot(
    x: jax.Array,
    w: PrepackedNVFP4,
    x_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    scale_words: jax.Array | None = None,
) -> jax.Array:
    """Same function as `dequant_dot`, by the Mosaic GPU kernel (`nvfp4_matmul_mgpu`). The scales are
    converted to its layout per call unless `scale_words` (`stored_scale_words` of the weight, built
    once) are given; the codes are only reinterpreted. Outputs other than bf16/fp16 and non-canonical
    layouts take `dequant_dot` (the kernel's epilogue writes 16-bit tiles)."""
    from permuquant_jax.kernels import nvfp4_matmul_mgpu as mg

    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or w.layout != "canonical":
        return dequant_dot(x, w, x_scale, bias, out_dtype=out_dtype)
    wm = mg.to_mosaic(w, tuning.MOSAIC_NIBBLE_ORDER, scale_words)
    cfg = tuning.mosaic_config(x.shape[0], w.n, w.k)
    return mg.nvfp4_matmul_mosaic(x, wm, x_scale, bias, config=cfg, out_dtype=out_dtype)


DECODERS = ("pallas", "bits", "lut")


def decode_weight(w: PrepackedNVFP4, dtype: jnp.dtype, decoder: str = "pallas", *, interpret: bool = False):
    """Exact 16-bit block values `[N, K]` of `w`: "pallas" (decode kernel; canonical layout, else
    falls back to "bits"), "bits" (XLA bit placement) or "lut" (the reference's table decode)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, found {decoder!r}")
    if decoder == "lut":
        return reference.block_values(unprepack(w)).astype(dtype)
    if w.layout != "canonical":
        w = prepack(unprepack(w), layout="canonical")
    if decoder == "bits":
        return _decode.decode_weight_bits(w, dtype)
    return _decode.decode_weight_pallas(w, dtype, interpret=interpret, **tuning.decode_config(w.n, w.k))


def dequant_dot(
    x: jax.Array,
    w: PrepackedNVFP4,
    x_scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    *,
    out_dtype: jnp.dtype = jnp.bfloat16,
    decoder: str = "pallas",
    interpret: bool = False,
) -> jax.Array:
    """Same function as `nvfp4_matmul`, as a decode of W to exact fp16/bf16 block values (`decode_weight`)
    then one cuBLAS GEMM (fp32 accumulation) and an XLA epilogue.

    The weights make one round trip through HBM per call (2 bytes per weight); at large M this beats
    our in-register Triton kernel on Hopper (see benchmarks/NOTES-kernels.md).
    """
    m = x.shape[0]
    dt = jnp.float16 if x.dtype == jnp.float16 else jnp.bfloat16
    wv = decode_weight(w, dt, decoder, interpret=interpret)  # exact: <= 6 significant bits
    acc = jax.lax.dot_general(x.astype(dt), wv, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    gx = jnp.ones((m,), jnp.float32) if x_scale is None else x_scale.astype(jnp.float32).reshape(m)
    y = acc * gx[:, None] * w.global_scale[None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


def _scaled_matmul_linear(x2, w: NVFP4Tensor, bias, act_global_scale, gather, hadamard_block, out_dtype):
    """W4A4 through `jax.nn.scaled_matmul` (cuDNN's native NVFP4 on compute capability >= 10)."""
    on_gpu = _compute_capability() is not None
    if on_gpu:
        filter_triton_deprecation()
        xq = _aq.quantize_act(
            x2,
            gather=gather,
            hadamard_block=hadamard_block,
            global_scale=act_global_scale,
            **tuning.act_quant_config(x2.shape[0], x2.shape[1], hadamard_block),
        )
    else:
        xq = reference.quantize_act_ref(x2, gather=gather, hadamard_block=hadamard_block, global_scale=act_global_scale)
    xv, xs = nvfp4.to_scaled_matmul(xq)
    wv, ws = nvfp4.to_scaled_matmul(w)
    acc = jax.nn.scaled_matmul(xv[None], wv[None], xs[None], ws[None], preferred_element_type=jnp.float32)[0]
    m, n = acc.shape
    g = reference.row_global_scale(xq, m)[:, None] * reference.row_global_scale(w, n)[None, :]
    y = acc * g
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
