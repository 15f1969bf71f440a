"""Compile the NVFP4 matmul kernel variants on the GPU and count what their PTX holds.

    PYTHONPATH=. python3 benchmarks/inspect_ptx.py

wgmma (Hopper tensor-core instructions) vs mma.sync (the older path), local-memory traffic (spills),
shared-memory stores (layout conversions), per variant, at 4096 x 3072 x 9216 and 1 x 3072 x 18432.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

DUMP = "/tmp/pq_xla_dump"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from permuquant_jax.kernels import dispatch  # noqa: E402
from permuquant_jax.kernels.nvfp4_matmul import MatmulConfig, PrepackedNVFP4, nvfp4_matmul  # noqa: E402

PATTERNS = {
    "wgmma": r"wgmma\.mma_async",
    "mma.sync": r"\bmma\.sync",
    "ld.local": r"ld\.local",
    "st.local": r"st\.local",
    "st.shared": r"st\.shared",
    "ld.shared": r"ld\.shared",
    "ldmatrix": r"ldmatrix",
    "cp.async": r"cp\.async",
    "prmt": r"\bprmt",
    "mul.f16": r"mul(\.rn)?\.f16",
    "cvt": r"\bcvt\.",
}


def main() -> None:
    dispatch.filter_triton_deprecation()
    variants = (
        [
            (4096, 3072, 9216, "chunk128", MatmulConfig(block_n=128, block_m=256, num_warps=8, num_stages=3, decode=d))
            for d in ("jnp", "noscale", "asm")
        ]
        + [
            (
                1,
                3072,
                18432,
                "chunk128",
                MatmulConfig(block_n=64, block_m=16, num_warps=4, num_stages=4, split_k=4, decode=d),
            )
            for d in ("jnp",)
        ]
        + [
            (
                1,
                3072,
                18432,
                "chunk128",
                MatmulConfig(block_n=64, num_warps=4, num_stages=3, split_k=2, decode=d, kind="gemv"),
            )
            for d in ("jnp", "asm")
        ]
    )
    print("| M x K x N | layout/decode | " + " | ".join(PATTERNS) + " |")
    for i, (m, k, n, layout, cfg) in enumerate(variants):
        shutil.rmtree(DUMP, ignore_errors=True)
        x = jax.ShapeDtypeStruct((m, k), jnp.float16)
        w = PrepackedNVFP4(
            codes=jax.ShapeDtypeStruct((n, k // 2), jnp.uint8),
            scales=jax.ShapeDtypeStruct((n, k // 16), jnp.uint8),
            global_scale=jax.ShapeDtypeStruct((n,), jnp.float32),
            n=n,
            k=k,
            layout=layout,
        )
        jax.jit(lambda a, b, c=cfg: nvfp4_matmul(a, b, None, config=c)).lower(x, w).compile()
        files = [f for f in glob.glob(f"{DUMP}/**/*", recursive=True) if os.path.isfile(f)]
        ptx = [f for f in files if f.endswith(".ptx") or "ptx" in os.path.basename(f)]
        text = "".join(open(f, errors="replace").read() for f in ptx)
        counts = [str(len(re.findall(p, text))) for p in PATTERNS.values()]
        print(f"| {m}x{k}x{n} | {layout}/{cfg.decode} | " + " | ".join(counts) + " |", flush=True)
        if i == 0 and text:
            out = os.environ.get("OUT")
            if out:
                with open(os.path.join(out, "matmul_large_jnp.ptx"), "w") as fh:
                    fh.write(text)
        if not text:
            print("  (no PTX found in the dump:", sorted(files)[:40], ")", file=sys.stderr)


if __name__ == "__main__":
    main()
