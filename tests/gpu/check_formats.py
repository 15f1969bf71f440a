"""formats under eager, jit and vmap on the GPU against torchao's bytes (`make_formats_ref.py` writes them).

PYTHONPATH=. python3 tests/gpu/check_formats.py      # with .fmtcheck/ref.npz carried; prints TOTAL MISMATCHES
"""

import jax
import jax.numpy as jnp
import numpy as np

from permuquant_jax.formats import intq, mxfp4, nvfp4

print(jax.__version__, jax.devices())
ref = np.load(".fmtcheck/ref.npz")
q_j = jax.jit(nvfp4.quantize, static_argnums=1)
dq_j = jax.jit(nvfp4.dequantize, static_argnums=1)
bad_total = 0
for k in sorted({k.rsplit("_", 1)[0] for k in ref.files if k.endswith("_x")}):
    x = jnp.asarray(ref[k + "_x"])
    if k.endswith("bf16"):
        x = x.astype(jnp.bfloat16)
    for mode, q in (
        ("eager", nvfp4.quantize(x)),
        ("jit", q_j(x, None)),
        ("vmap", jax.tree.map(lambda a: a[0], jax.vmap(nvfp4.quantize)(x[None]))),
    ):
        b = [
            int((np.asarray(q.codes) != ref[k + "_codes"]).sum()),
            int((np.asarray(q.scales).view(np.uint8) != ref[k + "_scales"]).sum()),
            int(np.asarray(q.global_scale).view(np.uint32) != ref[k + "_gs"].view(np.uint32)),
            int((np.asarray(dq_j(q, jnp.float32)).view(np.uint32) != ref[k + "_deq"].view(np.uint32)).sum()),
        ]
        bad_total += sum(b)
        print(k, mode, "mismatches codes/scales/gs/deq", b)
for name in ("normal", "student_t", "channel_outliers", "tiny_next_to_huge", "sparse", "ties"):
    q = jax.jit(mxfp4.quantize)(jnp.asarray(ref[name + "_fp32_x"]))
    b = [
        int((np.asarray(q.codes) != ref[name + "_mx_codes"]).sum()),
        int((np.asarray(mxfp4.scale_bytes(q)) != ref[name + "_mx_scales"]).sum()),
    ]
    bad_total += sum(b)
    print(name, "mxfp4 mismatches", b)
x = jnp.asarray(ref["student_t_fp32_x"])
e = intq.quantize(x, 3, 64)
j = jax.jit(intq.quantize, static_argnums=(1, 2))(x, 3, 64)
print("intq jit vs eager", int((np.asarray(e.values) != np.asarray(j.values)).sum()))
print("TOTAL MISMATCHES", bad_total)
# fused jit cases: f32 -> bf16 -> quantize inside one jit, and fake_quant in one jit
x32 = jnp.asarray(ref["student_t_fp32_x"])
e = nvfp4.quantize(x32.astype(jnp.bfloat16))
j = jax.jit(lambda a: nvfp4.quantize(a.astype(jnp.bfloat16)))(x32)
print("fused bf16 cast+quantize codes mismatch", int((np.asarray(e.codes) != np.asarray(j.codes)).sum()))
fe = np.asarray(nvfp4.fake_quant(x32))
fj = np.asarray(jax.jit(nvfp4.fake_quant)(x32))
print(
    "fake_quant jit vs eager",
    int((fe.view(np.uint32) != fj.view(np.uint32)).sum()),
    "vs torchao",
    int((fj.view(np.uint32) != ref["student_t_fp32_deq"].view(np.uint32)).sum()),
)
fi = np.asarray(intq.fake_quant(x32, 3, 64))
fij = np.asarray(jax.jit(intq.fake_quant, static_argnums=(1, 2))(x32, 3, 64))
print("intq fake_quant jit vs eager", int((fi != fij).sum()))
