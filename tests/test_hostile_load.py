"""Hostile and careless input to the checkpoint reader: every bad input built here from the embedded
tiny checkpoint (or a few bytes), each failing at the door with one CheckpointError line that names
the file and the key or field, expected vs found, with the source bytes untouched."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from permuquant_jax.convert import CheckpointError, default_checkpoint_path, load_flux, read_flux_config
from permuquant_jax.convert import safetensors_io as sio
from permuquant_jax.convert.checkpoint import CONFIG_METADATA_KEY, DIFFUSERS_INDEX
from permuquant_jax.convert.keymap import diffusers_keymap
from permuquant_jax.models import FluxConfig

TINY = default_checkpoint_path()
TINY_SHA = hashlib.sha256(TINY.read_bytes()).hexdigest()


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict | str | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


TINY_HEADER, TINY_BODY = _split(TINY.read_bytes())
KEYS = [k for k in TINY_HEADER if k != "__metadata__"]
K0, K1 = KEYS[0], KEYS[1]


def _digest(root: Path) -> dict[str, str]:
    if root.is_symlink() or not (root.is_file() or root.is_dir()):
        return {}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def expect_error(path: Path, *fragments: str, call: Callable = load_flux, untouched: bool = True) -> str:
    """``call(path)`` raises one CheckpointError line holding ``fragments``; nothing was modified."""
    before = _digest(path) if untouched else {}
    with pytest.raises(CheckpointError) as info:
        call(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    if before:
        assert _digest(path) == before
    assert hashlib.sha256(TINY.read_bytes()).hexdigest() == TINY_SHA
    return msg


# ---------------------------------------------------------------------------------------------
# Safetensors headers. Each case: (file bytes, fragments of the message, does the safetensors
# library itself also refuse the file?). The library is the independent reference for "invalid".


def _edit(fn: Callable[[dict], object]) -> bytes:
    header = json.loads(json.dumps(TINY_HEADER))
    fn(header)
    return _join(header, TINY_BODY)


def _set(key: str, field: str, value: object) -> Callable[[dict], None]:
    return lambda h: h[key].__setitem__(field, value)


def _overlap(h: dict) -> None:
    b0, e0 = h[K0]["data_offsets"]
    # move K1 onto K0's bytes, keeping its own length valid
    n1 = h[K1]["data_offsets"][1] - h[K1]["data_offsets"][0]
    h[K1]["data_offsets"] = [b0, b0 + n1]


def _offsets(i: int) -> list[int]:
    return TINY_HEADER[KEYS[i]]["data_offsets"]


HEADER_CASES: dict[str, tuple[bytes, tuple[str, ...], bool]] = {
    "empty-file": (b"", ("only 0 bytes",), True),
    "header-length-zero": (struct.pack("<Q", 0) + b"{}", ("header of 0 bytes", "expected 1 to 2"), True),
    "header-longer-than-file": (struct.pack("<Q", 10_000) + b"{}", ("header of 10000 bytes",), True),
    "header-above-limit": (struct.pack("<Q", 2**40) + b"{}" * 8, ("above the 104857600-byte limit",), True),
    "header-not-utf8": (_join(b'{"\xff\xfe": 1}', b""), ("not UTF-8",), True),
    "header-is-array": (_join("[1, 2]", b""), ("header is a JSON array, expected an object",), True),
    "header-nested-bomb": (_join("[" * 100_000 + "]" * 100_000, b""), ("nested too deeply",), True),
    "duplicate-key": (
        _join(json.dumps(TINY_HEADER)[:-1] + f', "{K0}": ' + json.dumps(TINY_HEADER[K0]) + "}", TINY_BODY),
        (f"key '{K0}' appears twice",),
        False,
    ),
    "entry-not-object": (_edit(lambda h: h.__setitem__(K0, 5)), (f"tensor '{K0}'", "an object", "found 5"), True),
    "entry-without-offsets": (_edit(lambda h: h[K0].pop("data_offsets")), ("no 'data_offsets'",), True),
    "dtype-not-string": (_edit(_set(K0, "dtype", 16)), (f"tensor '{K0}'", "'dtype' must be one of", "found 16"), True),
    "dtype-unknown": (_edit(_set(K0, "dtype", "BF17")), ("'dtype' must be one of F64", "found 'BF17'"), True),
    "shape-not-list": (_edit(_set(K0, "shape", "128")), ("'shape' must be a list of non-negative", "'128'"), True),
    "shape-negative": (_edit(_set(K0, "shape", [-128, -1])), ("non-negative integers", "[-128, -1]"), True),
    "shape-float": (_edit(_set(K0, "shape", [128.0])), ("'shape'", "found [128.0]"), True),
    "shape-bool": (_edit(_set(K0, "shape", [True])), ("'shape'", "found [True]"), True),
    "offsets-strings": (_edit(_set(K0, "data_offsets", ["0", "10"])), ("pair [begin, end]", "['0', '10']"), True),
    "offsets-three": (_edit(_set(K0, "data_offsets", [0, 1, 2])), ("pair [begin, end]", "[0, 1, 2]"), True),
    "offsets-reversed": (
        _edit(_set(K0, "data_offsets", _offsets(0)[::-1])),
        ("begin <= end", str(_offsets(0)[::-1])),
        True,
    ),
    "offsets-wrong-size": (
        _edit(_set(K0, "data_offsets", [_offsets(0)[0], _offsets(0)[1] - 2])),
        (f"tensor '{K0}'", f"needs {_offsets(0)[1] - _offsets(0)[0]} bytes", "span"),
        True,
    ),
    "offsets-past-end": (
        _edit(lambda h: h[K0].update(data_offsets=[len(TINY_BODY), len(TINY_BODY) + _offsets(0)[1] - _offsets(0)[0]])),
        ("truncated file", f"tensor '{K0}'", f"only {len(TINY_BODY)} data bytes"),
        True,
    ),
    "overlapping": (_edit(_overlap), ("overlap", f"'{K0}'", f"'{K1}'", "expected disjoint"), True),
    "metadata-not-object": (_edit(lambda h: h.__setitem__("__metadata__", ["a"])), ("'__metadata__'", "array"), True),
    "metadata-not-string": (
        _edit(lambda h: h["__metadata__"].__setitem__("version", 3)),
        ("'__metadata__' entry 'version' must be a string", "found 3"),
        True,
    ),
    "packed-odd-bytes": (
        _join({"img_in.weight": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0"),
        ("a whole number of bytes for F4", "[3]"),
        True,
    ),
}


@pytest.fixture(scope="module")
def header_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("headers")
    out = {}
    for name, (data, _, _) in HEADER_CASES.items():
        out[name] = root / f"{name}.safetensors"
        out[name].write_bytes(data)
    return out


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_header(case, header_files):
    path = header_files[case]
    _, fragments, library_refuses = HEADER_CASES[case]
    expect_error(path, str(path), *fragments, call=sio.SafetensorsFile)
    expect_error(path, str(path), call=read_flux_config)  # the loader's door is the same reader
    if library_refuses:  # the reference agrees that the file is invalid
        with pytest.raises(Exception):  # noqa: B017 (safetensors raises several types)
            with safe_open(str(path), framework="numpy") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_valid_files_read_like_the_library(tmp_path):
    """Our reader against safetensors' own on every numpy dtype, zero-size tensors and metadata."""
    rng = np.random.default_rng()
    tensors = {
        f"t.{np.dtype(dt).name}": np.abs(rng.standard_normal((3, 5)) * 4).astype(dt)
        for dt in (
            np.float64,
            np.float32,
            np.float16,
            ml_dtypes.bfloat16,
            ml_dtypes.float8_e4m3fn,
            ml_dtypes.float8_e5m2,
            np.int64,
            np.int32,
            np.int16,
            np.int8,
            np.uint8,
        )
    }
    tensors["mask"] = rng.random(7) > 0.5
    tensors["empty"] = np.zeros((0, 4), np.float32)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    coll = sio.open_safetensors(path)
    assert coll.metadata == {"format": "np"} and set(coll.keys()) == set(tensors)
    ref = dict(safetensors.deserialize(path.read_bytes()))  # the library's own parse: dtype, shape, raw bytes
    assert set(ref) == set(coll.keys())
    for key, arr in coll.iter_tensors(check_finite=True):
        info = coll.info(key)
        assert (info.dtype, list(info.shape), arr.shape) == (ref[key]["dtype"], ref[key]["shape"], info.shape), key
        assert arr.dtype == info.numpy_dtype == tensors[key].dtype and arr.tobytes() == bytes(ref[key]["data"]), key
    cast = coll.read("t.bfloat16", np.float32)
    assert cast.dtype == np.float32 and np.array_equal(cast, tensors["t.bfloat16"].astype(np.float32))
    expect_error(path, str(path), "no tensor 'nope'", call=lambda p: sio.open_safetensors(p).read("nope"))


