"""``load_flux``: FLUX.1 checkpoints as people download them -> :class:`FluxDiT`.

Reads a Black Forest Labs single file (``flux1-dev.safetensors``; keys with or without the
``model.diffusion_model.`` prefix of ComfyUI files), a diffusers ``transformer/`` folder
(``config.json`` + one or more ``diffusion_pytorch_model*.safetensors`` + index) or a whole diffusers
pipeline folder. Keys and shapes are checked against the inferred config before any tensor is read;
tensors are then streamed one by one, converted to the requested dtype and placed into the model, so
the peak host memory stays close to the size of the output model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from permuquant_jax.convert.keymap import SourceTensor, bfl_keymap, diffusers_keymap
from permuquant_jax.convert.safetensors_io import (
    CheckpointError,
    SafetensorsCollection,
    SafetensorsFile,
    all_finite,
    check_path,
    check_tensors,
    load_json,
    open_index,
)
from permuquant_jax.models.flux import FluxConfig, FluxDiT, host_sharding, offload_blocks

BFL_PREFIX = "model.diffusion_model."
CONFIG_METADATA_KEY = "permuquant.flux_config"
DIFFUSERS_CLASS = "FluxTransformer2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_LOADABLE = (jnp.bfloat16, jnp.float16, jnp.float32)
STORED_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")  # what FLUX weights may be stored as


def default_checkpoint_path() -> Path:
    """The tiny FLUX-architecture checkpoint (BFL layout) shipped inside the package."""
    return Path(str(importlib.resources.files("permuquant_jax") / "assets" / "flux_tiny.safetensors"))


@dataclasses.dataclass
class CheckpointSource:
    """An opened checkpoint: its layout, where each (unprefixed) key lives, and config hints."""

    path: Path
    layout: str  # "bfl" or "diffusers"
    files: dict[str, SafetensorsFile]  # unprefixed key -> file holding it
    stored_key: dict[str, str]  # unprefixed key -> key as stored
    diffusers_config: dict | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.files[key].tensors[self.stored_key[key]].shape

    def read(self, key: str, *, check_finite: bool = False) -> np.ndarray:
        return self.files[key].read(self.stored_key[key], check_finite=check_finite)

    def where(self, key: str) -> Path:
        return self.files[key].path


def open_checkpoint(path: str | os.PathLike | None = None) -> CheckpointSource:
    """Find and open the transformer weights at ``path`` (file or folder; None = the embedded tiny)."""
    path = check_path(default_checkpoint_path() if path is None else path, "any")
    if path.is_file():
        if path.name in ("config.json", DIFFUSERS_INDEX):  # a file of a diffusers transformer folder
            return _open_diffusers_dir(path.parent)
        return _from_files(path, SafetensorsCollection(path, [SafetensorsFile(path)]))
    names = _listdir(path)
    if "transformer" in names:
        _check_model_index(path, names)
        return _open_diffusers_dir(check_path(path / "transformer", "dir"))
    if "config.json" in names:
        return _open_diffusers_dir(path)
    single = [n for n in names if n.endswith(".safetensors")]
    if len(single) == 1 and "model_index.json" not in names:
        file = path / single[0]
        return _from_files(file, SafetensorsCollection(file, [SafetensorsFile(file)]))
    found = sorted(n + ("/" if (path / n).is_dir() else "") for n in names)
    shown = ", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")
    raise CheckpointError(
        f"{path}: no FLUX transformer in this directory: expected transformer/ (a diffusers pipeline), "
        f"config.json + {DIFFUSERS_WEIGHTS} (a diffusers transformer folder) or a single .safetensors "
        f"file; found: [{shown}]"
    )


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except PermissionError:
        raise CheckpointError(
            f"{folder}: permission denied: cannot list this directory (check its permissions)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot list this directory ({e.strerror})") from None


def _check_model_index(pipeline: Path, names: list[str]) -> None:
    """A pipeline's model_index.json, if present, must be a JSON object naming a FLUX transformer."""
    if "model_index.json" not in names:
        return
    index_path = pipeline / "model_index.json"
    index = load_json(index_path, "diffusers model_index.json")
    for field in ("_class_name", "_diffusers_version"):
        if field in index and not isinstance(index[field], str):
            raise CheckpointError(f"{index_path}: field '{field}': expected a string, found {index[field]!r}")
    if "transformer" not in index:
        return
    entry = index["transformer"]
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str | None) for e in entry)):
        raise CheckpointError(
            f"{index_path}: field 'transformer': expected [library, class] (two strings), found {entry!r}"
        )
    if entry[1] is not None and entry[1] != DIFFUSERS_CLASS:
        raise CheckpointError(
            f"{index_path}: field 'transformer': class is '{entry[1]}', expected '{DIFFUSERS_CLASS}' "
            "(this pipeline is not a FLUX.1 pipeline)"
        )


