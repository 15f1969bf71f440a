"""``load_t5`` / ``load_clip``: FLUX's text encoders as people keep them -> Flax NNX models.

Sources:

- a diffusers pipeline folder (``text_encoder_2/`` for T5, ``text_encoder/`` for CLIP) or such a
  folder itself: transformers' ``config.json`` plus ``model.safetensors`` or shards with their index;
- the single files people keep beside ComfyUI: ``t5xxl_fp16.safetensors``,
  ``t5xxl_fp8_e4m3fn.safetensors`` (FP8 tensors are upcast), ``clip_l.safetensors``; with or without
  the ``text_model.`` prefix (CLIP), with ``shared.weight`` and/or ``encoder.embed_tokens.weight``
  (T5), also when the keys sit under a longer prefix in a bigger file.

The config comes from ``config.json`` when there is one, else from the safetensors metadata key
``permuquant.t5_config`` / ``permuquant.clip_config`` (a JSON object of the config's fields), else
from the tensor shapes (T5: all of it but the maximum distance, 128; CLIP: heads assume T5/CLIP's head
width 64, and the pooled-output rule is the legacy ``eos_token_id`` 2 of OpenAI's CLIP and FLUX).
Keys and shapes are checked before any tensor is read; tensors are then streamed one by one (large
stacked ones layer by layer), cast and placed. Problems raise a one-line :class:`CheckpointError`
naming the file, the key, and what was expected vs found.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.convert.safetensors_io import (
    FLOAT_DTYPES,
    CheckpointError,
    SafetensorsCollection,
    check_path,
    check_tensors,
    load_json,
    open_safetensors,
)
from permuquant_jax.models.clip import CLIPTextConfig, CLIPTextModel
from permuquant_jax.models.t5 import T5Config, T5Encoder

T5_CONFIG_METADATA_KEY = "permuquant.t5_config"
CLIP_CONFIG_METADATA_KEY = "permuquant.clip_config"
T5_SUBFOLDER = "text_encoder_2"
CLIP_SUBFOLDER = "text_encoder"
_LOADABLE = (jnp.bfloat16, jnp.float16, jnp.float32)
# Stacked tensors at least this large are assembled layer by layer on the host.
LAYERWISE_MIN_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class EncoderTensor:
    """One tensor a checkpoint must hold: its key (no prefix), stored shape, and where it goes.

    ``target``: the model variable path; ``layer``: index on the stacked axis (None: unstacked);
    ``transpose``: stored ``[out, in]`` (torch Linear) -> kernel ``[in, out]``.
    """

    key: str
    shape: tuple[int, ...]
    target: tuple[str, ...]
    layer: int | None = None
    transpose: bool = False


# ---------------------------------------------------------------- key tables


def t5_keymap(cfg: T5Config) -> dict[str, EncoderTensor]:
    """Every tensor of transformers' ``T5EncoderModel`` for ``cfg`` (the embedding as ``shared.weight``)."""
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
    t: dict[str, EncoderTensor] = {}

    def add(key, shape, target, layer=None, transpose=False):
        t[key] = EncoderTensor(key, tuple(shape), tuple(target), layer, transpose)

    add("shared.weight", (cfg.vocab_size, d), ("shared", "embedding"))
    add(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (cfg.relative_attention_num_buckets, cfg.num_heads),
        ("relative_attention_bias", "embedding"),
    )
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        for name in ("q", "k", "v"):
            add(p + f"0.SelfAttention.{name}.weight", (inner, d), ("blocks", "attn", name, "kernel"), i, True)
        add(p + "0.SelfAttention.o.weight", (d, inner), ("blocks", "attn", "o", "kernel"), i, True)
        add(p + "0.layer_norm.weight", (d,), ("blocks", "attn_norm", "scale"), i)
        for name in ("wi_0", "wi_1"):
            add(p + f"1.DenseReluDense.{name}.weight", (ff, d), ("blocks", "ffn", name, "kernel"), i, True)
        add(p + "1.DenseReluDense.wo.weight", (d, ff), ("blocks", "ffn", "wo", "kernel"), i, True)
        add(p + "1.layer_norm.weight", (d,), ("blocks", "ffn_norm", "scale"), i)
    add("encoder.final_layer_norm.weight", (d,), ("final_norm", "scale"))
    return t