@pytest.mark.parametrize(
    "dtype,bad",
    [
        (ml_dtypes.bfloat16, np.nan),
        (np.float16, -np.inf),
        (np.float32, np.inf),
        (ml_dtypes.float8_e4m3fn, np.nan),
        (ml_dtypes.float8_e5m2, np.inf),
        (np.float64, np.nan),
    ],
)
def test_reader_finite_check(dtype, bad, tmp_path, monkeypatch):
    rng = np.random.default_rng()
    arr = rng.standard_normal((3, 2_000)).astype(dtype)
    idx = (int(rng.integers(3)), int(rng.integers(2_000)))
    arr[idx] = bad
    path = tmp_path / "w.safetensors"
    save_file({"w": arr, "ok": arr[:0]}, str(path))
    f = sio.SafetensorsFile(path)
    assert f.read("w").shape == (3, 2_000)  # off by default
    expect_error(
        path,
        str(path),
        "tensor 'w'",
        f"first at index {list(idx)}",
        call=lambda p: sio.SafetensorsFile(p).read("w", check_finite=True),
    )
    for chunk in (7, 1 << 20):  # the bounded-scratch bit test, across chunk boundaries and in one
        monkeypatch.setattr(sio, "_FINITE_CHUNK", chunk)
        assert not sio.all_finite(arr) and sio.all_finite(np.delete(arr, idx[1], axis=1))