def _open_diffusers_dir(folder: Path) -> CheckpointSource:
    names = _listdir(folder)
    config_path = folder / "config.json"
    if "config.json" not in names:
        raise CheckpointError(f"{folder}: a diffusers transformer folder needs config.json; not found")
    config = load_json(config_path, "diffusers config.json")
    cls = config.get("_class_name", DIFFUSERS_CLASS)
    if cls != DIFFUSERS_CLASS:
        raise CheckpointError(f"{config_path}: _class_name is {cls!r}, expected '{DIFFUSERS_CLASS}'")
    if DIFFUSERS_INDEX in names:
        collection = open_index(folder / DIFFUSERS_INDEX)
    elif DIFFUSERS_WEIGHTS in names:
        collection = SafetensorsCollection(folder, [SafetensorsFile(folder / DIFFUSERS_WEIGHTS)])
    else:
        raise CheckpointError(f"{folder}: has config.json but neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}")
    source = _from_files(folder, collection)
    if source.layout != "diffusers":
        raise CheckpointError(
            f"{folder}: config.json describes a diffusers {DIFFUSERS_CLASS} but the "
            f"weights use the BFL key layout (key '{next(iter(source.stored_key))}')"
        )
    source.diffusers_config = _diffusers_fields(config_path, config)
    return source


# config.json fields read (diffusers name -> (kind, default)); anything else in the file is ignored.
_DIFFUSERS_FIELDS: dict[str, tuple[str, object]] = {
    "patch_size": ("int", 1),
    "in_channels": ("int", 64),
    "out_channels": ("int?", None),
    "num_layers": ("int", 19),
    "num_single_layers": ("int", 38),
    "attention_head_dim": ("int", 128),
    "num_attention_heads": ("int", 24),
    "joint_attention_dim": ("int", 4096),
    "pooled_projection_dim": ("int", 768),
    "guidance_embeds": ("bool", False),
    "axes_dims_rope": ("ints", (16, 56, 56)),
}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _diffusers_fields(config_path: Path, config: dict) -> dict:
    """The config fields the transformer needs, type-checked: one line naming the field otherwise."""
    out = {}
    for name, (kind, default) in _DIFFUSERS_FIELDS.items():
        value = config.get(name, default)
        if kind == "int?" and value is None:
            pass
        elif kind in ("int", "int?") and not _positive_int(value):
            raise CheckpointError(f"{config_path}: field '{name}': expected a positive integer, found {_found(value)}")
        elif kind == "bool" and not isinstance(value, bool):
            raise CheckpointError(f"{config_path}: field '{name}': expected true or false, found {_found(value)}")
        elif kind == "ints" and not (
            isinstance(value, list | tuple) and value and all(_positive_int(v) for v in value)
        ):
            raise CheckpointError(
                f"{config_path}: field '{name}': expected a list of positive integers, found {_found(value)}"
            )
        out[name] = value
    if out["patch_size"] != 1:
        raise CheckpointError(
            f"{config_path}: field 'patch_size': expected 1 (FLUX packs 2x2 latents before the "
            f"transformer), found {out['patch_size']}"
        )
    return out


