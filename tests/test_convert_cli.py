"""The main job end to end: `python -m permuquant_jax.convert`, saving, loading, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import permuquant_jax
from permuquant_jax.assets.make_tiny import tiny_tensors
from permuquant_jax.convert import load_flux
from permuquant_jax.convert.cli import main
from permuquant_jax.convert.saved import METADATA_FILE, SavedModelError, load, load_metadata, save_quantized
from permuquant_jax.models.flux import FluxConfig
from permuquant_jax.quant.flux_plan import flux_calibration_batches, flux_forward, quantize_flux
from permuquant_jax.quant.linear import QuantLinear
from permuquant_jax.quant.report import QuantReport

# Small calibration so a whole conversion stays in seconds on the CPU.
FAST = ["--calib-samples", "1", "--heldout-samples", "1", "--steps", "3", "--timesteps", "2",
        "--resolution", "64", "--accept", "layer", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schnell_like_file(tmp_path_factory) -> Path:
    """A tiny BFL-layout checkpoint without guidance embedder (the schnell key set), written here."""
    cfg = FluxConfig(**{**FluxConfig.tiny().to_dict(), "guidance_embed": False})
    path = tmp_path_factory.mktemp("src") / "flux-tiny-schnell.safetensors"
    rng_seed = int(np.random.default_rng().integers(1 << 30))
    save_file(tiny_tensors(rng_seed, cfg), str(path))
    return path


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("PERMUQUANT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "permuquant_jax.convert", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def _assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_embedded_default_end_to_end(converted_tiny):
    dst, out = converted_tiny.dst, converted_tiny.stdout  # `--out DST` + FAST, in tests/conftest.py
    for row in ("parameter bytes", "sites accepted", "held-out rel. error", "wall time"):
        assert row in out
    assert sorted(p.name for p in dst.iterdir()) == ["params", "permuquant.json", "report.json", "report.md"]
    meta = load_metadata(dst)
    assert meta["format"] == "nvfp4" and meta["method"] == "permuquant"
    assert meta["source"]["embedded"] is True and len(meta["source"]["sha256"]) == 64
    assert meta["library_version"] == permuquant_jax.__version__ and meta["jax_version"] == jax.__version__
    assert 0 < meta["heldout_rel_error"] < 0.5
    report = json.loads((dst / "report.json").read_text())
    assert len(report["sites"]) == meta["sites_total"] > 0
    # every quantized layer is NVFP4: packed codes are uint8 [.., N, K/2], block scales E4M3 [.., N, K/16]
    codes = {k: v for k, v in meta["tensors"].items() if k.endswith("w_codes")}
    assert codes and all(v["dtype"] == "uint8" for v in codes.values())
    for k, v in codes.items():
        sc = meta["tensors"][k.replace("w_codes", "w_scales")]
        assert sc["dtype"] == "float8_e4m3fn" and sc["shape"][-1] * 8 == v["shape"][-1]
    # per-layer scalars of a stacked layer carry exactly the stack axes
    for path, spec in meta["quant_layers"].items():
        for leaf in ("w_global", "act_scale"):
            assert meta["tensors"][f"{path}.{leaf}"]["shape"] == spec["stack"], (path, leaf)
    # nothing else was left beside DST
    assert [p.name for p in dst.parent.iterdir()] == ["flux-tiny-nvfp4"]
    # the loaded model runs: one jitted forward (a sampling loop and an eager call cost 2.4x the CPU time);
    # other grids: tests/test_flux_parity.py; exact equality after save/load: test_save_load_bit_identical
    model = permuquant_jax.load(dst)
    b = flux_calibration_batches(model, num_samples=1, num_steps=1, height=64, width=64)[0]
    y = flux_forward(model, b)
    assert y.shape == (1, 16, 64) and bool(jnp.isfinite(y.astype(jnp.float32)).all())


# permuquant runs in the embedded end-to-end test; plain hadamard, smoothquant and auto (the CLI path of
# permuquant-h: the same site plan and Hadamard option) in the library tests (CI time)
@pytest.mark.parametrize("method", ["rtn", "permuquant-h"])
def test_each_method_on_a_bfl_file(schnell_like_file, tmp_path, capsys, method):
    dst = tmp_path / f"out-{method}"
    rot = ["--fixed-hadamard", "--hadamard-block", "32"] if method == "permuquant-h" else []  # every linear rotated
    assert main([str(schnell_like_file), "--out", str(dst), "--method", method, *rot, *FAST]) == 0
    meta = load_metadata(dst)
    assert meta["method"] == method and meta["config"]["guidance_embed"] is False
    err = meta["heldout_rel_error"]
    print(f"{method}: held-out relative output error {err:.4f}")
    assert np.isfinite(err) and 0 < err < 0.5
    kinds = {k.rsplit(".", 1)[-1] for k in meta["tensors"]}
    assert {"w_codes", "w_scales", "w_global"} <= kinds
    blocks = {p: spec["hadamard_block"] for p, spec in meta["quant_layers"].items()}
    assert set(blocks.values()) == ({32} if rot else {None}), blocks
    if rot:  # the rotations come back with the loaded layers (nothing else saves a rotated model)
        model = permuquant_jax.load(dst)
        got = {".".join(map(str, p)): n.hadamard_block for p, n in nnx.iter_graph(model) if isinstance(n, QuantLinear)}
        assert got == blocks


def test_dry_run_writes_nothing(tmp_path, capsys):
    dst = tmp_path / "never"
    assert main(["--dry-run", "--out", str(dst), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "permutation sites" in out and "parameter bytes" in out and "dry run: nothing written" in out
    assert "double_blocks.img_attn.qkv" in out and "single_blocks.linear2" in out
    assert not dst.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def quantized_tiny():
    """The embedded model quantized in memory with PermuQuant (gathers and permutations included)."""
    model = load_flux(None, dtype=jnp.bfloat16)
    batches = flux_calibration_batches(model, num_samples=1, num_steps=3, calib_steps=2, height=64, width=64)
    model, report = quantize_flux(model, batches, progress=False, accept="layer")  # save/load mechanics, not quality
    assert report.n_accepted > 0
    return model, batches, report


def test_save_load_bit_identical(tmp_path, quantized_tiny):
    model, batches, report = quantized_tiny
    from permuquant_jax.quant.linear import prepare_device_layouts

    assert prepare_device_layouts(model, force=True) > 0  # prepared for the GPU kernel: saved with canonical scales
    save_quantized(model, tmp_path / "m", metadata={"format": "nvfp4", "method": "permuquant"}, report=report)
    loaded = load(tmp_path / "m")
    n_quant = sum(isinstance(n, QuantLinear) for _, n in nnx.iter_graph(loaded))
    assert n_quant == len(load_metadata(tmp_path / "m")["quant_layers"]) > 0
    rng = np.random.default_rng()
    b = dict(batches[-1])
    b["img"] = jnp.asarray(rng.standard_normal(b["img"].shape), jnp.float32)
    a, c = flux_forward(model, b), flux_forward(loaded, b)
    assert a.dtype == c.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32))


def test_load_rejects_mismatched_or_corrupted(tmp_path, quantized_tiny):
    model, _, _ = quantized_tiny
    d = tmp_path / "m"
    save_quantized(model, d, metadata={"format": "nvfp4", "method": "permuquant"})
    meta_file = d / METADATA_FILE
    good = meta_file.read_text()

    def edit(fn):
        meta = json.loads(good)
        fn(meta)
        meta_file.write_text(json.dumps(meta))

    edit(lambda m: m.update(format_version=99))
    with pytest.raises(SavedModelError, match="format_version 99"):
        load(d)
    edit(lambda m: m.update(library_version="99.0.0"))
    with pytest.raises(SavedModelError, match="upgrade permuquant-jax"):
        load(d)
    edit(lambda m: m.update(tensors_sha256="0" * 64))
    with pytest.raises(SavedModelError, match="field 'tensors_sha256' does not match"):
        load(d)
    meta_file.write_text(good[: len(good) // 2])
    with pytest.raises(SavedModelError, match="not valid JSON"):
        load(d)
    meta_file.unlink()
    with pytest.raises(SavedModelError, match="no permuquant.json"):
        load(d)


def _fast_quantize(model, batches, **kwargs):
    """Stands in for the (slow) quantization where a test is about the output directory only."""
    return model, QuantReport(method=kwargs["method"], format=kwargs["format"], config={})


@pytest.mark.parametrize("failure", [OSError("disk full (simulated)"), KeyboardInterrupt()])
def test_failed_or_interrupted_save_leaves_no_output(tmp_path, monkeypatch, failure):
    import permuquant_jax.convert.saved as saved
    import permuquant_jax.quant.flux_plan as flux_plan

    real_save = saved.save_quantized

    def save_then_fail(model, directory, **kwargs):
        real_save(model, directory, **kwargs)  # everything written, then the last step fails
        raise failure

    import permuquant_jax.quant as quant
    from permuquant_jax.quant.calibrate import CalibrationStats

    monkeypatch.setattr(quant, "calibrate", lambda *a, **k: CalibrationStats(layers={}, batches=1))
    monkeypatch.setattr(flux_plan, "quantize_flux", _fast_quantize)
    monkeypatch.setattr(saved, "save_quantized", save_then_fail)
    dst = tmp_path / "dst"
    expected = 130 if isinstance(failure, KeyboardInterrupt) else 2
    assert main(["--out", str(dst), *FAST]) == expected
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- command-line errors
# In a real process: the exit code, the single 'error:' line and the absence of a traceback are what a
# user sees. The other bad inputs (bad SRC, DST, options, --calib files) are the door cases of
# tests/test_hostile_convert.py, all run in one subprocess.


def test_cli_error_is_one_line_without_traceback(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(tiny_tensors(1), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = _run_cli([str(truncated), "--out", str(tmp_path / "d1"), *FAST])
    _assert_user_error(proc, "truncated.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors", "truncated.safetensors"]


def test_help_documents_every_option():
    proc = _run_cli(["--help"])
    assert proc.returncode == 0
    for opt in ("--out", "--format", "--method", "--alpha", "--tau", "--calib", "--calib-samples",
                "--timesteps", "--keep-bf16", "--dry-run", "--overwrite", "--guard", "--hadamard-start", "default"):
        assert opt in proc.stdout, opt


def test_trained_tiny_dit_sets_calibration_defaults():
    """The embedded pipeline's DiT was trained at 64 px with 24 T5 tokens and 20 steps: convert calibrates
    there unless told otherwise; a real checkpoint (no training record) keeps the FLUX defaults."""
    import argparse

    from permuquant_jax.convert.cli import _trained_defaults
    from permuquant_jax.generate.pipeline import embedded_transformer_path

    args = argparse.Namespace(max_seq_len=None, resolution=None, steps=None)
    _trained_defaults(args, embedded_transformer_path())
    assert (args.max_seq_len, args.resolution, args.steps) == (24, 64, 20)
    args = argparse.Namespace(max_seq_len=16, resolution=None, steps=3)
    _trained_defaults(args, embedded_transformer_path())
    assert (args.max_seq_len, args.resolution, args.steps) == (16, 64, 3)
    args = argparse.Namespace(max_seq_len=None, resolution=None, steps=None)
    _trained_defaults(args, Path(permuquant_jax.__file__).parent / "assets" / "flux_tiny.safetensors")
    assert (args.max_seq_len, args.resolution, args.steps) == (None, None, None)
    # calibrated on prompts: the captions of its training grammar, unless --prompts or --calib is given
    from permuquant_jax.generate.pipeline import calibration_prompts_path

    captions = calibration_prompts_path(embedded_transformer_path())
    assert captions is not None and captions.name == "calibration_prompts.txt"
    for given, want in ((dict(prompts=None, calib=None), str(captions)), (dict(prompts="my.txt", calib=None), "my.txt"),
                        (dict(prompts=None, calib="c.npz"), None)):
        args = argparse.Namespace(max_seq_len=None, resolution=None, steps=None, src=None, text_encoders="enc",
                                  **given)
        _trained_defaults(args, embedded_transformer_path())
        assert args.prompts == want, given
    args = argparse.Namespace(max_seq_len=None, resolution=None, steps=None, src="dit.safetensors",
                              text_encoders=None, prompts=None, calib=None)  # a DiT file, no encoders: synthetic
    _trained_defaults(args, embedded_transformer_path())
    assert args.prompts is None


def test_timings_memory_timeline(tmp_path, monkeypatch):
    """--timings' device high-water timeline: a rise of the allocator's peak is recorded with the phase and
    the open progress bars; smaller rises are not (a fake device: the CPU reports no memory statistics)."""
    import threading

    from tqdm.auto import tqdm

    from permuquant_jax.convert import cli

    peaks = iter([1, 2, 3, 5] + [5] * 10_000)  # GiB, one value per poll of the watcher
    seen = threading.Event()

    class Dev:
        device_kind = "fake"

        def memory_stats(self):
            if threading.current_thread().name != "permuquant-memory-watch":
                return {"peak_bytes_in_use": 2**30, "bytes_in_use": 2**30, "bytes_limit": 8 * 2**30}
            p = next(peaks)
            if p == 5:
                seen.set()
            return {"peak_bytes_in_use": p * 2**30, "bytes_in_use": 2**30, "bytes_limit": 8 * 2**30}

    monkeypatch.setattr(jax, "devices", lambda *a: [Dev()])
    clock = cli.PhaseClock(str(tmp_path / "t.json"))
    clock.enter("quantizing")
    with tqdm(total=4, desc="block-level decisions") as bar:
        bar.update(1)
        clock.watch_memory(step_bytes=2 * 2**30, every_s=0.01)
        assert seen.wait(10)
        time.sleep(0.05)
    clock.enter("saving")
    steps = json.loads((tmp_path / "t.json").read_text())["peak_steps"]
    assert [s["peak"] // 2**30 for s in steps] == [2, 5]  # rises of >= 2 GiB over the last record (from 0); 3 is not
    assert all(s["phase"] == "quantizing" and s["bars"] == ["block-level decisions 1/4"] for s in steps)


def test_signal_during_one_long_call_ends_at_once_with_nothing_written(tmp_path, monkeypatch, capsys):
    """A signal while the job sits in one long call (an XLA program: no Python bytecode runs, so no
    handler) is answered by the main thread within ~GRACE_S: temporary output removed, exit 130; the job,
    should it come back, commits nothing."""
    import signal
    import threading

    from permuquant_jax.convert import atomic, cli

    dst, entered, release, done = tmp_path / "dst", threading.Event(), threading.Event(), threading.Event()

    def job(argv):  # stands for run(): the output is being built, then one call that does not return soon
        try:
            with atomic.atomic_output_dir(dst) as tmp:
                (tmp / "partial.bin").write_bytes(b"x")
                entered.set()
                release.wait(60)
            return 0
        finally:
            done.set()

    monkeypatch.setattr(cli, "_main", job)
    threading.Thread(target=lambda: entered.wait(30) and os.kill(os.getpid(), signal.SIGINT), daemon=True).start()
    rc = main(["--out", str(dst)])
    assert rc == 130 and not done.is_set(), rc  # answered while the job is still inside its long call
    assert list(tmp_path.iterdir()) == []  # removed while the job still runs
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "interrupted by SIGINT while starting: nothing was written", last
    release.set()  # the job comes back: it stops at its commit, nothing appears
    assert done.wait(30) and list(tmp_path.iterdir()) == []


def test_device_memory_plan_streams_only_when_the_model_does_not_fit():
    from permuquant_jax.convert.cli import STREAM_ROOM, device_memory_plan
    from permuquant_jax.convert.validate import UsageError

    dev = int(22.2 * 2**30)  # FLUX.1-dev's bf16 weights
    assert device_memory_plan(dev, 24)["stream"] and "STREAMED" in device_memory_plan(dev, 24)["summary"]
    fits = device_memory_plan(dev, 22.2 * STREAM_ROOM + 0.1)
    assert not fits["stream"] and fits["need_bytes"] == int(dev * STREAM_ROOM)
    assert not device_memory_plan(dev, 24, n_dev=2, fsdp=True)["stream"]  # half the weights per device
    with pytest.raises(UsageError, match="--fsdp"):
        device_memory_plan(dev, 24, n_dev=2)


def test_folding_and_quantizing_streamed_weights_equal_the_in_device_ones():
    """A streamed run's last phases on host-memory block weights (`models.flux.offload_blocks`): folding a
    permutation keeps the kernel on the host, quantizing puts the layer on the device, and both give the
    arrays of the in-device path bit for bit (so the CLI's door probe `streamed_folding_error` passes)."""
    import jax
    from flax import nnx

    from permuquant_jax.convert.cli import streamed_folding_error
    from permuquant_jax.models.flux import host_sharding
    from permuquant_jax.models.layers import Linear
    from permuquant_jax.quant.fold import permute_consumer
    from permuquant_jax.quant.linear import QuantLinear
    from permuquant_jax.quant.sites import Ref

    assert streamed_folding_error("nvfp4") is None
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 64, 32)).astype(np.float32)
    b = rng.standard_normal((2, 32)).astype(np.float32)
    perm = np.stack([rng.permutation(64) for _ in range(2)])
    out = {}
    for where in ("device", "host"):
        m = nnx.Dict(lin=Linear(64, 32, rngs=nnx.Rngs(0)))
        put = (lambda x: jax.device_put(x, host_sharding())) if where == "host" else jnp.asarray
        m.lin.kernel.set_value(put(w))
        m.lin.bias.set_value(put(b))
        permute_consumer(m, Ref(("lin",)), 64, perm)
        kind = m.lin.kernel.get_value().sharding.memory_kind
        q = QuantLinear.from_linear(m.lin, format="nvfp4")
        out[where] = (kind, np.asarray(m.lin.kernel.get_value()),
                      [np.asarray(x).view(np.uint8) for x in jax.tree.leaves(nnx.state(q))])
    assert out["host"][0] == "pinned_host" and out["device"][0] == "device"
    np.testing.assert_array_equal(out["host"][1], out["device"][1])
    assert len(out["host"][2]) == len(out["device"][2]) >= 4
    for x, y in zip(out["host"][2], out["device"][2], strict=True):
        np.testing.assert_array_equal(x, y)