@pytest.mark.parametrize("dtype", list(sio._NONFINITE_BITS), ids=lambda d: d.name)
def test_bit_test_against_isfinite(dtype):
    """The integer test on the bits agrees with float32 isfinite on every 8-bit code and, for the
    16-bit types, on every non-finite code and a random sample of the others (and on float32/64)."""
    uint = sio._NONFINITE_BITS[dtype][0]
    bits = 8 * np.dtype(uint).itemsize
    if bits <= 16:
        codes = np.arange(2**bits, dtype=uint).view(dtype)
        finite = np.isfinite(codes.astype(np.float32))
        pick = np.flatnonzero(~finite)
        pick = np.concatenate([pick, np.random.default_rng().choice(np.flatnonzero(finite), min(2048, finite.sum()))])
    else:
        codes = np.array([0.0, -1.5, np.inf, -np.inf, np.nan, np.finfo(dtype).max, np.finfo(dtype).tiny / 4], dtype)
        finite, pick = np.isfinite(codes), np.arange(7)
    for i in pick:
        assert sio.all_finite(codes[i : i + 1]) == finite[i], (dtype, codes[i : i + 1].view(uint))


def test_reader_cast_overflow(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": np.array([1.0, 7e4], np.float32)}, str(path))
    expect_error(
        path,
        "tensor 'w'",
        "after the cast from F32 to float16",
        "1 Inf",
        call=lambda p: sio.SafetensorsFile(p).read("w", np.float16, check_finite=True),
    )


# ---------------------------------------------------------------------------------------------
# Folders: diffusers config.json, index and pipeline model_index.json of the wrong shape.

TINY_CFG = FluxConfig.tiny()
CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": TINY_CFG.depth,
    "num_single_layers": TINY_CFG.depth_single_blocks,
    "attention_head_dim": TINY_CFG.head_dim,
    "num_attention_heads": TINY_CFG.num_heads,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": list(TINY_CFG.axes_dim),
}
SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")
NAN_KEY = "transformer_blocks.1.attn.to_k.weight"