def _found(value: object) -> str:
    kind = {str: "a string", bool: "a boolean", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{text} ({kind})" if kind != "null" else "null"


def _from_files(path: Path, collection: SafetensorsCollection) -> CheckpointSource:
    where = collection.where
    keys = list(where)
    bfl = [k for k in keys if k == "img_in.weight" or k.endswith(".img_in.weight")]
    if bfl:
        prefix = min(bfl, key=len)[: -len("img_in.weight")]
        # An all-in-one file (ComfyUI) also holds the VAE and text encoders outside the prefix.
        selected = [k for k in keys if k.startswith(prefix)] if prefix else keys
        layout = "bfl"
    elif "x_embedder.weight" in where:
        prefix, selected, layout = "", keys, "diffusers"
    else:
        _raise_foreign(path, keys)
    stored = {k[len(prefix) :]: k for k in selected}
    return CheckpointSource(
        path=path,
        layout=layout,
        files={k: where[s] for k, s in stored.items()},
        stored_key=stored,
        metadata=dict(collection.metadata),
    )


_FOREIGN = (
    ("a VAE (autoencoder)", re.compile(r"(^|\.)(decoder\.(conv_in|up|mid)|quant_conv|post_quant_conv)")),
    (
        "an SD-family UNet",
        re.compile(
            r"(^|\.)(input_blocks|output_blocks|down_blocks\.\d+\.resnets|"
            r"time_embed\.|time_embedding\.)"
        ),
    ),
    ("an SD3 MMDiT", re.compile(r"(^|\.)joint_blocks\.")),
    ("a T5 text encoder", re.compile(r"(^|\.)encoder\.block\.\d+\.layer")),
    ("a CLIP text encoder", re.compile(r"(^|\.)text_model\.")),
)


def _raise_foreign(path: Path, keys: list[str]):
    if not keys:
        raise CheckpointError(f"{path}: holds no tensors; expected a FLUX.1 transformer checkpoint")
    what, hit = "another model", keys[0]
    for name, pattern in _FOREIGN:
        match = next((k for k in keys if pattern.search(k)), None)
        if match is not None:
            what, hit = name, match
            break
    raise CheckpointError(
        f"{path}: not a FLUX.1 transformer checkpoint: it looks like {what} (key '{hit}'); expected key "
        "'img_in.weight' (BFL layout) or 'x_embedder.weight' (diffusers layout); pass the transformer "
        "(e.g. flux1-dev.safetensors or a pipeline's transformer/ folder)"
    )


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes for a head dim: FLUX's (16, 56, 56) for 128, the same proportions otherwise."""
    a0 = 2 * max(1, round(head_dim / 16))
    a1 = 2 * ((head_dim - a0) // 4)
    return a0, a1, head_dim - a0 - a1


def infer_config(source: CheckpointSource) -> FluxConfig:
    """The :class:`FluxConfig` a checkpoint describes (diffusers config.json, else keys and shapes)."""

    def shape(key: str, expected: str) -> tuple[int, ...]:
        if key not in source.stored_key:
            raise CheckpointError(f"{source.path}: missing key '{key}' (expected {expected})")
        return source.shape(key)

    def count(prefix: str) -> int:
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        idx = {int(m.group(1)) for k in source.stored_key if (m := pat.match(k))}
        if idx and len(idx) != max(idx) + 1:
            gap = next(i for i in range(len(idx) + 1) if i not in idx)
            raise CheckpointError(
                f"{source.path}: blocks '{prefix}N.*' are numbered up to {max(idx)} but block {gap} is "
                f"missing (key '{_stored(source, prefix + str(gap) + '.')}...' not found)"
            )
        return len(idx)

    if source.diffusers_config is not None:
        c = source.diffusers_config  # type-checked by _diffusers_fields
        heads, head_dim = c["num_attention_heads"], c["attention_head_dim"]
        fields = dict(
            in_channels=c["in_channels"],
            out_channels=c["out_channels"] or c["in_channels"],
            vec_in_dim=c["pooled_projection_dim"],
            context_in_dim=c["joint_attention_dim"],
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=c["num_layers"],
            depth_single_blocks=c["num_single_layers"],
            axes_dim=tuple(c["axes_dims_rope"]),
            guidance_embed=c["guidance_embeds"],
        )
        for name, prefix in (
            ("num_layers", "transformer_blocks."),
            ("num_single_layers", "single_transformer_blocks."),
        ):
            found = count(prefix)
            if found != c[name]:
                raise CheckpointError(
                    f"{source.path / 'config.json'}: field '{name}' is {c[name]} but the weights hold "
                    f"{found} '{prefix}N.*' blocks"
                )
        mlp = shape("transformer_blocks.0.ff.net.0.proj.weight", "a [mlp_hidden, hidden] weight")[0]
        fields["mlp_ratio"] = mlp / fields["hidden_size"]
    else:
        diff = source.layout == "diffusers"
        names = (
            (
                "x_embedder",
                "context_embedder",
                "time_text_embed.text_embedder.linear_1",
                "proj_out",
                "transformer_blocks.",
                "single_transformer_blocks.",
                "transformer_blocks.0.attn.norm_q.weight",
                "transformer_blocks.0.ff.net.0.proj.weight",
                "time_text_embed.guidance_embedder.",
                "transformer_blocks.0.attn.to_q.bias",
            )
            if diff
            else (
                "img_in",
                "txt_in",
                "vector_in.in_layer",
                "final_layer.linear",
                "double_blocks.",
                "single_blocks.",
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "double_blocks.0.img_mlp.0.weight",
                "guidance_in.",
                "double_blocks.0.img_attn.qkv.bias",
            )
        )
        img_in, txt_in, vec_in, final, dbl, sgl, qnorm, fc1, guid, qkv_bias = names
        hidden, in_ch = shape(img_in + ".weight", "a [hidden, in_channels] weight")
        depth, depth_single = count(dbl), count(sgl)
        if depth == 0 or depth_single == 0:
            raise CheckpointError(
                f"{source.path}: found {depth} '{dbl}N.*' and {depth_single} '{sgl}N.*' "
                "blocks; a FLUX.1 transformer has at least one of each"
            )
        head_dim = shape(qnorm, "a [head_dim] scale")[0]
        if head_dim < 1 or hidden % head_dim:
            raise CheckpointError(
                f"{source.path}: key '{qnorm}': head dim {head_dim} does not divide the "
                f"hidden size {hidden} (from '{img_in}.weight')"
            )
        # RoPE axes cannot be read off the weights: FLUX's for head dim 128 unless the file says.
        axes, theta = default_axes_dim(head_dim), 10_000
        meta = source.metadata.get(CONFIG_METADATA_KEY)
        if meta:
            axes, theta = _metadata_rope(source.path, meta, theta)
        fields = dict(
            in_channels=in_ch,
            out_channels=shape(final + ".weight", "a [out_channels, hidden] weight")[0],
            vec_in_dim=shape(vec_in + ".weight", "a [hidden, vec_in_dim] weight")[1],
            context_in_dim=shape(txt_in + ".weight", "a [hidden, context_in_dim] weight")[1],
            hidden_size=hidden,
            num_heads=hidden // head_dim,
            mlp_ratio=shape(fc1, "a [mlp_hidden, hidden] weight")[0] / hidden,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=axes,
            theta=theta,
            guidance_embed=any(k.startswith(guid) for k in source.stored_key),
            qkv_bias=qkv_bias in source.stored_key or diff,
        )
    try:
        return FluxConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source.path}: inconsistent FLUX config from the checkpoint: {e}") from None


def _metadata_rope(path: Path, meta: str, theta: int) -> tuple[tuple[int, ...], int]:
    """RoPE ``axes_dim`` and ``theta`` from the file's ``permuquant.flux_config`` metadata (JSON)."""
    where = f"{path}: metadata '{CONFIG_METADATA_KEY}'"
    try:
        cfg = json.loads(meta)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{where} is not JSON: {meta[:80]!r}") from None
    if not isinstance(cfg, dict) or "axes_dim" not in cfg:
        raise CheckpointError(f"{where}: expected a JSON object with 'axes_dim', found {meta[:80]!r}")
    axes = cfg["axes_dim"]
    if not (isinstance(axes, list) and axes and all(_positive_int(a) for a in axes)):
        raise CheckpointError(f"{where}: field 'axes_dim': expected a list of positive integers, found {_found(axes)}")
    theta = cfg.get("theta", theta)
    if not _positive_int(theta):
        raise CheckpointError(f"{where}: field 'theta': expected a positive integer, found {_found(theta)}")
    return tuple(axes), theta


def read_flux_config(path: str | os.PathLike | None = None) -> FluxConfig:
    """The :class:`FluxConfig` of the checkpoint at ``path``, from its header only."""
    return infer_config(open_checkpoint(path))


def _check_keys(source: CheckpointSource, table: dict[str, SourceTensor], cfg: FluxConfig, basis: str) -> None:
    present = source.stored_key
    check_tensors(
        {k: e.shape for k, e in table.items()},
        present,
        lambda k: source.files[k].tensors[present[k]],
        checkpoint=source.path,
        describe=f"a FLUX.1 transformer with {_describe(cfg)}",
        basis=basis,
        dtypes=STORED_DTYPES,
        stored=lambda k: _stored(source, k),
        where=source.where,
    )


def _stored(source: CheckpointSource, key: str) -> str:
    prefix = ""
    if source.stored_key:
        k0, s0 = next(iter(source.stored_key.items()))
        prefix = s0[: len(s0) - len(k0)]
    return prefix + key


def _describe(cfg: FluxConfig) -> str:
    return (
        f"hidden_size={cfg.hidden_size}, heads={cfg.num_heads}, depth={cfg.depth}+"
        f"{cfg.depth_single_blocks}, mlp={cfg.mlp_hidden_dim}, guidance_embed={cfg.guidance_embed}"
    )


def load_flux(
    path: str | os.PathLike | None = None,
    dtype=jnp.bfloat16,
    *,
    config: FluxConfig | None = None,
    attention_impl: str | None = None,
    progress: bool = False,
    check_finite: bool = True,
    host_blocks: bool = False,
) -> FluxDiT:
    """Load a FLUX.1 transformer checkpoint into a :class:`FluxDiT` with parameters in ``dtype``.

    ``path``: a BFL single ``.safetensors`` file, a diffusers ``transformer/`` folder, a diffusers
    pipeline folder, or None for the tiny model shipped in the package. ``config`` overrides the
    config inferred from the checkpoint (keys and shapes are checked against it). Stored tensors may
    be any of ``STORED_DTYPES`` (BF16, F16, F32, F64, F8_E4M3, F8_E5M2); each is read, cast to
    ``dtype`` and placed in turn.

    ``check_finite`` (default on): every loaded parameter is checked for NaN/Inf as it is placed (after
    the cast; layers of large stacked weights on the device); the error names the file and the
    checkpoint's own key, and says whether the stored values are non-finite or the cast overflowed.

    ``host_blocks``: the stacked double/single block arrays go to pinned host memory as they are loaded
    and the model streams them to the device block by block in every forward
    (:func:`~permuquant_jax.models.flux.offload_blocks`): the device never holds more than one stacked
    weight (FLUX.1-dev: 4.7 GiB, ``single_blocks.linear1``) while loading, nor the blocks afterwards.

    Raises :class:`CheckpointError` (a ``ValueError``) with a one-line message for anything that is
    not a loadable FLUX.1 transformer.
    """
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _LOADABLE]:
        raise ValueError(f"load_flux: dtype must be bfloat16, float16 or float32, got {jnp.dtype(dtype)}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    source = open_checkpoint(path)
    cfg = config or infer_config(source)
    table = bfl_keymap(cfg) if source.layout == "bfl" else diffusers_keymap(cfg)
    basis = "the config passed in" if config is not None else (
        "read from config.json" if source.diffusers_config is not None else "inferred from the other keys")
    _check_keys(source, table, cfg, basis)

    model = nnx.eval_shape(lambda: FluxDiT(cfg, rngs=nnx.Rngs(0), dtype=dtype, attention_impl=attention_impl))
    by_target: dict[tuple[str, ...], list[SourceTensor]] = {}
    for entry in table.values():
        targets = {p.target for p in entry.pieces}
        assert len(targets) == 1, entry.key
        by_target.setdefault(entry.pieces[0].target, []).append(entry)

    items: Iterable = by_target.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(by_target), desc=f"loading {source.path.name}", unit="tensor")
    # Jobs (one small target whole, or one layer of a large stacked target) are read by helper threads,
    # LOAD_AHEAD ahead of the device. A layer of a large stacked weight is read in the stored orientation
    # ([out, in]: whole rows, plain reads) and transposed and checked on the device as it is written in
    # place (numpy's bf16 transposes ran at ~0.25 GB/s and set the load time); small targets are
    # assembled on the host as before (no device program per shape).
    on_device = DEVICE_TRANSPOSE if DEVICE_TRANSPOSE is not None else jax.default_backend() != "cpu"
    jobs: list[tuple[int | None, list[SourceTensor], tuple[int, ...], bool]] = []
    plan: list[tuple[tuple[str, ...], tuple[int, ...], bool, int]] = []
    for target, entries in by_target.items():
        shape = tuple(_variable(model, target).get_value().shape)
        matrix = entries[0].is_matrix
        assert all(e.is_matrix == matrix for e in entries), target
        stacked = entries[0].pieces[0].layer is not None
        if stacked and np.prod(shape) * np_dtype.itemsize >= LAYERWISE_MIN_BYTES:
            by_layer: dict[int, list[SourceTensor]] = {}
            for entry in entries:
                by_layer.setdefault(entry.pieces[0].layer, []).append(entry)
            stored = matrix and on_device
            layer_shape = (shape[-1], shape[-2]) if stored else shape[1:]  # weights as stored: [out, in]
            for layer, layer_entries in sorted(by_layer.items()):
                jobs.append((layer, layer_entries, layer_shape, stored))
            plan.append((target, shape, stored, len(by_layer)))
        else:
            jobs.append((None, entries, shape, stacked))
            plan.append((target, shape, matrix, 0))

    from concurrent.futures import ThreadPoolExecutor

    def read(job):
        layer, entries, shape, flag = job  # flag: stacked (whole targets) / stored orientation (layers)
        buf = np.empty(shape, np_dtype)
        if layer is not None and flag:
            _fill_stored(source, entries, buf)  # checked on the device
        else:  # in the model's orientation, checked here
            stacked = flag and layer is None
            _fill(source, entries, buf, stacked=stacked)
            if check_finite:
                _check_finite(source, entries, buf, stacked=stacked)
        return layer, entries, buf

    pool = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="load_flux")
    pending = [pool.submit(read, j) for j in jobs[:LOAD_AHEAD]]
    next_job = len(pending)

    def take():
        nonlocal next_job
        buf = pending.pop(0).result()
        if next_job < len(jobs):
            pending.append(pool.submit(read, jobs[next_job]))
            next_job += 1
        return buf

    host = host_sharding() if host_blocks else None

    def place(target, value):  # a block array goes to host memory (streamed), the rest stays where it is
        if host is not None and target[0] in BLOCK_STACKS:
            return jax.device_put(value, host)
        return jnp.asarray(value)

    try:
        for (target, shape, stored, n_layers), _ in zip(plan, items, strict=True):
            var = _variable(model, target)
            if not n_layers:
                _, _, buf = take()
                var.set_value(place(target, buf))
                del buf
                continue
            value, checks = jnp.zeros(shape, dtype), []
            for _j in range(n_layers):
                layer, layer_entries, buf = take()
                value, finite = _write_layer(value, jnp.asarray(buf), layer, transpose=stored)
                del buf
                if check_finite and stored:
                    checks.append((layer, layer_entries, finite))
            for _layer, layer_entries, finite in checks:
                if not bool(finite):  # name the stored tensor responsible (host search, on failure only)
                    layer_buf = np.empty(shape[1:], np_dtype)
                    _fill(source, layer_entries, layer_buf, stacked=False)
                    _check_finite(source, layer_entries, layer_buf, stacked=False)
            var.set_value(place(target, value))
            del value
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for path_, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not isinstance(var.get_value(), jax.Array):
            raise AssertionError(f"load_flux: parameter {'.'.join(map(str, path_))} was not loaded")
    if host_blocks:
        offload_blocks(model)  # marks the model streamed (the block arrays are already in host memory)
    return model


