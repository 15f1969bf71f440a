"""The converter CLI on a FLUX.1-dev-size checkpoint (random bf16 weights), as a user runs it; one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/convert_fullsize.py --out $OUT [--budget-s 450] [CLI options ...]
    JAX_PLATFORMS=cpu python benchmarks/convert_fullsize.py --small --out /tmp/fs   # CPU smoke test

1. writes a BFL-layout checkpoint of FLUX.1-dev's shapes (12B parameters, 23.8 GB of bf16; random
   values drawn on the accelerator tensor by tensor and streamed to a safetensors file) and an .npz of
   random text embeddings of the real widths (T5 [N, 512, 4096], CLIP pooled [N, 768]);
2. runs `python -m permuquant_jax.convert CKPT --out DST --calib NPZ --timings T.json` in a child
   process, with the CLI's default settings unless options are given after the script's own (they are
   passed through, e.g. `--calib-samples 2 --timesteps 4`); its output streams to stdout and to
   $OUT/convert_log.txt, its phase timings (rewritten after every phase) to $OUT/convert_timings.json;
   peak host RSS of the child from `getrusage(RUSAGE_CHILDREN)`, peak device memory from the CLI's
   `memory_stats()["peak_bytes_in_use"]`;
3. in a second child: `permuquant_jax.load(DST)` wall time, then one 1024x1024 DiT step of the loaded
   model (first call incl. compile, then the median of 3);
4. with `--budget-run GIB`: the same CLI command again with `--max-device-memory GIB` (block streaming),
   its log in $OUT/convert_budget_log.txt and timings in $OUT/convert_budget_timings.json, and, when both
   finish, whether the two outputs hold the same permutations and activation scales.
A deadline (--budget-s from the script's start) interrupts a CLI with SIGINT, so a run that does
not fit still reports where the time went (how long the SIGINT took to end it is recorded). Prints a
table last; writes $OUT/convert_fullsize.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
T0 = time.perf_counter()


def log(msg: str, out: Path | None = None) -> None:
    line = f"[{time.perf_counter() - T0:7.1f} s] {msg}"
    print(line, flush=True)
    if out is not None:
        with open(out / "progress.txt", "a") as fh:
            fh.write(line + "\n")


def write_checkpoint(path: Path, cfg, seed: int = 0) -> tuple[int, int]:
    """A random BFL-layout FLUX checkpoint for `cfg`, written tensor by tensor (safetensors format: an
    8-byte little-endian header length, a JSON header, then the raw little-endian tensor bytes). Values:
    linears uniform with std 0.02 (a random 57-block network stays finite over a trajectory), biases
    std 0.002, RMSNorm scales 1. Returns (bytes, parameters)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from permuquant_jax.convert.keymap import bfl_keymap

    table = bfl_keymap(cfg)
    header, off = {}, 0
    for key, e in table.items():
        n = int(np.prod(e.shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(e.shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt", "note": "random weights, benchmarks/convert_fullsize.py"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def draw(key, shape, lo):
        return jax.random.uniform(key, shape, jnp.float32, -lo, lo).astype(jnp.bfloat16)

    key = jax.random.key(seed)
    n_params = 0
    with open(path, "wb") as fh:
        fh.write(len(hb).to_bytes(8, "little"))
        fh.write(hb)
        pending = None
        for i, (k, e) in enumerate(table.items()):
            shape = tuple(e.shape)
            n_params += int(np.prod(shape))
            if k.endswith(".scale"):
                arr = jnp.ones(shape, jnp.bfloat16)
            else:
                a = 0.02 * 3**0.5 if len(shape) == 2 else 0.002 * 3**0.5
                arr = draw(jax.random.fold_in(key, i), shape, a)
            if pending is not None:  # write the previous tensor while this one is drawn (no extra host copy)
                fh.write(memoryview(np.asarray(pending).view(np.uint16)).cast("B"))
            pending = arr
        fh.write(memoryview(np.asarray(pending).view(np.uint16)).cast("B"))
    size = path.stat().st_size
    if size != 8 + len(hb) + off:
        raise RuntimeError(f"{path}: wrote {size} bytes, expected {8 + len(hb) + off}")
    return size, n_params


def write_calib(path: Path, n: int, txt_len: int, txt_width: int, y_width: int, seed: int = 0) -> None:
    """Random text conditioning of the real widths (N(0, 1), float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    np.savez(path, txt=rng.standard_normal((n, txt_len, txt_width), np.float32),
             y=rng.standard_normal((n, y_width), np.float32))


def stream_child(cmd: list[str], log_file: Path, deadline: float | None, env: dict,
                 out: Path | None = None) -> tuple[int, float, bool, int]:
    """Run `cmd`, copying its merged stdout/stderr to our stdout and `log_file` as it comes (progress
    bars included: read in chunks, not lines). At `deadline` (perf_counter) send SIGINT, then SIGKILL
    20 s later. Returns (exit code, seconds, interrupted, the child's own peak RSS in bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    interrupted = [False]
    sigint_at = [None]
    done = threading.Event()

    def watchdog():
        if deadline is None:
            return
        while not done.wait(0.5):
            if time.perf_counter() > deadline:
                interrupted[0] = True
                sigint_at[0] = time.perf_counter()
                log(f"deadline reached: SIGINT to the child (pid {proc.pid})", out)
                proc.send_signal(signal.SIGINT)
                if not done.wait(20):
                    proc.kill()
                return

    th = threading.Thread(target=watchdog, daemon=True)
    th.start()
    with open(log_file, "ab") as fh:
        while True:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            fh.write(chunk)
            fh.flush()
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    _, status, ru = os.wait4(proc.pid, 0)  # this child's own rusage (not the max over all children)
    done.set()
    rc = proc.returncode = os.waitstatus_to_exitcode(status)
    if sigint_at[0] is not None:
        log(f"the child ended {time.perf_counter() - sigint_at[0]:.1f} s after SIGINT (exit {rc})", out)
    return rc, time.perf_counter() - t0, interrupted[0], int(ru.ru_maxrss) * 1024


LOAD_CHILD = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp, numpy as np
import permuquant_jax
from permuquant_jax.quant.flux_plan import flux_forward, img_position_ids
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
model = permuquant_jax.load(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
t_load = time.perf_counter() - t0
cfg = model.config
res, txt_len = int(sys.argv[2]), int(sys.argv[3])
hl = res // 16
rng = np.random.default_rng(0)
batch = dict(img=jnp.asarray(rng.standard_normal((1, hl * hl, cfg.in_channels), np.float32)),
             img_ids=jnp.asarray(img_position_ids(1, hl, hl)),
             txt=jnp.asarray(rng.standard_normal((1, txt_len, cfg.context_in_dim), np.float32)),
             txt_ids=jnp.zeros((1, txt_len, 3), jnp.float32), timesteps=jnp.full((1,), 0.5, jnp.float32),
             y=jnp.asarray(rng.standard_normal((1, cfg.vec_in_dim), np.float32)),
             guidance=jnp.full((1,), 3.5, jnp.float32) if cfg.guidance_embed else None)
t0 = time.perf_counter()
out = flux_forward(model, batch).block_until_ready()
first = time.perf_counter() - t0
times = []
for _ in range(3):
    t0 = time.perf_counter()
    flux_forward(model, batch).block_until_ready()
    times.append(time.perf_counter() - t0)
st = jax.devices()[0].memory_stats() or {}
print("LOADRESULT " + json.dumps(dict(import_s=t_import, load_s=t_load, first_step_s=first,
      step_s=statistics.median(times), finite=bool(jnp.isfinite(out).all()),
      peak_device_bytes=st.get("peak_bytes_in_use"), device=str(jax.devices()[0].device_kind))), flush=True)
"""


def xla_memory_summary(dump: Path, top_modules: int = 30, top_buffers: int = 6) -> str:
    """Per compiled program (XLA's `*memory-usage-report.txt` files under `dump`): total bytes of its
    allocations (parameters, outputs and temporaries) and its largest buffers with their shapes; the
    largest programs first."""
    import re

    mods = []
    for f in dump.glob("*memory-usage-report.txt"):
        text = f.read_text(errors="replace")
        m = re.search(r"Total bytes: (\d+)", text)
        if not m:
            continue
        bufs = []
        for ln in text.splitlines():
            parts = [x.strip() for x in ln.split(";")]
            if len(parts) == 5 and parts[0].endswith("(100%)"):
                bufs.append((parts[1], parts[4][:160]))
        name = f.name.split(".")[1] if f.name.count(".") > 1 else f.name
        mods.append((int(m.group(1)), f.name.split(".")[0] + "." + name, bufs[:top_buffers]))
    mods.sort(key=lambda x: -x[0])
    out = [f"{len(mods)} programs; the {min(top_modules, len(mods))} largest (total allocation incl. parameters):"]
    for total, name, bufs in mods[:top_modules]:
        out.append(f"{total / 2**30:8.2f} GiB  {name}")
        out += [f"           {size:>10}  {shapes}" for size, shapes in bufs]
    return "\n".join(out) + "\n"


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results folder ($OUT)")
    ap.add_argument("--work", default=None, help="local disk for the checkpoint and the output (default: "
                    "/tmp/pq_fullsize or .pq_fullsize in the repository, whichever file system has more room)")
    ap.add_argument("--small", action="store_true", help="a reduced-width model (CPU smoke test of the script)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds from the script's start after which the CLI is interrupted (SIGINT)")
    ap.add_argument("--reserve-s", type=float, default=60.0,
                    help="seconds kept for the load + step child after the CLI (with --budget-s)")
    ap.add_argument("--calib-n", type=int, default=8, help="text embeddings in the --calib .npz")
    ap.add_argument("--reuse-checkpoint", action="store_true",
                    help="keep a checkpoint a previous run of this script left in --work (same config)")
    ap.add_argument("--xla-memory", action="store_true",
                    help="dump XLA's per-program memory reports for the CLI child and write the largest programs "
                    "and their largest buffers to $OUT/xla_memory.txt (which program sets the device peak)")
    ap.add_argument("--budget-run", type=float, default=None, metavar="GIB",
                    help="after the default run, run the CLI again with --max-device-memory GIB (streamed blocks)")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # the writer child
    args, cli_extra = ap.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work)
    else:
        import shutil

        cands = [Path("/tmp/pq_fullsize"), REPO / ".pq_fullsize"]
        free = {c: shutil.disk_usage(c.parent).free for c in cands}
        work = max(cands, key=lambda c: free[c])
        if not args.write_only:
            log("free disk: " + ", ".join(f"{c.parent} {f / 2**30:.0f} GiB" for c, f in free.items())
                + f" -> {work}", out)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    ckpt, calib, dst = work / "flux1-dev-random.safetensors", work / "calib.npz", work / "flux1-dev-nvfp4"
    info_file = work / "written.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))

    from permuquant_jax.models.flux import FluxConfig  # no JAX in this process: the children own the device

    cfg = FluxConfig.flux1_dev()
    if args.small:  # FLUX.1-dev's input widths, 2 + 2 blocks of width 1024: 0.12B parameters (not a toy model)
        cfg = FluxConfig(hidden_size=1024, num_heads=8, depth=2, depth_single_blocks=2, guidance_embed=True)
    txt_len = 32 if args.small else 512 if cfg.guidance_embed else 256
    if args.write_only:
        import jax

        log(f"jax {jax.__version__}, devices {jax.devices()}; config {cfg}", out)
        t = time.perf_counter()
        size, n_params = write_checkpoint(ckpt, cfg)
        t_write = time.perf_counter() - t
        write_calib(calib, args.calib_n, txt_len, cfg.context_in_dim, cfg.vec_in_dim)
        info_file.write_text(json.dumps(dict(size=size, n_params=n_params, write_s=t_write, jax=jax.__version__,
                                             config=cfg.to_dict(),
                                             device=str(jax.devices()[0].device_kind))))
        return
    t = time.perf_counter()
    same = args.reuse_checkpoint and info_file.exists() and ckpt.exists() and calib.exists() and \
        json.loads(info_file.read_text()).get("config") == json.loads(json.dumps(cfg.to_dict()))
    log("reusing the checkpoint in " + str(work) if same else "writing the checkpoint (child process) ...", out)
    writer = [sys.executable, __file__, "--write-only", "--out", str(out), "--work", str(work), "--calib-n",
              str(args.calib_n)] + (["--small"] if args.small else [])
    wr = subprocess.CompletedProcess([], 0) if same else subprocess.run(writer, cwd=REPO, env=env)
    if wr.returncode:
        raise SystemExit(f"checkpoint writer failed (exit {wr.returncode})")
    winfo = json.loads(info_file.read_text())
    size, n_params, t_write = winfo["size"], winfo["n_params"], winfo["write_s"]
    log(f"checkpoint {ckpt}: {size / 1e9:.2f} GB, {n_params / 1e9:.3f}B parameters, drawn + written in "
        f"{t_write:.1f} s ({time.perf_counter() - t:.1f} s with the child's start)", out)
    log(f"calibration text {calib}: {args.calib_n} x [{txt_len}, {cfg.context_in_dim}] + [{cfg.vec_in_dim}]", out)

    timings = out / "convert_timings.json"
    stats_a, stats_b = work / "stats.npz", work / "stats_budget.npz"
    # with a budget run, both save their calibration statistics: streamed and in-device passes compared
    save_a = ["--save-stats", str(stats_a)] if args.budget_run is not None else []
    cmd = [sys.executable, "-m", "permuquant_jax.convert", str(ckpt), "--out", str(dst), "--calib", str(calib),
           "--timings", str(timings), "--overwrite", *save_a, *cli_extra]
    if args.small:
        cmd += ["--resolution", "64"] if "--resolution" not in cli_extra else []
    deadline = None if args.budget_s is None else T0 + args.budget_s - args.reserve_s
    log("running: " + " ".join(cmd), out)
    cli_env = dict(env)
    dump = work / "xla_dump"
    if args.xla_memory:
        import shutil

        shutil.rmtree(dump, ignore_errors=True)
        cli_env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
    rc, t_cli, interrupted, rss = stream_child(cmd, out / "convert_log.txt", deadline, cli_env, out)
    if args.xla_memory:
        t = time.perf_counter()
        (out / "xla_memory.txt").write_text(xla_memory_summary(dump))
        log(f"XLA memory reports summarised in {time.perf_counter() - t:.1f} s -> xla_memory.txt", out)
    tm = json.loads(timings.read_text()) if timings.exists() else {}
    log(f"convert: exit {rc} after {t_cli:.1f} s{' (interrupted at the deadline)' if interrupted else ''}", out)

    loaded = {}
    if rc == 0:
        res = 64 if args.small else 1024
        p = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(dst), str(res), str(txt_len)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=None if args.budget_s is None else
                           max(10.0, T0 + args.budget_s - time.perf_counter() - 5))
        for ln in p.stdout.splitlines():
            if ln.startswith("LOADRESULT "):
                loaded = json.loads(ln[len("LOADRESULT "):])
        if not loaded:
            log(f"load child failed (exit {p.returncode}): {p.stderr[-2000:]}", out)
        log(f"load + step: {loaded}", out)

    result = dict(config=cfg.to_dict(), checkpoint_bytes=size, n_params=n_params, write_s=t_write,
                  command=cmd, exit_code=rc, interrupted=interrupted, cli_wall_s=t_cli, peak_host_rss_bytes=rss,
                  timings=tm, loaded=loaded, jax=winfo["jax"], device=winfo["device"])
    (out / "convert_fullsize.json").write_text(json.dumps(result, indent=1))
    budget = None
    if args.budget_run is not None:
        dst2, timings2 = work / "flux1-dev-nvfp4-budget", out / "convert_budget_timings.json"
        cmd2 = [sys.executable, "-m", "permuquant_jax.convert", str(ckpt), "--out", str(dst2), "--calib", str(calib),
                "--timings", str(timings2), "--overwrite", "--max-device-memory", f"{args.budget_run:g}",
                "--save-stats", str(stats_b), *cli_extra]
        for f in (stats_b, dst2):
            if f.is_file():
                f.unlink()
        if args.small:
            cmd2 += ["--resolution", "64"] if "--resolution" not in cli_extra else []
        deadline2 = None if args.budget_s is None else T0 + args.budget_s - 8
        log("budget run: " + " ".join(cmd2), out)
        # the passes are measured even while the CLI would refuse a streamed run at the door (folding /
        # quantizing host-memory weights not supported yet: `cli.streamed_folding_error`)
        env2 = dict(env, PERMUQUANT_STREAM_PASSES_ONLY="1")
        rc2, t2, int2, rss2 = stream_child(cmd2, out / "convert_budget_log.txt", deadline2, env2, out)
        tm2 = json.loads(timings2.read_text()) if timings2.exists() else {}
        same = stats_same = None
        if stats_a.is_file() and stats_b.is_file():  # the calibration pass, streamed vs in-device
            import numpy as np

            with np.load(stats_a) as za, np.load(stats_b) as zb:
                keys = [k for k in za.files if k != "__meta__"]
                stats_same = sorted(keys) == sorted(k for k in zb.files if k != "__meta__") and all(
                    np.array_equal(za[k], zb[k]) for k in keys)
        if rc == 0 and rc2 == 0:
            from permuquant_jax.convert.saved import load_metadata

            a, b = load_metadata(dst), load_metadata(dst2)
            same = a["permutations"] == b["permutations"] and a["act_global_scales"] == b["act_global_scales"]
        budget = dict(command=cmd2, exit_code=rc2, interrupted=int2, cli_wall_s=t2, peak_host_rss_bytes=rss2,
                      timings=tm2, same_permutations_and_scales=same, calibration_stats_bit_identical=stats_same)
        result["budget_run"] = budget
        (out / "convert_fullsize.json").write_text(json.dumps(result, indent=1))
        log(f"budget run: exit {rc2} after {t2:.1f} s, same permutations/scales: {same}, calibration statistics "
            f"bit-identical: {stats_same}", out)

    rows = [("checkpoint", f"{size / 1e9:.2f} GB BFL layout, {n_params / 1e9:.2f}B params, random bf16 "
             f"(written in {t_write:.0f} s)"),
            ("CLI options", " ".join(cli_extra) or "(defaults)"),
            ("exit", f"{rc}" + (f" (interrupted at the deadline in phase {tm.get('current', '?')})" if interrupted
                                else "")),
            ("CLI wall", f"{t_cli:.1f} s")]
    from permuquant_jax.convert.cli import PHASE_LABELS

    for k, v in tm.get("phases", {}).items():
        rows.append((f"  {PHASE_LABELS.get(k, k)}", f"{v:.1f} s"))
    after = tm.get("peak_device_bytes_after", {})
    if after:
        rows.append(("device high-water by phase end", ", ".join(f"{k} {v / 2**30:.1f}" for k, v in after.items())
                     + " GiB"))
    steps = tm.get("peak_steps") or []
    if steps:  # where the high-water mark was set: the last rise, and the largest single rise
        last = steps[-1]
        pairs = [(b, a["peak"]) for a, b in zip(steps[:-1], steps[1:], strict=True)] or [(steps[0], 0)]
        rise = max(pairs, key=lambda p: p[0]["peak"] - p[1])
        rows.append(("peak set at", f"{last['t']:.0f} s, {gib(last['peak'])} in phase {last['phase']} "
                     f"(bars: {'; '.join(last['bars']) or '-'})"))
        rows.append(("largest rise", f"+{gib(rise[0]['peak'] - rise[1])} at {rise[0]['t']:.0f} s in phase "
                     f"{rise[0]['phase']} (bars: {'; '.join(rise[0]['bars']) or '-'})"))
    rows += [("acceptance forwards", str(tm.get("forwards"))),
             ("calib / held-out batches", f"{tm.get('calib_batches')} / {tm.get('heldout_batches')}"),
             ("peak device (CLI)", f"{gib(tm.get('peak_device_bytes'))} of {gib(tm.get('device_bytes_limit'))}"),
             ("peak host RSS (CLI)", f"{gib(rss)} ({rss / max(size, 1):.2f}x the checkpoint)"),
             ("output", gib(tm.get("output_bytes")))]
    if loaded:
        rows += [("permuquant_jax.load", f"{loaded['load_s']:.1f} s (+{loaded['import_s']:.1f} s imports)"),
                 ("1 step, loaded model", f"{loaded['step_s'] * 1e3:.1f} ms (first call {loaded['first_step_s']:.1f} s "
                  f"incl. compile), finite {loaded['finite']}"),
                 ("peak device (load+step)", gib(loaded.get("peak_device_bytes")))]
    if budget is not None:
        tm2 = budget["timings"]
        rows += [("BUDGET RUN", f"--max-device-memory {args.budget_run:g}: exit {budget['exit_code']}"
                  + (f" (interrupted in phase {tm2.get('current', '?')})" if budget["interrupted"] else "")
                  + f", CLI wall {budget['cli_wall_s']:.1f} s"),
                 ("  plan", str((tm2.get("device_memory_plan") or {}).get("summary")))]
        for k, v in tm2.get("phases", {}).items():
            rows.append((f"  {PHASE_LABELS.get(k, k)}", f"{v:.1f} s"))
        after2 = tm2.get("peak_device_bytes_after", {})
        if after2:
            rows.append(("  device high-water by phase end", ", ".join(f"{k} {v / 2**30:.1f}"
                                                                         for k, v in after2.items()) + " GiB"))
        rows += [("  peak device (CLI)", f"{gib(tm2.get('peak_device_bytes'))}"),
                 ("  peak host RSS (CLI)", gib(budget["peak_host_rss_bytes"])),
                 ("  same perms + act scales", str(budget["same_permutations_and_scales"])),
                 ("  calib stats bit-identical", str(budget["calibration_stats_bit_identical"]))]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), flush=True)
    (out / "table.txt").write_text("\n".join(f"{k:<{w}}  {v}" for k, v in rows) + "\n")


if __name__ == "__main__":
    main()