@pytest.fixture(scope="module")
def diffusers_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng()
    return {
        k: (0.05 * rng.standard_normal(e.shape)).astype(ml_dtypes.bfloat16)
        for k, e in diffusers_keymap(TINY_CFG).items()
    }


def _diffusers_folder(
    root: Path, tensors: dict[str, np.ndarray], config: object = CONFIG, index: object | None = None
) -> Path:
    """A sharded diffusers transformer folder (two shards + index) for the tiny config."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    keys = sorted(tensors)
    halves = {SHARDS[0]: keys[: len(keys) // 2], SHARDS[1]: keys[len(keys) // 2 :]}
    for name, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, str(folder / name))
    if index is None:
        index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
    (folder / DIFFUSERS_INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


def _weight_map(edit: Callable[[dict], None]) -> Callable[[list[str]], dict]:
    def build(keys: list[str]) -> dict:
        wm = {k: SHARDS[0] if i < len(keys) // 2 else SHARDS[1] for i, k in enumerate(sorted(keys))}
        edit(wm)
        return {"metadata": {}, "weight_map": wm}

    return build


FOLDER_CASES: dict[str, tuple[dict, tuple[str, ...]]] = {
    "config-not-json": (dict(config="{num_layers: 2"), ("config.json", "invalid JSON")),
    "config-array": (dict(config="[1, 2]"), ("config.json", "expected a JSON object, found a JSON array")),
    "config-duplicate-field": (dict(config='{"num_layers": 2, "num_layers": 3}'), ("'num_layers' appears twice",)),
    "num-layers-string": (
        dict(config={**CONFIG, "num_layers": "2"}),
        ("config.json", "field 'num_layers'", "positive integer", "'2' (a string)"),
    ),
    "width-negative": (
        dict(config={**CONFIG, "joint_attention_dim": -4096}),
        ("field 'joint_attention_dim'", "positive integer", "-4096"),
    ),
    "heads-float": (dict(config={**CONFIG, "num_attention_heads": 2.0}), ("field 'num_attention_heads'", "2.0")),
    "guidance-string": (
        dict(config={**CONFIG, "guidance_embeds": "yes"}),
        ("field 'guidance_embeds'", "true or false"),
    ),
    "axes-mixed": (
        dict(config={**CONFIG, "axes_dims_rope": [8, "28", 28]}),
        ("field 'axes_dims_rope'", "list of positive integers", "[8, '28', 28]"),
    ),
    "layers-vs-weights": (
        dict(config={**CONFIG, "num_layers": 3}),
        ("field 'num_layers' is 3", "the weights hold 2 'transformer_blocks.N.*' blocks"),
    ),
    "patch-size": (dict(config={**CONFIG, "patch_size": 2}), ("field 'patch_size'", "expected 1", "found 2")),
    "index-not-json": (dict(index="{"), (DIFFUSERS_INDEX, "invalid JSON")),
    "index-no-weight-map": (dict(index={"metadata": {}}), (DIFFUSERS_INDEX, "no 'weight_map'")),
    "weight-map-list": (
        dict(index={"weight_map": [SHARDS[0]]}),
        ("'weight_map' must be a non-empty object", "['diffusion_pytorch_model-00001"),
    ),
    "weight-map-empty": (
        dict(index={"weight_map": {}}),
        ("'weight_map' must be a non-empty object", "an empty object"),
    ),
    "weight-map-int": (
        dict(index=_weight_map(lambda wm: wm.__setitem__("x_embedder.weight", 1))),
        ("weight_map['x_embedder.weight'] must be a shard file name", "found 1"),
    ),
    "shard-escapes": (
        dict(index=_weight_map(lambda wm: wm.__setitem__("x_embedder.weight", "../outside.safetensors"))),
        ("weight_map['x_embedder.weight'] is '../outside.safetensors'", "no '..'"),
    ),
    "shard-absolute": (
        dict(index=_weight_map(lambda wm: wm.__setitem__("x_embedder.weight", str(TINY)))),
        ("weight_map['x_embedder.weight']", "no absolute path"),
    ),
    "shard-missing": (
        dict(index=_weight_map(lambda wm: wm.__setitem__("proj_out.bias", "gone.safetensors"))),
        ("gone.safetensors: shard listed in", "does not exist", "'proj_out.bias'"),
    ),
    "key-in-other-shard": (
        dict(index=_weight_map(lambda wm: wm.__setitem__("x_embedder.bias", SHARDS[0]))),
        (f"{SHARDS[0]}: {DIFFUSERS_INDEX} says it holds key 'x_embedder.bias'", "no such tensor"),
    ),
    "key-not-listed": (
        dict(index=_weight_map(lambda wm: wm.pop("x_embedder.weight"))),
        ("holds key 'x_embedder.weight'", "does not list it"),
    ),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_folder(case, diffusers_tensors, tmp_path):
    spec, fragments = FOLDER_CASES[case]
    if callable(spec.get("index")):
        spec = {**spec, "index": spec["index"](list(diffusers_tensors))}
    (tmp_path / "outside.safetensors").write_bytes(TINY.read_bytes())  # exists, and must still be refused
    folder = _diffusers_folder(tmp_path, diffusers_tensors, **spec)
    expect_error(folder, *fragments, call=read_flux_config)
    assert _digest(tmp_path / "outside.safetensors") == {str(tmp_path / "outside.safetensors"): TINY_SHA}


@pytest.mark.parametrize(
    "model_index,fragments",
    [
        ("[]", ("model_index.json", "found a JSON array")),
        (
            {"_class_name": "FluxPipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]},
            ("model_index.json: field 'transformer'", "'SD3Transformer2DModel'", "expected 'FluxTransformer2DModel'"),
        ),
        ({"transformer": "FluxTransformer2DModel"}, ("field 'transformer'", "expected [library, class]")),
    ],
    ids=["array", "other-class", "not-a-pair"],
)
def test_bad_model_index(model_index, fragments, diffusers_tensors, tmp_path):
    _diffusers_folder(tmp_path, diffusers_tensors)
    (tmp_path / "model_index.json").write_text(model_index if isinstance(model_index, str) else json.dumps(model_index))
    expect_error(tmp_path, *fragments, call=read_flux_config)


@pytest.mark.parametrize(
    "meta,fragments",
    [
        ("{not json", ("is not JSON",)),
        ('{"axes_dim": "8,28,28"}', ("field 'axes_dim'", "'8,28,28' (a string)")),
        ('{"axes_dim": [8, 28, 28], "theta": "10000"}', ("field 'theta'", "'10000' (a string)")),
    ],
    ids=["not-json", "axes-string", "theta-string"],
)
def test_bad_config_metadata(meta, fragments, tmp_path):
    header = json.loads(json.dumps(TINY_HEADER))
    header["__metadata__"] = {CONFIG_METADATA_KEY: meta}
    path = tmp_path / "meta.safetensors"
    path.write_bytes(_join(header, TINY_BODY))
    expect_error(path, str(path), f"metadata '{CONFIG_METADATA_KEY}'", *fragments, call=read_flux_config)


def test_block_numbering_gap(tmp_path):
    header = json.loads(json.dumps(TINY_HEADER))
    for k in [k for k in header if k.startswith("single_blocks.1.")]:
        header[k.replace("single_blocks.1.", "single_blocks.99999999999.")] = header.pop(k)
    path = tmp_path / "gap.safetensors"
    path.write_bytes(_join(header, TINY_BODY))
    expect_error(path, str(path), "numbered up to 99999999999", "block 1 is missing", call=read_flux_config)


# ---------------------------------------------------------------------------------------------
# NaN/Inf anywhere in the float model, found while loading, named by file + the checkpoint's key.


def _tiny_with(tmp_path: Path, key: str, index: tuple[int, ...], value: float, stored=None) -> Path:
    with safe_open(str(TINY), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if stored is not None:
        tensors = {k: v.astype(stored) for k, v in tensors.items()}
    tensors[key] = tensors[key].copy()
    tensors[key][index] = value
    path = tmp_path / "flux1-dev.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "key,index,value",
    [
        ("double_blocks.0.img_attn.qkv.weight", (100, 3), np.nan),
        ("img_in.bias", (7,), np.inf),
        ("single_blocks.3.norm.key_norm.scale", (0,), -np.inf),
    ],
    ids=["stacked-quantized", "kept-bf16", "norm-scale"],
)
def test_nonfinite_weight_named_by_checkpoint_key(key, index, value, tmp_path):
    path = _tiny_with(tmp_path, key, index, value)
    kind = "1 NaN and 0 Inf" if np.isnan(value) else "0 NaN and 1 Inf"
    expect_error(path, str(path), f"tensor '{key}'", kind, f"first at index {list(index)}")
    if key != "single_blocks.3.norm.key_norm.scale":
        return
    model = load_flux(path, check_finite=False)  # the check, not something else, raised: off, it loads
    params = [np.asarray(v.get_value(), np.float32) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert sum(int((~np.isfinite(p)).sum()) for p in params) == 1


def test_nonfinite_in_diffusers_shard(diffusers_tensors, tmp_path):
    tensors = dict(diffusers_tensors)
    tensors[NAN_KEY] = tensors[NAN_KEY].copy()
    tensors[NAN_KEY][5, 9] = np.nan
    folder = _diffusers_folder(tmp_path, tensors)
    shard = next(folder / s for s in SHARDS if NAN_KEY in sio.SafetensorsFile(folder / s))
    msg = expect_error(folder, f"{shard}: tensor '{NAN_KEY}'", "1 NaN", "first at index [5, 9]")
    assert "img_attn" not in msg  # the checkpoint's key, not the stacked model path


def test_cast_overflow_named(tmp_path):
    path = _tiny_with(tmp_path, "txt_in.weight", (0, 0), 1e5, stored=np.float32)
    expect_error(
        path,
        str(path),
        "tensor 'txt_in.weight' (F32)",
        "values up to 100000",
        "overflow float16",
        call=lambda p: load_flux(p, jnp.float16),
    )


# ---------------------------------------------------------------------------------------------
# The file system: permissions, a parent that is a file, wrong kinds, links, empty files, FIFOs.


@contextlib.contextmanager
def _denied(target: Path, monkeypatch) -> Iterator[None]:
    """No read permission on ``target``: chmod where that binds, a denying os.access for root
    (whom permission bits do not stop)."""
    if os.geteuid() != 0:
        mode = target.stat().st_mode
        target.chmod(0)
        try:
            yield
        finally:
            target.chmod(mode)
        return
    real = os.access
    with monkeypatch.context() as m:
        m.setattr(sio.os, "access", lambda p, mode, **kw: False if Path(p) == target else real(p, mode, **kw))
        yield


def test_unreadable_file_and_folder(tmp_path, monkeypatch):
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(TINY.read_bytes())
    with _denied(path, monkeypatch):
        msg = expect_error(path, str(path), "permission denied: cannot read this file", untouched=False)
    assert "Errno" not in msg and _digest(path) == {str(path): TINY_SHA}
    folder = tmp_path / "pipe"
    (folder / "transformer").mkdir(parents=True)
    with _denied(folder, monkeypatch):
        expect_error(folder, str(folder), "permission denied: cannot read this directory", untouched=False)
    with _denied(folder / "transformer", monkeypatch):
        expect_error(folder, str(folder / "transformer"), "permission denied", untouched=False)


def test_paths_of_the_wrong_kind(tmp_path, diffusers_tensors):
    copy = tmp_path / "flux.safetensors"
    copy.write_bytes(TINY.read_bytes())
    expect_error(copy / "transformer", f"{copy} is a file, not a directory")
    expect_error(tmp_path / "dir.safetensors", "is a directory", call=lambda p: (p.mkdir(), sio.SafetensorsFile(p)))
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "transformer").write_text("not a folder")
    expect_error(pipe, f"{pipe / 'transformer'}: is a file, expected a directory")
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    expect_error(loop, str(loop), "symbolic link loop")
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    expect_error(dangling, "broken symbolic link", "gone.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    expect_error(empty, str(empty), "not a safetensors file", "only 0 bytes")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    expect_error(fifo, str(fifo), "not a regular file")  # and no blocking open of the pipe
    folder = _diffusers_folder(tmp_path / "d", diffusers_tensors)
    (folder / SHARDS[1]).unlink()
    (folder / SHARDS[1]).mkdir()
    expect_error(folder, f"{folder / SHARDS[1]}: is a directory")
    expect_error(tmp_path / "d", "expected one .safetensors file", call=sio.open_safetensors)  # a folder, no index
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (two / name).write_bytes(TINY.read_bytes())
    expect_error(two, "found 2", "a.safetensors", call=sio.open_safetensors)


def test_another_model(tmp_path):
    path = tmp_path / "sd3_medium.safetensors"
    save_file(
        {
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": np.zeros((6, 2), np.float16),
            "model.diffusion_model.x_embedder.proj.weight": np.zeros((2, 2), np.float16),
        },
        str(path),
    )
    expect_error(path, str(path), "looks like an SD3 MMDiT", "'img_in.weight'")
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((2, 2), np.float16)}, str(t5))
    expect_error(t5, "looks like a T5 text encoder")
    evil = tmp_path / "evil.safetensors"
    save_file({"evil\nerror: fake second line.weight": np.zeros(2, np.float16)}, str(evil))
    expect_error(evil, "looks like another model", "key 'evil\\nerror: fake second line.weight'")
    nothing = tmp_path / "nothing.safetensors"
    save_file({}, str(nothing))
    expect_error(nothing, "holds no tensors")


# ---------------------------------------------------------------------------------------------
# The command line: one `error:` line, exit 2, no traceback, no DST (in-process, no subprocess).


@pytest.mark.parametrize("case", ["overlapping", "num-layers-string", "nan"])
def test_cli_refuses(case, header_files, diffusers_tensors, tmp_path, capsys, monkeypatch):
    from permuquant_jax.convert.cli import main

    monkeypatch.delenv("PERMUQUANT_DEBUG", raising=False)
    if case == "overlapping":
        src, needles = header_files[case], ("overlap", f"'{K0}'")
    elif case == "num-layers-string":
        src = _diffusers_folder(tmp_path / "src", diffusers_tensors, config={**CONFIG, "num_layers": "2"})
        needles = ("config.json", "field 'num_layers'", "'2' (a string)")
    else:
        src = _tiny_with(tmp_path, "double_blocks.1.txt_mlp.2.weight", (3, 4), np.nan)
        needles = (str(src), "tensor 'double_blocks.1.txt_mlp.2.weight'", "1 NaN")
    before = _digest(src)
    dst = tmp_path / "out"
    code = main([str(src), "--out", str(dst), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _digest(src) == before
