"""Hostile and careless input to the converter and the loader (issue 12, converter/output half).

Every bad input is built here, at test time, from the embedded checkpoint. What a user sees is checked
in subprocesses: the exit code (2; 130 / 143 for signals), exactly one `error:` line naming the option
or file and expected vs found, no traceback, no DST, no temporary directory left, and the inputs'
bytes unchanged. The cases that fail at the door run in ONE subprocess (`python THIS_FILE driver`,
which calls `cli.main(argv)` per case and prints JSON), so the interpreter and JAX start once.
Loader cases edit `permuquant.json` of the one shared conversion (`converted_tiny`, tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = ["--calib-samples", "1", "--heldout-samples", "1", "--steps", "3", "--timesteps", "2",
        "--resolution", "64", "--accept", "layer", "--no-progress"]


def _env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("PERMUQUANT_DEBUG", None)
    return env


def _tree_hash(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (symlinks as their target text), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[rel] = "dir"
    return out


def _leftovers(root: Path) -> list[str]:
    """Temporary directories of the converter anywhere under `root`."""
    return sorted(str(p) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------- the inputs


def _tiny_config(**overrides):
    from permuquant_jax.models.flux import FluxConfig

    return FluxConfig(**{**FluxConfig.tiny().to_dict(), **overrides})


def _write_pipeline(root: Path) -> Path:
    """A diffusers pipeline folder (model_index.json, transformer/, vae/) holding the tiny transformer."""
    from safetensors.numpy import save_file

    from permuquant_jax.convert.keymap import diffusers_keymap

    cfg = _tiny_config()
    rng = np.random.default_rng(0)
    tensors = {k: (0.05 * rng.standard_normal(e.shape)).astype(np.float32).astype(ml_dtypes.bfloat16)
               for k, e in sorted(diffusers_keymap(cfg).items())}
    tr = root / "transformer"
    tr.mkdir(parents=True)
    save_file(tensors, str(tr / "diffusion_pytorch_model.safetensors"))
    (tr / "config.json").write_text(json.dumps({
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": cfg.in_channels,
        "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks, "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads, "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim, "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.axes_dim)}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text("{}")
    return root


def _npz(path: Path, txt=None, y=None, **extra) -> str:
    arrays = {}
    if txt is not None:
        arrays["txt"] = txt
    if y is not None:
        arrays["y"] = y
    np.savez(path, **arrays, **extra)
    return str(path)


def _build_inputs(tmp: Path) -> dict[str, str]:
    """Every input the door cases name, under tmp/in (hashed before and after) and tmp/out."""
    from safetensors.numpy import save_file

    from permuquant_jax.assets.make_tiny import tiny_tensors
    from permuquant_jax.convert.checkpoint import default_checkpoint_path

    inp, out = tmp / "in", tmp / "out"
    inp.mkdir()
    out.mkdir()
    (inp / "ckpt").mkdir()
    src = inp / "ckpt" / "flux-tiny.safetensors"
    shutil.copyfile(default_checkpoint_path(), src)
    schnell = inp / "flux-tiny-schnell.safetensors"
    save_file(tiny_tensors(3, _tiny_config(guidance_embed=False)), str(schnell))
    pipe = _write_pipeline(inp / "FLUX.1-tiny")
    (out / "link-to-pipeline").symlink_to(pipe, target_is_directory=True)
    foreign = out / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    plain = inp / "notes.txt"
    plain.write_text("a file, not a directory")
    z = np.zeros
    nan_txt = z((2, 8, 4096), np.float32)
    nan_txt[1, 2, 3] = np.nan
    inf_y = z((2, 768), np.float32)
    inf_y[0, 5] = np.inf
    huge_y = np.full((1, 768), 1e30, np.float32)  # finite, but the float model's trajectory overflows
    obj = np.empty((2,), object)
    obj[:] = [1, "a"]
    (inp / "calib-dir.npz").mkdir()
    good = src.read_bytes()
    (inp / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    save_file({"encoder.conv_in.weight": z((128, 3, 3, 3), np.float32), "decoder.conv_out.bias": z((3,), np.float32)},
              str(inp / "vae.safetensors"))
    (out / "empty").mkdir()
    (inp / "text.npz").write_text("not an npz")
    paths = dict(
        tmp=str(tmp), src=str(src), indir=str(inp / "ckpt"), schnell=str(schnell), pipe=str(pipe),
        link=str(out / "link-to-pipeline"), foreign=str(foreign), file=str(plain),
        npz_good=_npz(inp / "good.npz", z((2, 8, 4096), np.float32), z((2, 768), np.float32)),
        npz_nan=_npz(inp / "nan.npz", nan_txt, z((2, 768), np.float32)),
        npz_inf=_npz(inp / "inf.npz", z((2, 8, 4096), np.float32), inf_y),
        npz_empty=_npz(inp / "empty.npz", z((0, 8, 4096), np.float32), z((0, 768), np.float32)),
        npz_mismatch=_npz(inp / "mismatch.npz", z((2, 8, 4096), np.float32), z((3, 768), np.float32)),
        npz_2d=_npz(inp / "flat.npz", z((2, 4096), np.float32), z((2, 768), np.float32)),
        npz_int=_npz(inp / "int.npz", z((2, 8, 4096), np.int32), z((2, 768), np.float32)),
        npz_no_y=_npz(inp / "no-y.npz", z((2, 8, 4096), np.float32), None, pooled=z((2, 768), np.float32)),
        npz_object=_npz(inp / "object.npz", obj, z((2, 768), np.float32)),
        npz_overflow=_npz(inp / "overflow.npz", np.full((1, 4, 4096), 1e300), z((1, 768))),
        npz_narrow=_npz(inp / "narrow.npz", z((2, 8, 100), np.float32), z((2, 768), np.float32)),
        npz_huge=_npz(inp / "huge.npz", z((1, 8, 4096), np.float32), huge_y),
        npz_text=str(inp / "text.npz"), npz_dir=str(inp / "calib-dir.npz"),
        truncated=str(inp / "truncated.safetensors"), vae=str(inp / "vae.safetensors"), empty=str(out / "empty"),
    )
    return paths


# id, argv, substrings of the error line, DST that must not exist afterwards (None: DST pre-exists or
# is an input, whose bytes the source hash covers), expected exit code.
S, O = "{src}", "{out}"
DOOR_CASES = [
    # never destroy input (the data-loss bug first: it deleted the pipeline and wrote the output there)
    ("dst-is-src-pipeline", ["{pipe}", "--out", "{pipe}", "--overwrite"], ["is the input SRC", "{pipe}"], None),
    ("dst-inside-src", ["{pipe}", "--out", "{pipe}/quantized"], ["lies inside the input SRC"], "{pipe}/quantized"),
    ("dst-contains-src", [S, "--out", "{indir}", "--overwrite"], ["contains the input SRC", "{src}"], None),
    ("dst-symlink-to-src", ["{pipe}", "--out", "{link}", "--overwrite"], ["is the input SRC", "resolved"], None),
    ("dst-is-calib", [S, "--out", "{npz_good}", "--calib", "{npz_good}", "--overwrite"],
     ["is the input --calib"], None),
    ("overwrite-foreign-dir", [S, "--out", "{foreign}", "--overwrite"],
     ["{foreign}", "not a permuquant-jax output", "permuquant.json"], None),
    ("exists-without-overwrite", [S, "--out", "{foreign}"], ["already exists", "--overwrite"], None),
    ("dst-parent-is-file", [S, "--out", "{file}/sub/dst"], ["{file} is a file"], "{file}/sub/dst"),
    ("dst-parent-is-a-file", [S, "--out", "{file}/dst"], ["{file}"], "{file}/dst"),
    ("exists-empty-without-overwrite", [S, "--out", "{empty}"], ["{empty}", "--overwrite"], None),
    # SRC
    ("src-missing", ["{tmp}/in/missing.safetensors", "--out", O], ["missing.safetensors"], O),
    ("src-truncated", ["{truncated}", "--out", O], ["truncated.safetensors"], O),
    ("src-not-flux", ["{vae}", "--out", O], ["vae.safetensors"], O),
    ("dst-parent-missing", [S, "--out", "{tmp}/out/nope/dst"], ["does not exist", "create it"],
     "{tmp}/out/nope"),
    ("no-out", [S], ["--out DST is required"], None),
    # options against the model (header-only config)
    ("hadamard-not-pow2", [S, "--out", O, "--method", "hadamard", "--hadamard-block", "3"],
     ["--hadamard-block", "power of two", "found 3"], O),
    ("hadamard-not-pow2-unused", [S, "--out", O, "--hadamard-block", "48"], ["--hadamard-block", "found 48"], O),
    ("hadamard-not-dividing", [S, "--out", O, "--method", "permuquant-h", "--hadamard-block", "128", "--keep-bf16"],
     ["--hadamard-block 128", "'img_in'", "64 channels"], O),
    ("keep-bad-regex", [S, "--out", O, "--keep-bf16", "re:(("], ["'re:(('", "not a valid regular expression"], O),
    ("keep-matches-nothing", [S, "--out", O, "--keep-bf16", "txt_inn"],
     ["'txt_inn'", "matches no linear", "closest", "txt_in"], O),
    ("keep-guidance-on-schnell", ["{schnell}", "--out", O, "--keep-bf16", "guidance_in.*"],
     ["'guidance_in.*'", "matches no linear"], O),
    ("keep-everything", [S, "--out", O, "--keep-bf16", "*"], ["nothing would be quantized"], O),
    ("format-unknown", [S, "--out", O, "--format", "nvfp5"], ["nvfp5", "nvfp4"], O),
    ("method-unknown", [S, "--out", O, "--method", "gptq"], ["--method", "'gptq'"], O),
    ("calib-and-prompts", [S, "--out", O, "--calib", "{npz_good}", "--prompts", "{npz_good}"],
     ["--calib", "--prompts", "choose one"], O),
    ("prompts-missing", [S, "--out", O, "--prompts", "{tmp}/no-prompts.txt"], ["--prompts", "no such file"], O),
    ("text-encoders-not-dir", [S, "--out", O, "--text-encoders", "{npz_good}"], ["--text-encoders", "not a folder"],
     O),
    ("parallel-needs-block", [S, "--out", O, "--accept", "model", "--schedule", "parallel"],
     ["--schedule parallel", "--accept block"], O),
    ("rollout-negative", [S, "--out", O, "--rollout", "-1"], ["--rollout", ">= 0", "found -1"], O),
    ("rollout-with-block", [S, "--out", O, "--accept", "block", "--rollout", "2"],
     ["--rollout 2", "model-level acceptance", "--accept block"], O),
    ("rollout-past-schedule", [S, "--out", O, "--steps", "3", "--rollout", "4"],
     ["--rollout 4", "3-step calibration schedule", "--rollout <= 3"], O),
    # option ranges
    ("alpha-out-of-range", [S, "--out", O, "--alpha", "0,1.5"], ["--alpha", "1.5", "[0, 1]"], O),
    ("alpha-nan", [S, "--out", O, "--alpha", "0.5,nan"], ["--alpha", "nan"], O),
    ("alpha-not-a-number", [S, "--out", O, "--alpha", "0,x"], ["--alpha", "'0,x'"], O),
    ("alpha-empty", [S, "--out", O, "--alpha", ","], ["--alpha", "at least one"], O),
    ("tau-nan", [S, "--out", O, "--tau", "nan"], ["--tau", "finite", "nan"], O),
    ("tau-inf", [S, "--out", O, "--tau", "inf"], ["--tau", "finite", "inf"], O),
    ("tau-negative", [S, "--out", O, "--tau", "-0.1"], ["--tau", "-0.1"], O),
    ("tau-not-a-number", [S, "--out", O, "--tau", "abc"], ["--tau", "'abc'"], O),
    ("guard-negative", [S, "--out", O, "--guard", "-0.5"], ["--guard", "-0.5"], O),
    ("hadamard-start-unknown", [S, "--out", O, "--hadamard-start", "all"], ["--hadamard-start", "'all'"], O),
    ("guidance-inf", [S, "--out", O, "--guidance", "inf"], ["--guidance", "finite", "inf"], O),
    ("guidance-nan", [S, "--out", O, "--guidance", "nan"], ["--guidance", "nan"], O),
    ("smooth-alpha-range", [S, "--out", O, "--smooth-alpha", "1.5"], ["--smooth-alpha", "[0, 1]", "1.5"], O),
    ("calib-samples-0", [S, "--out", O, "--calib-samples", "0"], ["--calib-samples", ">= 1", "found 0"], O),
    ("timesteps-0", [S, "--out", O, "--timesteps", "0"], ["--timesteps", ">= 1", "found 0"], O),
    ("steps-0", [S, "--out", O, "--steps", "0"], ["--steps", ">= 1", "found 0"], O),
    ("heldout-negative", [S, "--out", O, "--heldout-samples", "-1"], ["--heldout-samples", ">= 0", "-1"], O),
    ("resolution-100", [S, "--out", O, "--resolution", "100"], ["--resolution", "multiple of 16", "100"], O),
    ("resolution-0", [S, "--out", O, "--resolution", "0"], ["--resolution", "multiple of 16", "found 0"], O),
    ("resolution-huge", [S, "--out", O, "--resolution", "100000"], ["--resolution 100000", "exceeds 4096"], O),
    ("calib-samples-huge", [S, "--out", O, "--calib-samples", "1000000000", "--method", "rtn", "--heldout-samples",
                            "0", "--resolution", "32", "--no-progress"],
     ["out of memory while", "--calib-samples", "nothing was written"], O),
    ("seed-negative", [S, "--out", O, "--seed", "-1"], ["--seed", "found -1"], O),
    ("steps-not-int", [S, "--out", O, "--steps", "2.5"], ["--steps", "'2.5'"], O),
    # --calib .npz
    ("calib-missing", [S, "--out", O, "--calib", "{tmp}/in/none.npz"], ["none.npz", "no such file"], O),
    ("calib-directory", [S, "--out", O, "--calib", "{npz_dir}"], ["calib-dir.npz", "is a directory"], O),
    ("calib-not-npz", [S, "--out", O, "--calib", "{npz_text}"], ["text.npz", "not a readable .npz"], O),
    ("calib-nan", [S, "--out", O, "--calib", "{npz_nan}"], ["nan.npz", "'txt'", "non-finite", "nan", "[1, 2, 3]"], O),
    ("calib-inf", [S, "--out", O, "--calib", "{npz_inf}"], ["inf.npz", "'y'", "inf", "[0, 5]"], O),
    ("calib-zero-prompts", [S, "--out", O, "--calib", "{npz_empty}"], ["empty.npz", "no prompts", "[0, 8, 4096]"],
     O),
    ("calib-n-mismatch", [S, "--out", O, "--calib", "{npz_mismatch}"], ["2 prompts", "'y' has 3"], O),
    ("calib-txt-2d", [S, "--out", O, "--calib", "{npz_2d}"], ["'txt' must be [N, S, 4096]", "[2, 4096]"], O),
    ("calib-int-dtype", [S, "--out", O, "--calib", "{npz_int}"], ["'txt'", "dtype int32", "float"], O),
    ("calib-missing-y", [S, "--out", O, "--calib", "{npz_no_y}"], ["missing array 'y'", "pooled"], O),
    ("calib-object-array", [S, "--out", O, "--calib", "{npz_object}"], ["object.npz", "'txt'", "cannot be read"], O),
    ("calib-overflow", [S, "--out", O, "--calib", "{npz_overflow}"], ["'txt'", "overflows float32"], O),
    ("calib-width", [S, "--out", O, "--calib", "{npz_narrow}"], ["narrow.npz", "width 100", "4096"], O),
    # runs that produce NaN: the float model's trajectory overflows on huge (finite) pooled embeddings
    ("nonfinite-trajectory", [S, "--out", O, "--calib", "{npz_huge}", "--method", "rtn", "--steps", "2",
                              "--timesteps", "2", "--heldout-samples", "0", "--resolution", "32", "--no-progress"],
     ["calibration batch", "'img'", "nothing was written"], O),
    # accepted: a default pattern that does not apply (guidance_in on schnell) is skipped silently;
    # the pipeline folder above is a loadable SRC (the data-loss case was real)
    ("dry-run-schnell", ["{schnell}", "--dry-run", "--no-progress"], [], None, 0),
    ("dry-run-pipeline", ["{pipe}", "--dry-run", "--no-progress"], [], None, 0),
]
if os.geteuid() != 0:  # root reads and writes everything
    DOOR_CASES += [
        ("calib-unreadable", [S, "--out", O, "--calib", "{npz_locked}"], ["locked.npz", "ermission denied"], O),
        ("dst-parent-unwritable", [S, "--out", "{locked_dir}/dst"], ["not writable"], "{locked_dir}/dst"),
    ]


def _fill(text: str, paths: dict[str, str], case_id: str) -> str:
    return text.format(**paths, out=f"{paths['tmp']}/out/{case_id}")


def _driver(cases_file: str) -> None:
    """Run `cli.main(argv)` for each case of the JSON file; print [{id, rc, stderr, stdout}] as JSON."""
    from permuquant_jax.convert.cli import main

    results = []
    for case_id, argv in json.loads(Path(cases_file).read_text()):
        err, out = io.StringIO(), io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = main(argv)
            except BaseException:  # noqa: BLE001 - an escaped exception is what the test must see
                rc = "uncaught"
                err.write(traceback.format_exc())
        results.append(dict(id=case_id, rc=rc, stderr=err.getvalue(), stdout=out.getvalue(),
                            seconds=round(time.perf_counter() - t, 2)))
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    """Build the inputs, hash them, run every door case in one subprocess, hash again."""
    tmp = Path(tmp_path_factory.mktemp("hostile"))
    paths = _build_inputs(tmp)
    if os.geteuid() != 0:
        locked = Path(paths["tmp"]) / "in" / "locked.npz"
        _npz(locked, np.zeros((1, 8, 4096), np.float32), np.zeros((1, 768), np.float32))
        locked.chmod(0)
        ro = Path(paths["tmp"]) / "out" / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        paths.update(npz_locked=str(locked), locked_dir=str(ro))
    before = _tree_hash(tmp / "in"), _tree_hash(tmp / "out")
    cases = [(c[0], [_fill(a, paths, c[0]) for a in c[1]]) for c in DOOR_CASES]
    cases_file = tmp / "cases.json"
    cases_file.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, __file__, "driver", str(cases_file)], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=900)
    cases_file.unlink()
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    results = {r["id"]: r for r in json.loads(line[0][len("RESULTS "):])}
    after = _tree_hash(tmp / "in"), _tree_hash(tmp / "out")
    return dict(paths=paths, results=results, before=before, after=after, tmp=tmp)


@pytest.mark.parametrize("case", DOOR_CASES, ids=[c[0] for c in DOOR_CASES])
def test_door_case(door, case):
    case_id, _, needles, dst = case[:4]
    want_rc = case[4] if len(case) > 4 else 2
    r = door["results"][case_id]
    assert r["rc"] == want_rc, (r["rc"], r["stderr"][-2000:])
    assert "Traceback" not in r["stderr"] and "Exception ignored" not in r["stderr"], r["stderr"]
    errors = [ln for ln in r["stderr"].splitlines() if ln.startswith("error:")]
    if want_rc == 0:
        assert errors == [] and "dry run: nothing written" in r["stdout"], r["stderr"]
        return
    assert len(errors) == 1, r["stderr"]
    for n in needles:
        assert _fill(n, door["paths"], case_id) in errors[0], (n, errors[0])
    if dst is not None:
        assert not Path(_fill(dst, door["paths"], case_id)).exists()


def test_door_cases_touch_no_input_and_leave_nothing(door):
    assert door["after"] == door["before"]  # every input byte (and every pre-existing DST) unchanged
    assert _leftovers(door["tmp"]) == []
    fast = [r["seconds"] for k, r in door["results"].items() if k != "nonfinite-trajectory"]
    print(f"{len(fast)} door cases, slowest {max(fast):.2f} s; nonfinite run "
          f"{door['results']['nonfinite-trajectory']['seconds']:.1f} s")


# ----------------------------------------------------------------------------- the loader


def _edit_copy(converted_tiny, tmp_path, fn) -> Path:
    d = tmp_path / "m"
    shutil.copytree(converted_tiny.dst, d)
    meta_file = d / "permuquant.json"
    meta = json.loads(meta_file.read_text())
    fn(meta)
    meta_file.write_text(json.dumps(meta))
    return d


def _first(d: dict) -> str:
    return sorted(d)[0]


LOADER_EDITS = [
    ("config.theta", lambda m: m["config"].update(theta=20000), "config.theta"),
    ("config.axes_dim", lambda m: m["config"].update(axes_dim=[8, 24, 32]), "config.axes_dim"),
    ("dtype", lambda m: m.update(dtype="float32"), "'dtype'"),
    ("format", lambda m: m.update(format="mxfp4"), "'format'"),
    ("method", lambda m: m.pop("method"), "'method'"),
    ("settings.keep_bf16", lambda m: m["settings"].update(keep_bf16=[]), "settings.keep_bf16"),
    ("layer hadamard_block", lambda m: m["quant_layers"][_first(m["quant_layers"])].update(hadamard_block=16),
     "quant_layers.double_blocks."),
    ("permutation", lambda m: m["permutations"][_first(m["permutations"])][0].reverse(), "permutations."),
    ("act global scale", lambda m: m["act_global_scales"].update({_first(m["act_global_scales"]): None}),
     "act_global_scales."),
    ("tensor manifest", lambda m: m["tensors"][_first(m["tensors"])].update(dtype="float32"), "tensors."),
    ("added field", lambda m: m.update(note="hi"), "'note'"),
]


@pytest.mark.parametrize("edit", LOADER_EDITS, ids=[e[0] for e in LOADER_EDITS])
def test_load_names_the_edited_field(converted_tiny, tmp_path, edit):
    from permuquant_jax.convert.saved import SavedModelError, load

    _, fn, needle = edit
    d = _edit_copy(converted_tiny, tmp_path, fn)
    with pytest.raises(SavedModelError, match="does not match the SHA-256") as e:
        load(d)
    assert needle in str(e.value), str(e.value)


def test_load_rejects_old_versions_nan_and_a_consistent_forgery(converted_tiny, tmp_path):
    from permuquant_jax.convert.saved import SavedModelError, field_digests, load

    d = _edit_copy(converted_tiny, tmp_path, lambda m: m.update(format_version=1))
    with pytest.raises(SavedModelError, match="format_version 1, .* reads version 2: convert the model again"):
        load(d)
    meta_file = d / "permuquant.json"
    good = (converted_tiny.dst / "permuquant.json").read_text()
    meta_file.write_text(good.replace('"theta": 10000', '"theta": NaN'))
    with pytest.raises(SavedModelError, match="not valid JSON.*NaN"):
        load(d)
    meta = json.loads(good)
    del meta["fields_sha256"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match="lacks the key 'fields_sha256'"):
        load(d)
    # the fields' digests recomputed after an edit of the arrays' hash: the arrays still decide
    meta["tensors_sha256"] = "0" * 64
    meta["fields_sha256"] = field_digests(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SavedModelError, match="arrays' SHA-256 does not match"):
        load(d)


def test_output_is_strict_json_with_umask_permissions(converted_tiny):
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    for name in ("permuquant.json", "report.json"):
        json.loads((converted_tiny.dst / name).read_text(), parse_constant=no_constants)
    mask = os.umask(0o022)
    os.umask(mask)
    assert converted_tiny.dst.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (converted_tiny.dst / "permuquant.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_overwrite_previous_output_is_deterministic(converted_tiny, tmp_path):
    """--overwrite of a previous output: replaced by a run with the same seed, identical tensors."""
    from permuquant_jax.convert.cli import main

    dst = tmp_path / "prev"
    shutil.copytree(converted_tiny.dst, dst)
    old = json.loads((dst / "permuquant.json").read_text())
    argv = [a if a != str(converted_tiny.dst) else str(dst) for a in converted_tiny.argv]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*argv, "--overwrite"]) == 0
    new = json.loads((dst / "permuquant.json").read_text())
    assert new["fields_sha256"] != old["fields_sha256"]  # rewritten (a new creation time at least)
    assert new["tensors_sha256"] == old["tensors_sha256"]
    assert new["permutations"] == old["permutations"]
    assert [p.name for p in tmp_path.iterdir()] == ["prev"]


# ----------------------------------------------------------------------------- signals


SIGNAL_CASES = [  # id, signal, the stderr line after which it is sent, delay (s), expected phase
    ("sigint-loading", signal.SIGINT, "loading ", 0.0, "loading"),
    ("sigterm-compiling", signal.SIGTERM, "sampling ", 0.0, "compiling"),
    ("sigint-calibrating", signal.SIGINT, "calibrating ", 0.2, "calibrating"),
    ("sigterm-saving", signal.SIGTERM, "writing ", 0.0, "saving"),
    ("sigkill-loading", signal.SIGKILL, "loading ", 0.0, None),
]


# The least work that still passes every phase (no held-out pass: one compile fewer).
SIGNAL_ARGS = ["--method", "rtn", "--calib-samples", "1", "--heldout-samples", "0", "--steps", "2", "--timesteps",
               "1", "--resolution", "32", "--no-progress"]


def _start(out: Path) -> subprocess.Popen:
    # without the session's compilation cache: a signal must land in a real compile ("sigterm-compiling")
    from conftest import uncached_env

    return subprocess.Popen([sys.executable, "-m", "permuquant_jax.convert", "--out", str(out), *SIGNAL_ARGS],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=uncached_env(_env()),
                            cwd=REPO)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """All signal cases at once (each waits for its phase), so their start-up costs overlap."""
    import selectors

    root = Path(tmp_path_factory.mktemp("signals"))
    procs = {}
    for case_id, *_ in SIGNAL_CASES:
        (root / case_id).mkdir()
        procs[case_id] = _start(root / case_id / "dst")
    spec = {c[0]: c for c in SIGNAL_CASES}
    lines = {k: [] for k in procs}
    sent = {}
    sel = selectors.DefaultSelector()
    for k, p in procs.items():
        os.set_blocking(p.stderr.fileno(), False)
        sel.register(p.stderr, selectors.EVENT_READ, k)
    buf = {k: "" for k in procs}
    deadline = time.monotonic() + 900  # a hang guard: ~45 s on a quiet 2-core machine, 600 s seen at load 22
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            k = key.data
            chunk = key.fileobj.read()
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf[k] += chunk
            *done, buf[k] = buf[k].split("\n")
            for ln in done:
                lines[k].append(ln)
                _, sig, after, delay, _ = spec[k]
                if k not in sent and ln.startswith(after):
                    time.sleep(delay)
                    procs[k].send_signal(sig)
                    sent[k] = True
    out = {}
    for k, p in procs.items():
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        lines[k] += [ln for ln in buf[k].split("\n") if ln]
        out[k] = dict(rc=p.returncode, stderr=lines[k], sent=k in sent, dir=root / k)
    return out


@pytest.mark.parametrize("case", SIGNAL_CASES[:-1], ids=[c[0] for c in SIGNAL_CASES[:-1]])
def test_signal_ends_cleanly(signalled, case):
    case_id, sig, _, _, phase = case
    r = signalled[case_id]
    assert r["sent"], r["stderr"]
    text = "\n".join(r["stderr"])
    assert r["rc"] == 128 + sig, (r["rc"], text)
    assert "Traceback" not in text and "Exception ignored" not in text and "error:" not in text, text
    last = [ln for ln in r["stderr"] if ln.startswith("interrupted")]
    if phase == "compiling" and last:  # a quiet machine can finish this tiny compile before the signal lands:
        # then the job is calibrating, and the message must say so (never a stale "compiling")
        said = last[0].partition(" while ")[2].partition(":")[0]
        assert said in ("compiling", "calibrating"), text
        assert said == "calibrating" or not any(ln.startswith("calibrating") for ln in r["stderr"]), text
        phase = said
    assert last == [f"interrupted by {sig.name} while {phase}: nothing was written"], text
    assert list(r["dir"].iterdir()) == []  # no DST, no temporary directory


def test_after_sigkill_the_next_run_removes_the_stale_temp_dir(signalled):
    from permuquant_jax.convert.atomic import OWNER_FILE, check_output_dir

    r = signalled["sigkill-loading"]
    assert r["sent"] and r["rc"] == -signal.SIGKILL
    stale = [p for p in r["dir"].iterdir()]
    assert len(stale) == 1 and stale[0].name.startswith(".dst.tmp-") and (stale[0] / OWNER_FILE).is_file()
    check_output_dir(r["dir"] / "dst", overwrite=False)  # what every run does at the door
    assert list(r["dir"].iterdir()) == []


def test_stale_cleanup_removes_only_dead_runs_of_ours(tmp_path):
    from permuquant_jax.convert.atomic import OWNER_FILE, check_output_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()

    def mk(name, pid, payload=False):
        d = tmp_path / name
        d.mkdir()
        if pid is not None:
            (d / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": host}))
        if payload:  # an `.old-` dir of a run killed between its renames holds the previous output
            (d / "x").mkdir()
            (d / "x" / "permuquant.json").write_text("{}")
        return d

    mk(".dst.tmp-dead", dead.pid)
    mk(".dst.tmp-unmarked", None)
    mk(".dst.tmp-alive", os.getppid())
    mk(".dst.old-dead", dead.pid, payload=True)
    mk(".other.tmp-dead", dead.pid)
    check_output_dir(tmp_path / "dst", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".dst.tmp-alive", ".dst.tmp-unmarked", ".other.tmp-dead", "dst"]
    assert (tmp_path / "dst" / "permuquant.json").is_file()  # the previous output put back


def test_failed_overwrite_keeps_the_previous_output(tmp_path):
    """The old output is replaced only by a complete new one; a failure on the way leaves it as it was."""
    from permuquant_jax.convert.atomic import atomic_output_dir

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "permuquant.json").write_text('{"old": true}')
    with pytest.raises(OSError, match="disk full"), atomic_output_dir(dst, overwrite=True) as tmp:
        (tmp / "permuquant.json").write_text('{"new": true}')
        raise OSError("disk full (simulated)")
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]
    assert (dst / "permuquant.json").read_text() == '{"old": true}'
    with atomic_output_dir(dst, overwrite=True, sources=[("SRC", tmp_path / "elsewhere")]) as tmp:
        (tmp / "permuquant.json").write_text('{"new": true}')
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]
    assert sorted(p.name for p in dst.iterdir()) == ["permuquant.json"]  # no owner marker left inside
    assert (dst / "permuquant.json").read_text() == '{"new": true}'


def test_interrupt_swallowed_in_a_gc_callback_is_raised_again(capfd):
    """Python drops an exception raised inside a gc callback (JAX registers one); the handler raises it
    again soon after, and the dropped one prints nothing."""
    from permuquant_jax.convert import atomic

    entered = []

    def callback(phase, info):
        if phase == "start" and not entered:
            entered.append(1)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, inside the callback
                pass

    gc.callbacks.append(callback)
    try:
        with atomic.interrupt_handlers(), pytest.raises(atomic.Interrupted) as e:
            gc.collect()  # a full collection of a big test process can itself take seconds on a loaded machine
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:
                sum(range(1000))
        swallowed = atomic._state.swallowed
    finally:
        gc.callbacks.remove(callback)
    assert entered and swallowed >= 1  # the first raise was dropped by the callback...
    assert e.value.exit_code == 130 and time.monotonic() - t0 < 2  # ...and raised again soon after
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "Exception ignored" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- result checks


def test_nonfinite_results_name_where_they_appeared():
    from permuquant_jax.convert import validate as v
    from permuquant_jax.quant.calibrate import CalibrationStats, LayerStats
    from permuquant_jax.quant.report import QuantReport, SiteReport

    ok = LayerStats(sumsq=np.ones((2, 16)), absmax=np.ones((2, 16)), count=np.ones(2), amax=np.ones(2))
    bad_sumsq = np.ones((2, 16))
    bad_sumsq[1, 7] = np.inf
    bad = LayerStats(sumsq=bad_sumsq, absmax=np.ones((2, 16)), count=np.ones(2), amax=np.ones(2))
    stats = CalibrationStats(layers={("img_in",): ok, ("double_blocks", "img_mlp", "fc2"): bad}, batches=1)
    with pytest.raises(v.NonFiniteError, match=r"'double_blocks.img_mlp.fc2': sum of x\^2 is inf at index \[1, 7\]"):
        v.check_stats_finite(stats)
    report = QuantReport(method="permuquant", format="nvfp4", config={}, sites=[SiteReport(
        site="single_blocks.mlp", kind="rows", layer=(3,), consumers=["single_blocks.linear2"],
        candidates=[{"label": "identity", "error": 0.1}, {"label": "joint(a=0.5)", "error": float("nan")}],
        chosen="identity", accepted=False, gain=0.0)])
    with pytest.raises(v.NonFiniteError, match=r"'single_blocks.mlp' layer \[3\].*'joint\(a=0.5\)' has error nan"):
        v.check_report_finite(report)
    batch = {"img": np.zeros((1, 4, 64), np.float32), "y": np.zeros((1, 768), np.float32), "guidance": None}
    v.check_batches_finite([batch], "calibration")
    batch["img"][0, 2, 5] = np.nan
    with pytest.raises(v.NonFiniteError, match=r"calibration batch 1 of 2: 'img' holds nan at index \[0, 2, 5\]"):
        v.check_batches_finite([dict(batch, img=np.zeros((1, 4, 64), np.float32)), batch], "calibration")


if __name__ == "__main__" and sys.argv[1:2] == ["driver"]:
    _driver(sys.argv[2])
