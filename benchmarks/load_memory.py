"""Peak host memory of ``load_flux`` on a synthetic ~1 GB FLUX checkpoint (BFL layout).

    python benchmarks/load_memory.py [--hidden 640] [--stored bf16 f32] [--out benchmarks/results/load_memory.md]

The checkpoint has FLUX.1's depth (19 + 38 blocks) and real in/out dims at a reduced width
(``--hidden``, 640 -> 0.52B parameters, 1.04 GB in bf16). Each load runs in a fresh subprocess:
after imports and JAX start-up, it reads its resident set size, resets the kernel's peak counter
(``/proc/self/clear_refs``), loads the model in bf16 and reads the peak (``VmHWM``) again. The
reported ratio is (peak - baseline) / bytes of the loaded model's parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from permuquant_jax.convert import load_flux

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
jnp.zeros(8).block_until_ready()  # start the runtime before the baseline
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
t0 = time.perf_counter()
model = load_flux(sys.argv[1], jnp.bfloat16)
leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
jax.block_until_ready(leaves)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
model_bytes = sum(a.nbytes for a in leaves)
print(json.dumps(dict(baseline=base, peak=peak, model_bytes=model_bytes, seconds=seconds)))
"""


def write_checkpoint(path: Path, hidden: int, stored: str) -> int:
    """A random BFL-layout checkpoint of FLUX.1 depth at width ``hidden``; returns its size."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from permuquant_jax.convert.keymap import bfl_keymap
    from permuquant_jax.models.flux import FluxConfig

    cfg = FluxConfig(hidden_size=hidden, num_heads=hidden // 128)
    dtype = {"bf16": ml_dtypes.bfloat16, "f32": np.float32, "f16": np.float16, "f8": ml_dtypes.float8_e4m3fn}[stored]
    rng = np.random.default_rng(0)
    tensors = {}
    for key, entry in bfl_keymap(cfg).items():
        scale = 1 / np.sqrt(entry.shape[-1]) if entry.is_matrix else 0.02
        tensors[key] = (rng.random(entry.shape, dtype=np.float32) * (2 * scale) - scale).astype(dtype)
    save_file(tensors, str(path))
    return path.stat().st_size


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=640, help="width (multiple of 128); 640 -> ~1 GB bf16")
    ap.add_argument("--stored", nargs="+", default=["bf16", "f32"], choices=["bf16", "f32", "f16", "f8"])
    ap.add_argument("--out", type=Path, default=None, help="append a markdown record here")
    args = ap.parse_args()

    import jax
    import ml_dtypes
    import safetensors

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stored in args.stored:
            path = Path(tmp) / f"synthetic-{stored}.safetensors"
            size = write_checkpoint(path, args.hidden, stored)
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = (r["peak"] - r["baseline"]) / r["model_bytes"]
            rows.append((stored, size, r, ratio))
            path.unlink()

    gb = 1e9
    lines = [
        "| stored | file | output model (bf16) | baseline RSS | peak RSS | peak - baseline | ratio | load time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stored, size, r, ratio in rows:
        lines.append(
            f"| {stored} | {size / gb:.2f} GB | {r['model_bytes'] / gb:.3f} GB | {r['baseline'] / gb:.2f} GB | "
            f"{r['peak'] / gb:.2f} GB | {(r['peak'] - r['baseline']) / gb:.3f} GB | **{ratio:.3f}x** | "
            f"{r['seconds']:.1f} s |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = (
            f"\n## {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
            f"- command: `python benchmarks/load_memory.py {' '.join(sys.argv[1:])}`\n"
            f"- machine: {machine()}\n"
            f"- versions: Python {platform.python_version()}, jax {jax.__version__}, "
            f"safetensors {safetensors.__version__}, ml_dtypes {ml_dtypes.__version__}\n"
            f"- checkpoint: BFL layout, FLUX.1 depth 19 + 38, width {args.hidden}, random values\n\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