def clip_keymap(cfg: CLIPTextConfig) -> dict[str, EncoderTensor]:
    """Every tensor of transformers' ``CLIPTextModel`` for ``cfg``, without the ``text_model.`` prefix."""
    w, f = cfg.hidden, cfg.intermediate
    t: dict[str, EncoderTensor] = {}

    def add(key, shape, target, layer=None, transpose=False):
        t[key] = EncoderTensor(key, tuple(shape), tuple(target), layer, transpose)

    add("embeddings.token_embedding.weight", (cfg.vocab_size, w), ("token_embedding", "embedding"))
    add("embeddings.position_embedding.weight", (cfg.max_position, w), ("position_embedding", "embedding"))
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            add(p + ln + ".weight", (w,), ("layers", ln, "scale"), i)
            add(p + ln + ".bias", (w,), ("layers", ln, "bias"), i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(p + f"self_attn.{proj}.weight", (w, w), ("layers", "self_attn", proj, "kernel"), i, True)
            add(p + f"self_attn.{proj}.bias", (w,), ("layers", "self_attn", proj, "bias"), i)
        add(p + "mlp.fc1.weight", (f, w), ("layers", "mlp", "fc1", "kernel"), i, True)
        add(p + "mlp.fc1.bias", (f,), ("layers", "mlp", "fc1", "bias"), i)
        add(p + "mlp.fc2.weight", (w, f), ("layers", "mlp", "fc2", "kernel"), i, True)
        add(p + "mlp.fc2.bias", (w,), ("layers", "mlp", "fc2", "bias"), i)
    add("final_layer_norm.weight", (w,), ("final_layer_norm", "scale"))
    add("final_layer_norm.bias", (w,), ("final_layer_norm", "bias"))
    return t


# ---------------------------------------------------------------- opening sources


@dataclasses.dataclass
class _Source:
    """An opened encoder checkpoint: tensors, the prefix its keys carry, and its config.json."""

    path: Path
    tensors: SafetensorsCollection
    stored: dict[str, str]  # unprefixed key -> stored key (only the keys that belong to the encoder)
    prefix: str
    config: dict | None = None
    config_path: Path | None = None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors.info(self.stored[key]).shape

    def file(self, key: str) -> Path:
        return self.tensors.file_of(self.stored[key]).path

    def read(self, key: str, dtype, check_finite: bool) -> np.ndarray:
        """Tensor ``key`` cast to ``dtype``; ``check_finite``: NaN/Inf stored or made by the cast is an error."""
        return self.tensors.read(self.stored[key], dtype, check_finite=check_finite)


def _open(path: str | os.PathLike, subfolder: str, what: str) -> tuple[SafetensorsCollection, Path, dict | None]:
    """(tensors, folder or file, config.json or None) for a file, a model folder or a pipeline folder."""
    path = check_path(path, "any")
    if path.is_file():
        return open_safetensors(path), path, None
    if (path / subfolder).is_dir():
        path = path / subfolder
    elif (path / "model_index.json").is_file():
        raise CheckpointError(
            f"{path}: a diffusers pipeline folder without {subfolder}/ (the {what}); pass the encoder's "
            "folder or file instead"
        )
    config = load_json(path / "config.json", "transformers config.json") if (path / "config.json").is_file() else None
    if not any(p.name.endswith(".safetensors") for p in path.iterdir()):
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        raise CheckpointError(
            f"{path}: no .safetensors weights for the {what} here (expected model.safetensors or shards with "
            f"model.safetensors.index.json); found: {found[:8]}"
        )
    return open_safetensors(path), path, config


def _select(tensors: SafetensorsCollection, anchor: str) -> tuple[str, list[str]] | None:
    """The prefix before ``anchor`` (shortest match) and the stored keys under it."""
    hits = [k for k in tensors.keys() if k == anchor or k.endswith("." + anchor)]
    if not hits:
        return None
    prefix = min(hits, key=len)[: -len(anchor)]
    return prefix, [k for k in tensors.keys() if k.startswith(prefix)]


def _looks_like(keys: list[str]) -> str:
    pats = (
        ("a CLIP text encoder", re.compile(r"(^|\.)(text_model\.|embeddings\.token_embedding)")),
        ("a T5 encoder", re.compile(r"(^|\.)encoder\.block\.\d+\.layer")),
        ("a FLUX transformer", re.compile(r"(^|\.)(double_blocks\.|img_in\.|x_embedder\.)")),
        ("a VAE (autoencoder)", re.compile(r"(^|\.)(decoder\.(conv_in|up|mid)|quant_conv|post_quant_conv)")),
    )
    for name, pat in pats:
        hit = next((k for k in keys if pat.search(k)), None)
        if hit is not None:
            return f"it looks like {name} (key '{hit}')"
    return f"its first key is '{keys[0]}'" if keys else "it holds no tensors"


def _metadata_config(tensors: SafetensorsCollection, key: str) -> dict | None:
    raw = tensors.metadata.get(key)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError
    except ValueError:
        raise CheckpointError(f"{tensors.path}: metadata '{key}' is not a JSON object: {raw[:80]!r}") from None
    return data


def _config_from(cls, fields: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: inconsistent {cls.__name__}: {e}") from None


def _layer_count(keys: Iterable[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in keys if (m := pat.match(k))]
    return max(idx) + 1 if idx else 0


# ---------------------------------------------------------------- T5

_T5_ANCHOR = "encoder.final_layer_norm.weight"
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
_T5_IGNORED = re.compile(r"^(decoder\.|lm_head\.weight$)")  # encoder-decoder checkpoints: the decoder is not read


def _open_t5(path: str | os.PathLike) -> _Source:
    tensors, where, config = _open(path, T5_SUBFOLDER, "T5 text encoder (text_encoder_2)")
    found = _select(tensors, _T5_ANCHOR)
    if found is None:
        raise CheckpointError(
            f"{tensors.path}: not a T5 encoder checkpoint: no key '{_T5_ANCHOR}'; {_looks_like(tensors.keys())}; "
            "expected FLUX's text_encoder_2/ or t5xxl_fp16.safetensors / t5xxl_fp8_e4m3fn.safetensors"
        )
    prefix, keys = found
    if "scaled_fp8" in tensors or any(k.endswith(".scale_weight") for k in keys):
        hit = next((k for k in keys if k.endswith(".scale_weight")), "scaled_fp8")
        raise CheckpointError(
            f"{tensors.file_of(hit).path}: a scaled-FP8 T5 file (key '{hit}'), which is not supported: use "
            "t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors"
        )
    stored = {k[len(prefix) :]: k for k in keys}
    stored = {k: s for k, s in stored.items() if not _T5_IGNORED.match(k)}
    # The token embedding may be stored as shared.weight, encoder.embed_tokens.weight, or both (tied).
    embeds = [k for k in _T5_EMBEDDINGS if k in stored]
    if len(embeds) == 2:
        a, b = (tensors.info(stored[k]).shape for k in embeds)
        if a != b:
            raise CheckpointError(
                f"{tensors.file_of(stored[embeds[1]]).path}: key '{stored[embeds[1]]}': expected shape {list(a)} "
                f"(as '{stored[embeds[0]]}', the same tied embedding), found {list(b)}"
            )
        del stored["encoder.embed_tokens.weight"]
    elif embeds == ["encoder.embed_tokens.weight"]:
        stored["shared.weight"] = stored.pop("encoder.embed_tokens.weight")
    src = _Source(where, tensors, stored, prefix, config, where / "config.json" if config is not None else None)
    return src


def _t5_config(source: _Source) -> T5Config:
    c = source.config
    if c is not None:
        where = str(source.config_path)
        ff = c.get("feed_forward_proj", "gated-gelu")
        if ff not in ("gated-gelu", "gated-gelu_new"):
            raise CheckpointError(
                f"{where}: feed_forward_proj is '{ff}'; FLUX's T5 is T5 v1.1 with 'gated-gelu' (wi_0/wi_1)"
            )
        act = c.get("dense_act_fn", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{where}: dense_act_fn is '{act}', expected the tanh GELU 'gelu_new'")
        try:
            fields = dict(
                vocab_size=int(c.get("vocab_size", 32128)),
                d_model=int(c["d_model"]),
                d_kv=int(c["d_kv"]),
                num_heads=int(c["num_heads"]),
                d_ff=int(c["d_ff"]),
                num_layers=int(c["num_layers"]),
                relative_attention_num_buckets=int(c.get("relative_attention_num_buckets", 32)),
                relative_attention_max_distance=int(c.get("relative_attention_max_distance", 128)),
                eps=float(c.get("layer_norm_epsilon", 1e-6)),
            )
        except KeyError as e:
            raise CheckpointError(f"{where}: missing field {e} of a T5 config") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad value in a T5 config ({e})") from None
        # The embedding may be padded beyond config.vocab_size in some exports: the tensor decides.
        if "shared.weight" in source.stored:
            fields["vocab_size"] = source.shape("shared.weight")[0]
        return _config_from(T5Config, fields, where)
    meta = _metadata_config(source.tensors, T5_CONFIG_METADATA_KEY)
    if meta is not None:
        return _config_from(T5Config, meta, f"{source.tensors.path} (metadata '{T5_CONFIG_METADATA_KEY}')")

    def shape(key: str, expected: str) -> tuple[int, ...]:
        if key not in source.stored:
            alt = " (or 'encoder.embed_tokens.weight')" if key == "shared.weight" else ""
            raise CheckpointError(
                f"{source.tensors.path}: missing key '{source.prefix + key}'{alt} (expected {expected})"
            )
        return source.shape(key)

    vocab, d = shape("shared.weight", "the [vocab, d_model] token embedding")
    buckets, heads = shape(
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "a [buckets, heads] table"
    )
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight", "a [heads * d_kv, d_model] weight")[0]
    if inner % heads:
        raise CheckpointError(
            f"{source.tensors.path}: q projection width {inner} is not a multiple of the {heads} heads of the "
            "relative attention bias table"
        )
    fields = dict(
        vocab_size=vocab,
        d_model=d,
        d_kv=inner // heads,
        num_heads=heads,
        d_ff=shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "a [d_ff, d_model] weight")[0],
        num_layers=_layer_count(source.stored, "encoder.block."),
        relative_attention_num_buckets=buckets,
    )
    return _config_from(T5Config, fields, str(source.tensors.path))


def read_t5_config(path: str | os.PathLike) -> T5Config:
    """The :class:`T5Config` of the T5 encoder at ``path`` (config.json or headers only)."""
    return _t5_config(_open_t5(path))


def load_t5(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    config: T5Config | None = None,
    progress: bool = False,
    check_finite: bool = True,
) -> T5Encoder:
    """Load FLUX's T5 v1.1 encoder into a :class:`T5Encoder` with parameters and compute in ``dtype``.

    ``path``: a diffusers pipeline folder (reads ``text_encoder_2/``), a transformers T5 encoder folder
    (config.json + model.safetensors or shards + index) or a single file (``t5xxl_fp16.safetensors``,
    ``t5xxl_fp8_e4m3fn.safetensors``). ``config`` overrides the inferred config (keys and shapes are
    checked against it). ``check_finite``: reject NaN/Inf weights, naming file and key.
    """
    source = _open_t5(path)
    cfg = config or _t5_config(source)
    return _load(
        source,
        t5_keymap(cfg),
        lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype),
        dtype,
        f"a T5 encoder with {_describe_t5(cfg)}",
        _basis(config, source, T5_CONFIG_METADATA_KEY),
        "load_t5",
        progress,
        check_finite,
    )


def _describe_t5(cfg: T5Config) -> str:
    return (
        f"d_model={cfg.d_model}, {cfg.num_layers} layers, {cfg.num_heads} heads x {cfg.d_kv}, d_ff={cfg.d_ff}, "
        f"vocab={cfg.vocab_size}"
    )


# ---------------------------------------------------------------- CLIP

_CLIP_ANCHOR = "embeddings.token_embedding.weight"
# Parts of CLIP checkpoints that the text transformer does not use (projection heads, a full
# CLIPModel's vision tower, the position-ids buffer older exports saved).
_CLIP_IGNORED = re.compile(
    r"^(text_projection\.weight|logit_scale|visual_projection\.weight|vision_model\..*|"
    r"(text_model\.)?embeddings\.position_ids)$"
)


def _open_clip(path: str | os.PathLike) -> _Source:
    tensors, where, config = _open(path, CLIP_SUBFOLDER, "CLIP text encoder (text_encoder)")
    found = _select(tensors, _CLIP_ANCHOR)
    if found is None:
        raise CheckpointError(
            f"{tensors.path}: not a CLIP text encoder checkpoint: no key '{_CLIP_ANCHOR}' (with or without "
            f"'text_model.'); {_looks_like(tensors.keys())}; expected FLUX's text_encoder/ or clip_l.safetensors"
        )
    prefix, keys = found
    if prefix not in ("", "text_model."):
        # Inside a bigger file (e.g. an all-in-one checkpoint): read only the text transformer's keys.
        keys = [k for k in keys if k.startswith(prefix)]
    else:
        keys = tensors.keys()
    stored = {}
    for k in keys:
        short = k[len(prefix) :] if k.startswith(prefix) else k
        if not (_CLIP_IGNORED.match(k) or _CLIP_IGNORED.match(short)):
            stored[short] = k
    return _Source(where, tensors, stored, prefix, config, where / "config.json" if config is not None else None)


def _clip_config(source: _Source) -> CLIPTextConfig:
    c = source.config
    if c is not None:
        where = str(source.config_path)
        if isinstance(c.get("text_config"), dict):  # a full CLIPModel config
            c = c["text_config"]
        try:
            fields = dict(
                vocab_size=int(c.get("vocab_size", 49408)),
                hidden=int(c.get("hidden_size", 512)),
                heads=int(c.get("num_attention_heads", 8)),
                layers=int(c.get("num_hidden_layers", 12)),
                intermediate=int(c.get("intermediate_size", 2048)),
                max_position=int(c.get("max_position_embeddings", 77)),
                eos_token_id=int(c.get("eos_token_id", 2)),
                hidden_act=str(c.get("hidden_act", "quick_gelu")),
                eps=float(c.get("layer_norm_eps", 1e-5)),
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: bad value in a CLIP text config ({e})") from None
        return _config_from(CLIPTextConfig, fields, where)
    meta = _metadata_config(source.tensors, CLIP_CONFIG_METADATA_KEY)
    if meta is not None:
        return _config_from(CLIPTextConfig, meta, f"{source.tensors.path} (metadata '{CLIP_CONFIG_METADATA_KEY}')")

    def shape(key: str, expected: str) -> tuple[int, ...]:
        if key not in source.stored:
            raise CheckpointError(f"{source.tensors.path}: missing key '{source.prefix + key}' (expected {expected})")
        return source.shape(key)

    vocab, hidden = shape(_CLIP_ANCHOR, "the [vocab, hidden] token embedding")
    if hidden % 64:
        raise CheckpointError(
            f"{source.tensors.path}: width {hidden} (from '{source.prefix + _CLIP_ANCHOR}') is not a multiple of "
            f"CLIP's head width 64, so the number of heads cannot be inferred: give a config.json, the metadata "
            f"'{CLIP_CONFIG_METADATA_KEY}', or config="
        )
    fields = dict(
        vocab_size=vocab,
        hidden=hidden,
        heads=hidden // 64,
        layers=_layer_count(source.stored, "encoder.layers."),
        intermediate=shape("encoder.layers.0.mlp.fc1.weight", "a [intermediate, hidden] weight")[0],
        max_position=shape("embeddings.position_embedding.weight", "a [positions, hidden] table")[0],
    )
    return _config_from(CLIPTextConfig, fields, str(source.tensors.path))


def read_clip_config(path: str | os.PathLike) -> CLIPTextConfig:
    """The :class:`CLIPTextConfig` of the CLIP text encoder at ``path`` (config.json or headers only)."""
    return _clip_config(_open_clip(path))


def load_clip(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    config: CLIPTextConfig | None = None,
    progress: bool = False,
    check_finite: bool = True,
) -> CLIPTextModel:
    """Load FLUX's CLIP text encoder into a :class:`CLIPTextModel` with parameters and compute in ``dtype``.

    ``path``: a diffusers pipeline folder (reads ``text_encoder/``), a transformers CLIP text folder
    (config.json + model.safetensors) or a single file (``clip_l.safetensors``, keys with or without
    ``text_model.``). ``config`` overrides the inferred config (keys and shapes are checked against it).
    """
    source = _open_clip(path)
    cfg = config or _clip_config(source)
    return _load(
        source,
        clip_keymap(cfg),
        lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0), dtype=dtype),
        dtype,
        f"a CLIP text encoder with hidden={cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, "
        f"mlp={cfg.intermediate}, vocab={cfg.vocab_size}, positions={cfg.max_position}",
        _basis(config, source, CLIP_CONFIG_METADATA_KEY),
        "load_clip",
        progress,
        check_finite,
    )


# ---------------------------------------------------------------- shared loading


def _basis(config: object | None, source: _Source, metadata_key: str) -> str:
    """Where the config a table was made from came from, for check_tensors' messages."""
    if config is not None:
        return "the config passed in"
    if source.config is not None:
        return f"read from {source.config_path}"
    if metadata_key in source.tensors.metadata:
        return f"read from the file's metadata '{metadata_key}'"
    return "inferred from the other keys"


def _check_keys(source: _Source, table: dict[str, EncoderTensor], describe: str, basis: str) -> None:
    check_tensors(
        {k: e.shape for k, e in table.items()},
        source.stored,
        lambda k: source.tensors.info(source.stored[k]),
        checkpoint=source.tensors.path,
        describe=describe,
        basis=basis,
        dtypes=tuple(FLOAT_DTYPES),
        stored=lambda k: source.prefix + k,
        where=source.file,
        missing_note=lambda k: " (or 'encoder.embed_tokens.weight')" if k == "shared.weight" else "",
    )


def _load(
    source: _Source,
    table: dict[str, EncoderTensor],
    build: Callable[[], nnx.Module],
    dtype,
    describe: str,
    basis: str,
    name: str,
    progress: bool,
    check_finite: bool,
):
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _LOADABLE]:
        raise ValueError(f"{name}: dtype must be bfloat16, float16 or float32, got {jnp.dtype(dtype)}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    _check_keys(source, table, describe, basis)
    model = nnx.eval_shape(build)
    by_target: dict[tuple[str, ...], list[EncoderTensor]] = {}
    for entry in table.values():
        by_target.setdefault(entry.target, []).append(entry)
    items: Iterable = by_target.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(by_target), desc=f"loading {source.path.name}", unit="tensor")

    def read(entry: EncoderTensor) -> np.ndarray:
        with np.errstate(over="ignore"):  # an overflowing cast gives Inf, which check_finite names
            arr = source.read(entry.key, np_dtype, check_finite)
        return arr.T if entry.transpose else arr

    for target, entries in items:
        var = _variable(model, target)
        shape = var.get_value().shape
        stacked = entries[0].layer is not None
        if stacked and np.prod(shape) * np_dtype.itemsize >= LAYERWISE_MIN_BYTES:
            # One layer at a time into the stacked device array (donated), never a second full copy.
            value = jnp.zeros(shape, dtype)
            for entry in sorted(entries, key=lambda e: e.layer):
                value = _write_layer(value, jnp.asarray(np.ascontiguousarray(read(entry))), entry.layer)
        else:
            buf = np.empty(shape, np_dtype)
            for entry in entries:
                if stacked:
                    buf[entry.layer] = read(entry)
                else:
                    buf[...] = read(entry)
            value = jnp.asarray(buf)
            del buf
        var.set_value(value)
    for path_, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not isinstance(var.get_value(), jax.Array):
            raise AssertionError(f"{name}: parameter {'.'.join(map(str, path_))} was not loaded")
    return model


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer_value: jax.Array, index) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_value, index, 0)


def _variable(model: nnx.Module, path: tuple[str, ...]) -> nnx.Variable:
    obj = model
    for name in path:
        obj = getattr(obj, name)
    return obj