BLOCK_STACKS = ("double_blocks", "single_blocks")


# Stacked tensors at least this large are assembled layer by layer (see load_flux).
LAYERWISE_MIN_BYTES = 16 * 2**20
LOAD_AHEAD = 3  # jobs read ahead of the device (host memory: at most this many layers or small targets)
LOAD_THREADS = 2
# Layers of large stacked weights transposed on the device (None: unless the backend is the CPU, where
# XLA's bf16 transposes are no faster than numpy's and the host assembles every layer).
DEVICE_TRANSPOSE: bool | None = None


@functools.partial(jax.jit, donate_argnums=0, static_argnames="transpose")
def _write_layer(stacked: jax.Array, layer_value: jax.Array, index, *, transpose: bool = False):
    """Write one layer into the stacked array in place (donated); ``transpose``: the layer comes as
    stored ([out, in]) for a kernel ([depth, in, out]). Also returns whether the layer is finite."""
    if transpose:
        layer_value = jnp.swapaxes(layer_value, -1, -2)
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_value, index, 0), jnp.all(jnp.isfinite(layer_value))


def _fill_stored(source: CheckpointSource, entries: list[SourceTensor], buf: np.ndarray) -> None:
    """One layer's pieces into ``buf`` in the stored orientation (weights [out, in], so every piece is
    a block of whole rows): a tensor stored in ``buf``'s dtype that fills a contiguous block is read
    straight into it; anything else is read, then cast by numpy as it is copied in (the same values)."""
    for entry in entries:
        file, key = source.files[entry.key], source.stored_key[entry.key]
        direct = len(entry.pieces) == 1 and entry.pieces[0].src is None and \
            file.tensors[key].numpy_dtype == buf.dtype
        arr = None
        for piece in entry.pieces:
            dest = buf if piece.dst is None else buf[piece.dst[0] : piece.dst[1]]
            if direct and dest.flags.c_contiguous:
                file.read_into(key, dest)
                continue
            if arr is None:
                arr = source.read(entry.key)
            rows = arr if piece.src is None else arr[piece.src[0] : piece.src[1]]
            with np.errstate(over="ignore"):  # a cast that overflows gives Inf: _check_finite names it
                dest[...] = rows
        del arr


