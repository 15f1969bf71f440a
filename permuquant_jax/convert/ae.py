"""``load_autoencoder``: FLUX's autoencoder from the files people download -> :class:`AutoEncoder`.

Two key layouts:
- BFL's ``ae.safetensors`` (``encoder.down.{i}.block.{j}``, ``decoder.up.{i}`` with ``up.0`` the
  full-resolution level, ``mid.block_1|attn_1|block_2``, attention q/k/v/proj_out as 1x1 convs,
  ``nin_shortcut``, ``norm_out``), also inside an all-in-one file under a ``vae.`` or
  ``first_stage_model.`` prefix;
- diffusers' ``AutoencoderKL`` (a pipeline's ``vae/`` folder: ``config.json`` + weights;
  ``down_blocks.{i}.resnets.{j}``, ``up_blocks.{k}`` = BFL's ``up.{n-1-k}``, ``mid_block.resnets``,
  ``mid_block.attentions.0.to_q|to_k|to_v|to_out.0`` as linears, ``conv_shortcut``, ``conv_norm_out``).

Keys and shapes are checked against the config before any tensor is read; tensors are then streamed
one by one (convolution kernels OIHW -> HWIO, linears transposed), cast to ``dtype`` and placed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.convert.safetensors_io import (
    CheckpointError,
    SafetensorsCollection,
    check_path,
    check_tensors,
    load_json,
    open_safetensors,
)
from permuquant_jax.models.autoencoder import NORM_GROUPS, AutoEncoder, AutoEncoderConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
BFL_PREFIXES = ("", "vae.", "first_stage_model.")
_LOADABLE = (jnp.bfloat16, jnp.float16, jnp.float32)


@dataclass(frozen=True)
class AETensor:
    """One stored tensor: its key (unprefixed), stored shape, our parameter path, and how to convert:
    ``conv`` (OIHW -> HWIO), ``conv1x1`` (a [out, in, 1, 1] conv -> a linear [in, out]), ``linear``
    ([out, in] -> [in, out]) or ``vector``."""

    key: str
    shape: tuple[int, ...]
    target: tuple[str | int, ...]
    kind: str


def _bfl_name(path: tuple) -> str:
    *mods, leaf = path
    leaf = {"kernel": "weight", "scale": "weight"}[leaf] if leaf in ("kernel", "scale") else leaf
    return ".".join(str(p) for p in (*mods, leaf))


_DIFFUSERS_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
        (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
        (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
        (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
        (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    )
)


def _diffusers_name(bfl: str, levels: int) -> str:
    m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", bfl)
    if m:
        k = levels - 1 - int(m.group(1))
        rest = m.group(3)
        if m.group(2) == "block":
            bfl = f"decoder.up_blocks.{k}.resnets.{rest}"
        else:
            bfl = f"decoder.up_blocks.{k}.upsamplers.0.{rest}"
    for pattern, repl in _DIFFUSERS_RULES:
        bfl = pattern.sub(repl, bfl)
    return bfl


def ae_keymap(config: AutoEncoderConfig, layout: str, model: AutoEncoder | None = None) -> dict[str, AETensor]:
    """Every stored key of an autoencoder with ``config`` in ``layout`` ("bfl" or "diffusers"),
    with its stored shape and our parameter path (derived from ``model``, by default the abstract
    model of ``config``)."""
    if layout not in ("bfl", "diffusers"):
        raise ValueError(f"ae_keymap: layout must be 'bfl' or 'diffusers', got {layout!r}")
    if model is None:
        model = nnx.eval_shape(lambda: AutoEncoder(config, rngs=nnx.Rngs(0)))
    table: dict[str, AETensor] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        name = _bfl_name(path)
        is_attn = ".attn_1." in name and ".norm." not in name
        if len(shape) == 4:
            kind, stored = "conv", (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            kind = "conv1x1" if layout == "bfl" else "linear"
            stored = (shape[1], shape[0], 1, 1) if layout == "bfl" else (shape[1], shape[0])
        else:
            kind, stored = "vector", shape
        assert len(shape) != 2 or is_attn, name
        key = name if layout == "bfl" else _diffusers_name(name, len(config.ch_mult))
        table[key] = AETensor(key, stored, tuple(path), kind)
    return table


# ---------------------------------------------------------------------------------- opening


@dataclass
class AESource:
    path: Path
    layout: str
    tensors: SafetensorsCollection
    prefix: str
    diffusers_config: dict | None = None

    def stored(self, key: str) -> str:
        return self.prefix + key

    def keys(self) -> list[str]:
        n = len(self.prefix)
        return [k[n:] for k in self.tensors.keys() if k.startswith(self.prefix)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors.info(self.stored(key)).shape)

    def where(self, key: str) -> Path:
        return self.tensors.file_of(self.stored(key)).path


def _open(path: Path) -> AESource:
    path = check_path(path, "any")
    if path.is_dir():
        if (path / "vae").is_dir():
            return _open(path / "vae")
        if (path / "config.json").is_file():
            config = load_json(path / "config.json", "diffusers config.json")
            cls = config.get("_class_name", "AutoencoderKL")
            if cls != "AutoencoderKL":
                raise CheckpointError(f"{path / 'config.json'}: _class_name is '{cls}', expected 'AutoencoderKL'")
            weights = path / DIFFUSERS_WEIGHTS
            tensors = open_safetensors(weights if weights.is_file() else path)
            source = _detect(path, tensors)
            if source.layout != "diffusers":
                raise CheckpointError(
                    f"{path}: config.json describes a diffusers AutoencoderKL but the weights use BFL's key "
                    f"layout (key '{source.stored('decoder.conv_in.weight')}')"
                )
            source.diffusers_config = config
            return source
    return _detect(path, open_safetensors(path))


def _detect(path: Path, tensors: SafetensorsCollection) -> AESource:
    keys = tensors.keys()
    anchors = [k for k in keys if k.endswith("decoder.conv_in.weight")]
    prefix = min(anchors, key=len)[: -len("decoder.conv_in.weight")] if anchors else None
    if prefix is None or prefix not in BFL_PREFIXES:
        hint = f"key '{keys[0]}'" if keys else "no tensors"
        raise CheckpointError(
            f"{tensors.path}: not an autoencoder checkpoint ({hint}); expected 'decoder.conv_in.weight' (BFL's "
            "ae.safetensors or a diffusers vae/ folder), optionally under a 'vae.' or 'first_stage_model.' prefix"
        )
    names = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    diffusers = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "decoder.mid_block.")) for k in names)
    return AESource(path=path, layout="diffusers" if diffusers else "bfl", tensors=tensors, prefix=prefix)


# ---------------------------------------------------------------------------------- config


def _config_from_diffusers(source: AESource) -> AutoEncoderConfig:
    c = source.diffusers_config or {}
    where = f"{source.path / 'config.json'}"

    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{where}: '{field}' is {c.get(field)!r}; expected {expected}")

    if c.get("use_quant_conv", True) not in (False, None) or c.get("use_post_quant_conv", True) not in (False, None):
        raise CheckpointError(
            f"{where}: use_quant_conv/use_post_quant_conv are {c.get('use_quant_conv', True)}/"
            f"{c.get('use_post_quant_conv', True)}; FLUX's autoencoder has neither (is this an SD/SDXL VAE?)"
        )
    if c.get("norm_num_groups", NORM_GROUPS) != NORM_GROUPS:
        raise bad("norm_num_groups", f"{NORM_GROUPS} (FLUX's autoencoder)")
    if c.get("mid_block_add_attention", True) is not True:
        raise bad("mid_block_add_attention", "true (FLUX's autoencoder has a mid attention)")
    if c.get("act_fn", "silu") != "silu":
        raise bad("act_fn", "'silu'")
    for field, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = c.get(field, [want])
        if not isinstance(types, list) or any(t != want for t in types):
            raise bad(field, f"a list of '{want}'")
    boc = c.get("block_out_channels", [128, 256, 512, 512])
    if not isinstance(boc, list) or not boc or not all(isinstance(b, int) and b > 0 for b in boc):
        raise bad("block_out_channels", "a list of positive integers")
    if any(b % boc[0] for b in boc):
        raise bad("block_out_channels", f"multiples of its first entry {boc[0]}")
    if len(c.get("down_block_types", boc)) != len(boc):
        raise bad("down_block_types", f"{len(boc)} entries, one per block_out_channels")
    shift = c.get("shift_factor")
    try:
        return AutoEncoderConfig(
            resolution=int(c.get("sample_size", 256) if not isinstance(c.get("sample_size"), list) else 256),
            in_channels=int(c.get("in_channels", 3)),
            ch=boc[0],
            out_ch=int(c.get("out_channels", 3)),
            ch_mult=tuple(b // boc[0] for b in boc),
            num_res_blocks=int(c.get("layers_per_block", 2)),
            z_channels=int(c.get("latent_channels", 16)),
            scale_factor=float(c.get("scaling_factor", 0.3611)),
            shift_factor=0.0 if shift is None else float(shift),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not an autoencoder config FLUX's model can take ({e})") from None


def _config_from_shapes(source: AESource) -> AutoEncoderConfig:
    present = set(source.keys())
    diff = source.layout == "diffusers"

    def shape(key: str, expected: str) -> tuple[int, ...]:
        if key not in present:
            raise CheckpointError(f"{source.tensors.path}: missing key '{source.stored(key)}' (expected {expected})")
        return source.shape(key)

    def count(pattern: str) -> int:
        pat = re.compile(pattern)
        idx = [int(m.group(1)) for k in present if (m := pat.match(k))]
        return max(idx) + 1 if idx else 0

    down = r"encoder\.down_blocks\.(\d+)\." if diff else r"encoder\.down\.(\d+)\."
    levels = count(down)
    blocks = count(r"encoder\.down_blocks\.0\.resnets\.(\d+)\." if diff else r"encoder\.down\.0\.block\.(\d+)\.")
    if levels == 0 or blocks == 0:
        example = "encoder.down_blocks.0.resnets.0.conv1.weight" if diff else "encoder.down.0.block.0.conv1.weight"
        raise CheckpointError(
            f"{source.tensors.path}: found {levels} encoder levels with {blocks} resnet blocks; expected keys like "
            f"'{source.stored(example)}'"
        )
    ch, in_ch = shape("encoder.conv_in.weight", "an [ch, in_channels, 3, 3] conv")[:2]
    widths = []
    for i in range(levels):
        key = f"encoder.down_blocks.{i}.resnets.0.conv1.weight" if diff else f"encoder.down.{i}.block.0.conv1.weight"
        widths.append(shape(key, "an [out, in, 3, 3] conv")[0])
    if any(w % ch for w in widths):
        raise CheckpointError(
            f"{source.tensors.path}: level widths {widths} are not multiples of conv_in's {ch} channels"
        )
    z = shape("decoder.conv_in.weight", "an [ch, z_channels, 3, 3] conv")[1]
    out_ch = shape("decoder.conv_out.weight", "an [out_ch, ch, 3, 3] conv")[0]
    try:
        return AutoEncoderConfig(
            in_channels=in_ch, ch=ch, out_ch=out_ch, ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=blocks, z_channels=z,
        )
    except ValueError as e:
        raise CheckpointError(f"{source.tensors.path}: inconsistent autoencoder from the shapes: {e}") from None


def _describe(cfg: AutoEncoderConfig) -> str:
    return (
        f"ch={cfg.ch}, ch_mult={list(cfg.ch_mult)}, num_res_blocks={cfg.num_res_blocks}, "
        f"z_channels={cfg.z_channels}, in/out channels {cfg.in_channels}/{cfg.out_ch}"
    )


STORED_DTYPES = ("F32", "F16", "BF16", "F64")  # what the autoencoder's weights may be stored as


def _check_keys(source: AESource, table: dict[str, AETensor], cfg: AutoEncoderConfig, basis: str) -> None:
    check_tensors(
        {k: e.shape for k, e in table.items()},
        source.keys(),
        lambda k: source.tensors.info(source.stored(k)),
        checkpoint=source.tensors.path,
        describe=f"a FLUX autoencoder with {_describe(cfg)}",
        basis=basis,
        dtypes=STORED_DTYPES,
        stored=source.stored,
        where=source.where,
        unexpected_note=lambda k: " (a quant_conv belongs to SD/SDXL VAEs; FLUX's autoencoder has none)"
        if "quant_conv" in k else "",
    )


def read_autoencoder_config(path: str | os.PathLike) -> AutoEncoderConfig:
    """The :class:`AutoEncoderConfig` of the checkpoint at ``path``, from config.json or the header."""
    source = _open(Path(path))
    return _config_from_diffusers(source) if source.diffusers_config is not None else _config_from_shapes(source)


def _convert(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return arr.transpose(2, 3, 1, 0)
    if kind == "conv1x1":
        return arr[:, :, 0, 0].T
    if kind == "linear":
        return arr.T
    return arr


def load_autoencoder(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    config: AutoEncoderConfig | None = None,
    progress: bool = False,
) -> AutoEncoder:
    """Load FLUX's autoencoder into an :class:`AutoEncoder` with parameters (and computation) in ``dtype``.

    ``path``: BFL's ``ae.safetensors`` (or an all-in-one file holding it under ``vae.`` /
    ``first_stage_model.``), a diffusers ``vae/`` folder (``config.json`` + weights), or a pipeline
    folder holding ``vae/``. ``config`` overrides the config read from ``config.json`` or inferred
    from the shapes (BFL files carry no scale/shift: FLUX's 0.3611 / 0.1159 unless ``config`` says).
    Stored tensors may be F32, F16, BF16 or F64. Raises :class:`CheckpointError` (one line) otherwise.
    """
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _LOADABLE]:
        raise ValueError(f"load_autoencoder: dtype must be bfloat16, float16 or float32, got {jnp.dtype(dtype)}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    source = _open(Path(path))
    if config is not None:
        basis = "the config passed in"
    elif source.diffusers_config is not None:
        config, basis = _config_from_diffusers(source), "read from config.json"
    else:
        config, basis = _config_from_shapes(source), "inferred from the other keys"
    model = nnx.eval_shape(lambda: AutoEncoder(config, rngs=nnx.Rngs(0), dtype=dtype))
    table = ae_keymap(config, source.layout, model)
    _check_keys(source, table, config, basis)
    items: Iterable[AETensor] = table.values()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(table), desc=f"loading {source.path.name}", unit="tensor")
    for entry in items:
        arr = source.tensors.read(source.stored(entry.key), check_finite=True)
        value = np.ascontiguousarray(_convert(arr, entry.kind)).astype(np_dtype)
        del arr
        _variable(model, entry.target).set_value(jax.device_put(value))
    return model


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    obj = model
    for name in path:
        obj = obj[name] if isinstance(name, int) else getattr(obj, name)
    return obj