def _fill(source: CheckpointSource, entries: list[SourceTensor], buf: np.ndarray, *, stacked: bool) -> None:
    """Read each source tensor and write its pieces into ``buf`` (cast, transposed for weights).
    With ``stacked=False`` ``buf`` is one layer's slice and the pieces' layer indices are ignored.
    (Large stacked weights are read with :func:`_fill_stored` instead.)"""
    for entry in entries:
        arr = source.read(entry.key)
        for piece in entry.pieces:
            rows = arr if piece.src is None else arr[piece.src[0] : piece.src[1]]
            dest = buf[piece.layer] if stacked and piece.layer is not None else buf
            cols = slice(None) if piece.dst is None else slice(*piece.dst)
            with np.errstate(over="ignore"):  # a cast that overflows gives Inf: _check_finite names it
                if entry.is_matrix:
                    dest[:, cols] = rows.T
                else:
                    dest[cols] = rows
        del arr


def _check_finite(source: CheckpointSource, entries: list[SourceTensor], buf: np.ndarray, *, stacked: bool) -> None:
    """Raise if ``buf`` (filled by :func:`_fill`) holds NaN/Inf, naming the file and stored key of the
    source tensor responsible. One bit test over ``buf`` when all is well; the search runs only on failure."""
    if all_finite(buf):
        return
    for entry in entries:
        for piece in entry.pieces:
            dest = buf[piece.layer] if stacked and piece.layer is not None else buf
            cols = slice(None) if piece.dst is None else slice(*piece.dst)
            region = dest[:, cols] if entry.is_matrix else dest[cols]
            if np.isfinite(region.astype(np.float32)).all():
                continue
            key, file = source.stored_key[entry.key], source.files[entry.key]
            file.read(key, check_finite=True)  # raises if the stored values are NaN/Inf
            stored = file.read(key).astype(np.float32)
            raise CheckpointError(
                f"{file.path}: tensor '{key}' ({file.tensors[key].dtype}) holds values up to "
                f"{float(np.abs(stored).max()):.6g} that overflow {buf.dtype} (largest finite "
                f"{float(ml_dtypes.finfo(buf.dtype).max):.4g}) when loaded; load it in float32 or bfloat16"
            )
    raise AssertionError("load_flux: a non-finite value was found but no source tensor holds it")


def _variable(model: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
    obj = model
    for name in path:
        obj = getattr(obj, name)
    return obj
