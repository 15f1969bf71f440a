"""The FLUX.1 text-to-image pipeline: tokenizers -> T5 + CLIP -> jitted Euler sampler -> autoencoder.

Parts are read from the files people download: a diffusers pipeline folder (``transformer/``,
``text_encoder/``, ``text_encoder_2/``, ``vae/``, ``tokenizer/``, ``tokenizer_2/``), or Black Forest
Labs' single files (``flux1-dev.safetensors`` + ``ae.safetensors``, with ComfyUI's ``clip_l.safetensors``
and ``t5xxl_fp16.safetensors``), or the tiny pipeline embedded in the package; the DiT may instead be
a quantized directory written by ``python -m permuquant_jax.convert``.

Each part is loaded when first needed, so the text encoders can be released from the device before
the DiT is even loaded (``release_text_encoders``): the order that lets FLUX.1-dev NVFP4 generate on a
24 GB card. Image ``i`` of a run uses the noise of seed ``seed + i`` whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.convert.validate import MAX_IMAGE_SIDE as MAX_SIDE
from permuquant_jax.models.flux import FluxConfig
from permuquant_jax.models.frozen import frozen_jit

DEV_MAX_SEQ_LEN = 512  # BFL's T5 length for FLUX.1-dev (guidance-distilled) ...
SCHNELL_MAX_SEQ_LEN = 256  # ... and for FLUX.1-schnell
PIPELINE_PARTS = {
    "transformer": "the FLUX transformer",
    "text_encoder": "the CLIP text encoder",
    "text_encoder_2": "the T5 text encoder",
    "vae": "the autoencoder",
    "tokenizer": "the CLIP tokenizer",
    "tokenizer_2": "the T5 tokenizer",
}


class PipelineError(ValueError):
    """A pipeline that cannot be assembled (missing part, mismatched widths, bad option); one line."""


def embedded_pipeline_dir() -> Path:
    """The tiny pipeline shipped in the package (``assets/tiny_pipeline``, see ``assets/make_tiny_pipeline.py``)."""
    return Path(str(importlib.resources.files("permuquant_jax") / "assets" / "tiny_pipeline"))


def embedded_transformer_path() -> Path:
    """The embedded tiny pipeline's DiT (BFL layout; its text widths match the embedded encoders, unlike
    ``convert.default_checkpoint_path()``'s, which takes FLUX's real 4096/768)."""
    from permuquant_jax.assets.make_tiny_pipeline import DIT_FILE

    return embedded_pipeline_dir() / DIT_FILE


def builtin_prompts() -> list[str]:
    """The built-in prompt set (``generate/prompts.txt``: a few hundred varied prompts), one per line."""
    text = (importlib.resources.files("permuquant_jax") / "generate" / "prompts.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line (blank lines and lines starting with ``#`` skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"prompts file {path}: no such file (expected a text file, one prompt per line)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"prompts file {path}: cannot read it as UTF-8 text ({e})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise PipelineError(f"prompts file {path}: holds no prompts (one prompt per line)")
    return prompts


def default_max_seq_len(config: FluxConfig | None) -> int:
    """BFL's T5 length: 512 for guidance-distilled models (dev), 256 otherwise (schnell); 512 if unknown."""
    return SCHNELL_MAX_SEQ_LEN if config is not None and not config.guidance_embed else DEV_MAX_SEQ_LEN


TRAINED_KEYS = ("image_size", "max_seq_len", "sample_steps", "cfg_scale")


def trained_defaults(path: str | Path | None) -> dict[str, Any]:
    """What a DiT trained by ``python -m permuquant_jax.train.tiny`` records about its training, read
    from the ``trained`` entry of its file's ``permuquant.flux_config`` metadata: ``image_size`` (px),
    ``max_seq_len`` (T5 tokens), ``sample_steps`` and ``cfg_scale`` (classifier-free guidance scale;
    present only when the DiT was trained with caption dropout). ``{}`` for other files (real FLUX
    checkpoints, diffusers folders) or ``None``."""
    if path is None or not Path(path).is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    from permuquant_jax.convert.checkpoint import CONFIG_METADATA_KEY

    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        trained = json.loads(meta.get(CONFIG_METADATA_KEY, "{}")).get("trained", {})
    except (OSError, ValueError, AttributeError, SafetensorError):  # not ours to judge: the loader's checks say why
        return {}
    return {k: trained[k] for k in TRAINED_KEYS if isinstance(trained, dict) and trained.get(k) is not None}


def calibration_prompts_path(path: str | Path | None) -> Path | None:
    """The calibration prompts of a DiT trained by ``python -m permuquant_jax.train.tiny`` (one that has
    :func:`trained_defaults`): captions of its training grammar, none of them a quality-table prompt
    (``train.data.calibration_captions``). The ``calibration_prompts.txt`` beside the DiT file, else the
    embedded pipeline's (the grammar is the same for every such DiT); None for other models."""
    if not trained_defaults(path):
        return None
    from permuquant_jax.assets.make_tiny_pipeline import CALIBRATION_FILE

    beside = Path(path).with_name(CALIBRATION_FILE)
    return beside if beside.is_file() else embedded_pipeline_dir() / CALIBRATION_FILE


# --------------------------------------------------------------------------- where the parts are


@dataclasses.dataclass
class PipelineSource:
    """Where each part of a pipeline is read from (``transformer`` None: text encoders only)."""

    transformer: Path | None
    ae: Path | None
    clip: Path
    t5: Path
    t5_tokenizer: Path
    clip_tokenizer: Path | None = None  # None: OpenAI's CLIP vocabulary shipped in the package
    quantized: Path | None = None
    scheduler_config: Path | None = None
    description: str = ""
    embedded: bool = False


def _need(path: Path, what: str, want: str = "any") -> Path:
    if not path.exists():
        raise PipelineError(f"{path}: no such file or directory ({what})")
    if want == "dir" and not path.is_dir():
        raise PipelineError(f"{path}: not a directory ({what})")
    if want == "file" and not path.is_file():
        raise PipelineError(f"{path}: not a file ({what})")
    return path


def _first(folder: Path, patterns: Sequence[str]) -> Path | None:
    for pat in patterns:
        found = sorted(folder.glob(pat))
        if found:
            return found[0]
    return None


def _tokenizers_in(folder: Path, *, required_t5: bool = True) -> tuple[Path | None, Path | None]:
    """(CLIP tokenizer folder or None, T5 tokenizer folder or None) found in ``folder``."""
    clip = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
    if (folder / "tokenizer_2").is_dir():
        t5 = folder / "tokenizer_2"
    elif (folder / "tokenizer.json").is_file():
        t5 = folder
    else:
        t5 = None
    if t5 is None and required_t5:
        raise PipelineError(
            f"{folder}: no T5 tokenizer: expected tokenizer_2/tokenizer.json (as in a diffusers FLUX pipeline "
            "folder) or tokenizer.json"
        )
    return clip, t5


def _check_tokenizer_dirs(clip: Path | None, t5: Path) -> None:
    if t5.is_dir() and not (t5 / "tokenizer.json").is_file():
        hint = " (it has spiece.model: write tokenizer.json with transformers' T5TokenizerFast.save_pretrained)" \
            if (t5 / "spiece.model").is_file() else ""
        raise PipelineError(f"{t5}: the T5 tokenizer folder has no tokenizer.json{hint}")
    if clip is not None and clip.is_dir() and not (
        (clip / "tokenizer.json").is_file() or ((clip / "vocab.json").is_file() and (clip / "merges.txt").is_file())
    ):
        raise PipelineError(f"{clip}: the CLIP tokenizer folder has neither tokenizer.json nor vocab.json + merges.txt")


def resolve_source(
    model: str | Path | None = None,
    *,
    ae: str | Path | None = None,
    clip: str | Path | None = None,
    t5: str | Path | None = None,
    tokenizers: str | Path | None = None,
    quantized: str | Path | None = None,
) -> PipelineSource:
    """Find every part: ``model`` a diffusers pipeline folder, a BFL transformer file (then ``ae``,
    ``clip`` and ``t5`` are required; tokenizers from ``tokenizers``, else beside ``t5``), or None
    (the embedded tiny pipeline). ``ae``/``clip``/``t5``/``tokenizers`` override a folder's parts;
    ``quantized`` replaces the DiT by a directory from ``python -m permuquant_jax.convert``.
    Only paths are checked here (no weights read)."""
    ae, clip, t5 = (Path(p) if p is not None else None for p in (ae, clip, t5))
    tok_dir = _need(Path(tokenizers), "--tokenizers", "dir") if tokenizers is not None else None
    qdir = _need(Path(quantized), "--quantized: a directory from python -m permuquant_jax.convert", "dir") \
        if quantized is not None else None
    embedded = model is None
    if embedded:
        model = embedded_pipeline_dir()
        from permuquant_jax.assets.make_tiny_pipeline import AE_FILE, CLIP_FILE, DIT_FILE, T5_FILE

        transformer = model / DIT_FILE if qdir is None else None
        ae, clip, t5 = ae or model / AE_FILE, clip or model / CLIP_FILE, t5 or model / T5_FILE
        clip_tok, t5_tok = _tokenizers_in(tok_dir or model)
        desc, sched = "the embedded tiny pipeline", None
    else:
        model = Path(model)
        _need(model, "--model: a diffusers FLUX pipeline folder or a BFL transformer .safetensors file")
        if model.is_dir():
            subs = {name: model / name for name in PIPELINE_PARTS}
            needed = [n for n in PIPELINE_PARTS if not (n == "transformer" and qdir is not None)]
            given = {"vae": ae, "text_encoder": clip, "text_encoder_2": t5}
            for name in needed:
                if name.startswith("tokenizer") and tok_dir is not None:
                    continue
                if given.get(name) is None and not subs[name].is_dir():
                    raise PipelineError(
                        f"{model}: missing {name}/ ({PIPELINE_PARTS[name]}); a diffusers FLUX pipeline folder has "
                        + ", ".join(f"{n}/" for n in PIPELINE_PARTS)
                    )
            transformer = subs["transformer"] if qdir is None else None
            ae, clip, t5 = ae or subs["vae"], clip or subs["text_encoder"], t5 or subs["text_encoder_2"]
            clip_tok, t5_tok = _tokenizers_in(tok_dir) if tok_dir is not None else (subs["tokenizer"],
                                                                                    subs["tokenizer_2"])
            sched = model / "scheduler" / "scheduler_config.json"
            sched = sched if sched.is_file() else None
            desc = str(model)
        else:
            transformer = model
            for flag, value in (("--ae", ae), ("--clip", clip), ("--t5", t5)):
                if value is None:
                    raise PipelineError(
                        f"{flag} is required with a BFL transformer file ({model.name}): pass "
                        + {"--ae": "ae.safetensors", "--clip": "clip_l.safetensors",
                           "--t5": "t5xxl_fp16.safetensors (or a text_encoder_2/ folder)"}[flag]
                    )
            if tok_dir is not None:
                clip_tok, t5_tok = _tokenizers_in(tok_dir)
            else:
                clip_tok, t5_tok = _tokenizers_in(t5.parent if t5.is_file() else t5.parent, required_t5=False)
                if t5_tok is None:
                    raise PipelineError(
                        f"--tokenizers DIR is required with BFL files: a folder with tokenizer_2/tokenizer.json "
                        f"(the T5 tokenizer; e.g. a FLUX.1 diffusers folder); none beside {t5}"
                    )
            desc, sched = str(model), None
    for path, what in ((ae, "the autoencoder"), (clip, "the CLIP text encoder"), (t5, "the T5 text encoder")):
        _need(path, what)
    _need(t5_tok, "the T5 tokenizer")
    if clip_tok is not None:
        _need(clip_tok, "the CLIP tokenizer")
    _check_tokenizer_dirs(clip_tok, t5_tok)
    if transformer is not None:
        _need(transformer, "the FLUX transformer")
    if qdir is not None:
        desc += f" with the quantized DiT {qdir}"
    return PipelineSource(transformer=transformer, ae=ae, clip=clip, t5=t5, t5_tokenizer=t5_tok,
                          clip_tokenizer=clip_tok, quantized=qdir, scheduler_config=sched, description=desc,
                          embedded=embedded)


def resolve_text_encoders(path: str | Path | None) -> PipelineSource:
    """Text encoders + tokenizers only: a diffusers pipeline folder (``text_encoder/``, ``text_encoder_2/``,
    ``tokenizer/``, ``tokenizer_2/``), a folder of single files (``clip_l*.safetensors``,
    ``t5xxl*.safetensors``, ``tokenizer_2/``; the CLIP tokenizer defaults to the shipped vocabulary),
    or None (the embedded tiny pipeline)."""
    if path is None:
        s = resolve_source(None)
        return dataclasses.replace(s, transformer=None, ae=None)
    path = _need(Path(path), "text encoders: a FLUX pipeline folder or a folder with clip_l and t5xxl files", "dir")
    if (path / "text_encoder").is_dir() or (path / "text_encoder_2").is_dir():
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if not (path / name).is_dir():
                raise PipelineError(f"{path}: missing {name}/ ({PIPELINE_PARTS[name]}); text encoders need "
                                    "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
        clip, t5, clip_tok, t5_tok = (path / n for n in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    else:
        clip = _first(path, ("clip_l*.safetensors", "*clip*.safetensors"))
        t5 = _first(path, ("t5xxl*.safetensors", "*t5*.safetensors"))
        if clip is None or t5 is None:
            raise PipelineError(
                f"{path}: no text encoders: expected text_encoder/ + text_encoder_2/ (a diffusers FLUX pipeline) or "
                "clip_l*.safetensors + t5xxl*.safetensors with tokenizer_2/tokenizer.json"
            )
        clip_tok, t5_tok = _tokenizers_in(path)
    _check_tokenizer_dirs(clip_tok, t5_tok)
    return PipelineSource(transformer=None, ae=None, clip=clip, t5=t5, t5_tokenizer=t5_tok, clip_tokenizer=clip_tok,
                          description=str(path))


def schedule_options(scheduler_config: Path | None, config: FluxConfig | None) -> dict[str, Any]:
    """``get_schedule`` options: from a diffusers ``scheduler_config.json`` when there is one (dynamic
    shifting -> BFL's shifted schedule with its base/max shift), else BFL's rule (shifted for
    guidance-distilled models, plain for schnell)."""
    if scheduler_config is None:
        return dict(shift=config is None or bool(config.guidance_embed))
    try:
        c = json.loads(scheduler_config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{scheduler_config}: not a readable JSON file ({e})") from None
    if c.get("use_dynamic_shifting"):
        seq = (c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096))
        if tuple(seq) != (256, 4096):
            raise PipelineError(f"{scheduler_config}: base/max_image_seq_len {list(seq)} differ from FLUX's "
                                "[256, 4096]; only FLUX's schedule is implemented")
        return dict(shift=True, base_shift=float(c.get("base_shift", 0.5)), max_shift=float(c.get("max_shift", 1.15)))
    if float(c.get("shift", 1.0)) != 1.0:
        raise PipelineError(f"{scheduler_config}: a static shift {c['shift']} is not FLUX's schedule (dynamic "
                            "shifting for dev, none for schnell)")
    return dict(shift=False)


# --------------------------------------------------------------------------- jitted pieces


@frozen_jit  # the encoders, the AE and the DiT are only read: no copy of their weights per call
def _t5_forward(model: nnx.Module, ids: jax.Array) -> jax.Array:
    return model(ids).astype(jnp.float32)


@frozen_jit
def _clip_pooled(model: nnx.Module, ids: jax.Array) -> jax.Array:
    return model(ids)[1].astype(jnp.float32)


@frozen_jit
def _ae_decode(model: nnx.Module, z: jax.Array) -> jax.Array:
    return jnp.clip(model.decode(z).astype(jnp.float32), -1.0, 1.0)


@frozen_jit(static_argnames=("tile",))
def _ae_decode_tiled(model: nnx.Module, z: jax.Array, tile: int) -> jax.Array:
    return jnp.clip(model.decode_tiled(z, tile=tile).astype(jnp.float32), -1.0, 1.0)


@frozen_jit
def _denoise_cfg_loop(dit, img, img_ids, txt, txt_ids, y, txt_u, y_u, t_curr, dt, scale):
    """Euler steps with classifier-free guidance: the conditional and unconditional velocities in one
    DiT call on the doubled batch, ``v = v_u + scale * (v_c - v_u)``."""
    b = img.shape[0]
    ids2, txt_ids2 = jnp.concatenate([img_ids, img_ids]), jnp.concatenate([txt_ids, txt_ids])
    txt2, y2 = jnp.concatenate([txt, txt_u]), jnp.concatenate([y, y_u])

    def step(i, x):
        t = jnp.full((2 * b,), t_curr[i], jnp.float32)
        pred = dit(jnp.concatenate([x, x]), ids2, txt2, txt_ids2, t, y2, None).astype(jnp.float32)
        return x + dt[i] * (pred[b:] + scale * (pred[:b] - pred[b:]))

    return jax.lax.fori_loop(0, t_curr.shape[0], step, img)


def delete_device_arrays(module: nnx.Module) -> int:
    """Free the device buffers of every array in ``module`` now (the module is unusable after); returns bytes."""
    freed = 0
    for leaf in jax.tree.leaves(nnx.state(module)):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            freed += leaf.nbytes
            leaf.delete()
    return freed


def peak_device_memory() -> int | None:
    """Peak bytes in use on the first device, where the backend reports it (GPUs; None on the CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise various errors
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
    """Images in [-1, 1] -> uint8 pixels (rounded to nearest)."""
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


def _width(module: Any, *names: str) -> int | None:
    cfg = getattr(module, "config", None)
    for n in names:
        if cfg is not None and getattr(cfg, n, None) is not None:
            return int(getattr(cfg, n))
    return None


# --------------------------------------------------------------------------- the pipeline

Part = Any  # an nnx.Module, or a zero-argument callable that loads it


@dataclasses.dataclass
class GenerationStats:
    """Wall times since the pipeline was made (seconds; denoise per batch, the first includes compilation)."""

    encode_s: float = 0.0
    denoise_s: list[float] = dataclasses.field(default_factory=list)
    decode_s: float = 0.0
    load_s: float = 0.0
    steps: int = 0
    images: int = 0
    released_bytes: int = 0

    def per_step(self) -> tuple[float, float | None]:
        """(seconds per step of the first batch, mean seconds per step of the later batches or None)."""
        if not self.denoise_s or not self.steps:
            return float("nan"), None
        later = self.denoise_s[1:]
        return self.denoise_s[0] / self.steps, (sum(later) / len(later) / self.steps if later else None)


class FluxPipeline:
    """FLUX.1 text to image: ``encode_prompts`` (T5 + CLIP, jitted), ``sample`` (the whole Euler loop in
    one jit), ``decode`` (the autoencoder), ``generate`` (all three, batched, seeded).

    ``dit``, ``t5``, ``clip``, ``ae``: modules, or zero-argument loaders called on first use (so the text
    encoders can be released before the DiT is loaded). ``dit_config``: the DiT's config when ``dit`` is
    a loader (read from a header; used to check the encoders' widths and pick defaults). ``trained``:
    :func:`trained_defaults` of the DiT (image size, T5 length, steps and classifier-free guidance scale
    it was trained for), the defaults where the caller gives none.

    Guidance: a guidance-distilled DiT (FLUX.1-dev) gets ``guidance`` through its guidance embedder; a
    DiT trained with caption dropout (``trained["cfg_scale"]``, the tiny embedded one) gets true
    classifier-free guidance with ``guidance`` as the scale (two DiT passes a step, cond and empty
    prompt, in one call; 1.0 is the plain conditional model); other DiTs ignore it (schnell).
    """

    def __init__(
        self,
        *,
        dit: Part | None,
        t5: Part,
        clip: Part,
        ae: Part | None,
        t5_tokenizer: Any,
        clip_tokenizer: Any,
        dit_config: FluxConfig | None = None,
        schedule: dict[str, Any] | None = None,
        description: str = "",
        trained: dict[str, Any] | None = None,
    ):
        self._parts: dict[str, Any] = {"dit": dit, "t5": t5, "clip": clip, "ae": ae}
        self._loaded: dict[str, nnx.Module | None] = {
            k: (v if isinstance(v, nnx.Module) else None) for k, v in self._parts.items()
        }
        self.dit_config = dit_config or (dit.config if isinstance(dit, nnx.Module) else None)
        self.t5_tokenizer = t5_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.schedule = schedule if schedule is not None else schedule_options(None, self.dit_config)
        self.description = description
        self.trained = dict(trained or {})
        self.stats = GenerationStats()
        self._uncond: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        ae: str | Path | None = None,
        clip: str | Path | None = None,
        t5: str | Path | None = None,
        tokenizers: str | Path | None = None,
        quantized: str | Path | None = None,
        dtype: Any = jnp.bfloat16,
        max_seq_len: int | None = None,
        backend: str = "auto",
        progress: bool = False,
    ) -> FluxPipeline:
        """A pipeline from files (see :func:`resolve_source`); weights are read on first use."""
        return cls.from_source(resolve_source(model, ae=ae, clip=clip, t5=t5, tokenizers=tokenizers,
                                              quantized=quantized),
                               dtype=dtype, max_seq_len=max_seq_len, backend=backend, progress=progress)

    @classmethod
    def from_source(cls, source: PipelineSource, *, dtype: Any = jnp.bfloat16, max_seq_len: int | None = None,
                    backend: str = "auto", progress: bool = False) -> FluxPipeline:
        """A pipeline from a resolved :class:`PipelineSource`; only headers and tokenizers are read now."""
        from permuquant_jax.convert.ae import load_autoencoder
        from permuquant_jax.convert.checkpoint import load_flux, read_flux_config
        from permuquant_jax.convert.encoders import load_clip, load_t5
        from permuquant_jax.generate.tokenizers import load_clip_tokenizer, load_t5_tokenizer

        if source.quantized is not None:
            from permuquant_jax.convert.saved import load_metadata

            meta = load_metadata(source.quantized)
            # convert keeps no training record: an embedded source's comes from the embedded DiT file
            trained = trained_defaults(embedded_transformer_path()) if source.embedded else {}
            try:
                dit_config = FluxConfig(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in meta["config"].items()})
            except (TypeError, ValueError) as e:
                raise PipelineError(f"{source.quantized}: invalid config in its metadata ({e})") from None

            def dit():
                import permuquant_jax

                return permuquant_jax.load(source.quantized, backend=backend)
        elif source.transformer is not None:
            dit_config = read_flux_config(source.transformer)
            trained = trained_defaults(source.transformer)

            def dit():
                return load_flux(source.transformer, dtype=dtype, progress=progress)
        else:
            dit, dit_config = None, None
            trained = trained_defaults(embedded_transformer_path()) if source.embedded else {}
        if max_seq_len is None:
            max_seq_len = int(trained.get("max_seq_len") or default_max_seq_len(dit_config))
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise PipelineError(f"max_seq_len must be an integer >= 2, found {max_seq_len!r}")
        return cls(
            dit=dit,
            t5=lambda: load_t5(source.t5, dtype=dtype, progress=progress),
            clip=lambda: load_clip(source.clip, dtype=dtype, progress=progress),
            ae=(lambda: load_autoencoder(source.ae, dtype=dtype, progress=progress)) if source.ae else None,
            t5_tokenizer=load_t5_tokenizer(source.t5_tokenizer, max_seq_len),
            clip_tokenizer=load_clip_tokenizer(source.clip_tokenizer),
            dit_config=dit_config,
            schedule=schedule_options(source.scheduler_config, dit_config),
            description=source.description,
            trained=trained,
        )

    @classmethod
    def embedded(cls, *, dtype: Any = jnp.float32, max_seq_len: int | None = None) -> FluxPipeline:
        """The tiny pipeline shipped in the package (trained on captioned shape scenes; a few MB)."""
        return cls.from_pretrained(None, dtype=dtype, max_seq_len=max_seq_len)

    # ------------------------------------------------------------------ parts

    @property
    def max_seq_len(self) -> int:
        """The T5 sequence length (the padded prompt length the DiT sees)."""
        return int(self.t5_tokenizer.max_length)

    def _part(self, name: str) -> nnx.Module:
        m = self._loaded[name]
        if m is not None:
            return m
        loader = self._parts[name]
        if loader is None or isinstance(loader, nnx.Module):
            what = {"dit": "DiT", "t5": "T5 encoder", "clip": "CLIP encoder", "ae": "autoencoder"}[name]
            raise PipelineError(f"this pipeline has no {what}" + (" (released and not reloadable: it was passed "
                                                                   "as a module)" if loader is not None else ""))
        t0 = time.perf_counter()
        m = loader()
        self.stats.load_s += time.perf_counter() - t0
        self._check_width(name, m)
        self._loaded[name] = m
        if name == "dit" and self.dit_config is None:
            self.dit_config = m.config
        return m

    def _check_width(self, name: str, module: nnx.Module) -> None:
        cfg = self.dit_config
        if cfg is None or name not in ("t5", "clip"):
            return
        if name == "t5":
            found, want, what = _width(module, "d_model"), cfg.context_in_dim, "context_in_dim (T5 width)"
        else:
            found, want, what = _width(module, "hidden", "hidden_size"), cfg.vec_in_dim, "vec_in_dim (CLIP width)"
        if found is not None and found != want:
            label = {"t5": "T5 text encoder", "clip": "CLIP text encoder"}[name]
            raise PipelineError(
                f"the {label} has width {found} but the transformer's {what} is {want}: the encoder does not "
                f"belong to this model ({self.description or 'pipeline'})"
            )

    @property
    def dit(self) -> nnx.Module:
        return self._part("dit")

    @property
    def t5(self) -> nnx.Module:
        return self._part("t5")

    @property
    def clip(self) -> nnx.Module:
        return self._part("clip")

    @property
    def ae(self) -> nnx.Module:
        return self._part("ae")

    def load_text_encoders(self) -> None:
        """Load both text encoders now (and check their widths against the DiT)."""
        self._part("clip")
        self._part("t5")

    def release_text_encoders(self) -> int:
        """Free the text encoders' device memory now; they are reloaded from their files if needed
        again. Returns the bytes released."""
        freed = 0
        for name in ("t5", "clip"):
            m = self._loaded[name]
            if m is not None:
                freed += delete_device_arrays(m)
                self._loaded[name] = None
                if isinstance(self._parts[name], nnx.Module):
                    self._parts[name] = None
        self.stats.released_bytes += freed
        return freed

    # ------------------------------------------------------------------ stages

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Prompts -> (txt [B, max_seq_len, T5 width] float32, txt_ids [B, max_seq_len, 3], y [B, CLIP width])."""
        from permuquant_jax.models.sampling import prepare_txt_ids

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PipelineError("encode_prompts: no prompts")
        t0 = time.perf_counter()
        t5_ids = jnp.asarray(self.t5_tokenizer(prompts))
        clip_ids = jnp.asarray(self.clip_tokenizer(prompts))
        y = _clip_pooled(self.clip, clip_ids)
        txt = _t5_forward(self.t5, t5_ids)
        txt.block_until_ready()
        self.stats.encode_s += time.perf_counter() - t0
        return txt, prepare_txt_ids(len(prompts), txt.shape[1]), y

    def noise(self, seeds: Sequence[int], height: int, width: int) -> jax.Array:
        """Initial latents NHWC float32 ``[len(seeds), height/8, width/8, 16]``, one seed per image."""
        from permuquant_jax.models.sampling import get_noise

        self.check_size(height, width)
        return jnp.concatenate([get_noise(int(s), 1, height, width) for s in seeds], axis=0)

    def check_size(self, height: int, width: int) -> None:
        """Images must be positive multiples of 16 pixels (8x autoencoder, 2x2 packed latents), at most
        ``MAX_SIDE`` a side."""
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int | np.integer) or v < 16 or v % 16:
                raise PipelineError(f"{name} must be a positive multiple of 16, found {v}")
            if v > MAX_SIDE:
                raise PipelineError(f"{name} {v} exceeds {MAX_SIDE} pixels (FLUX.1 is used up to about 2 MP): "
                                    "pass a smaller size")

    def attention_bytes(self, height: int, width: int, batch: int = 1, guidance: float | None = None) -> int:
        """Bytes of one attention layer's fp32 score matrix at this size: what XLA's unfused attention (the
        CPU's) holds at once; cuDNN's fused attention on a GPU does not materialize it."""
        tokens = (height // 16) * (width // 16) + self.max_seq_len
        rows = batch * (2 if self.uses_cfg(guidance) else 1)
        heads = self.dit_config.num_heads if self.dit_config is not None else FluxConfig().num_heads
        return rows * heads * tokens * tokens * 4

    def check_memory(self, height: int, width: int, batch: int = 1, guidance: float | None = None) -> None:
        """On the CPU, refuse sizes whose attention scores alone would not fit in this machine's memory
        (the process would be killed mid-run instead)."""
        if jax.default_backend() != "cpu":
            return
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        need = 2 * self.attention_bytes(height, width, batch, guidance)  # scores and their softmax
        if need > total:
            raise PipelineError(
                f"{height}x{width} at batch {batch} needs about {need / 2**30:.0f} GiB for attention on the CPU, "
                f"more than this machine's {total / 2**30:.0f} GiB: pass a smaller --height/--width or --batch, "
                "or run on a GPU")

    def sample(self, txt: jax.Array, txt_ids: jax.Array, y: jax.Array, noise: jax.Array, *, steps: int,
               guidance: float | None = None) -> jax.Array:
        """The Euler flow-matching loop from ``noise`` (NHWC latents) -> packed latents ``[B, seq, 64]`` float32.

        ``guidance`` None: :meth:`default_guidance`. With classifier-free guidance (see the class) the
        empty prompt's embeddings are encoded once and kept."""
        from permuquant_jax.models.sampling import denoise, get_schedule, pack_latents, prepare_img_ids

        if steps < 1:
            raise PipelineError(f"steps must be >= 1, found {steps}")
        guidance = self.default_guidance() if guidance is None else float(guidance)
        dit = self.dit
        b, h, w = noise.shape[0], noise.shape[1], noise.shape[2]
        img = pack_latents(jnp.asarray(noise, jnp.float32))
        img_ids = prepare_img_ids(b, h, w)
        timesteps = get_schedule(steps, img.shape[1], **self.schedule)
        t0 = time.perf_counter()
        if self.uses_cfg(guidance):
            txt_u, y_u = self.unconditional(b)
            if txt_u.shape[1:] != tuple(txt.shape[1:]):
                raise PipelineError(f"classifier-free guidance: the empty prompt's embeddings {txt_u.shape[1:]} "
                                    f"differ from the prompts' {tuple(txt.shape[1:])}")
            sched = np.asarray(timesteps, np.float64)
            out = _denoise_cfg_loop(
                dit, img, img_ids, jnp.asarray(txt), jnp.asarray(txt_ids), jnp.asarray(y),
                jnp.broadcast_to(jnp.asarray(txt_u), tuple(txt.shape)),
                jnp.broadcast_to(jnp.asarray(y_u), tuple(y.shape)),
                jax.device_put(sched[:-1].astype(np.float32)), jax.device_put(np.diff(sched).astype(np.float32)),
                jnp.float32(guidance))
        else:
            g = jnp.full((b,), guidance, jnp.float32) if dit.config.guidance_embed else None
            out = denoise(dit, img, img_ids, txt, txt_ids, y, timesteps, guidance=g)
        out.block_until_ready()
        self.stats.denoise_s.append(time.perf_counter() - t0)
        self.stats.steps = steps
        return out

    def uses_cfg(self, guidance: float | None = None) -> bool:
        """Whether sampling at ``guidance`` (None: the default) runs true classifier-free guidance."""
        guidance = self.default_guidance() if guidance is None else guidance
        return "cfg_scale" in self.trained and not (self.dit_config is not None and self.dit_config.guidance_embed) \
            and guidance != 1.0

    def unconditional(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt's (txt ``[1, max_seq_len, T5 width]``, y ``[1, CLIP width]``), encoded once
        (in a batch of ``batch``: the prompts' batch shape, so the encoders need no second compile)."""
        if self._uncond is None:
            txt, _, y = self.encode_prompts([""] * batch)
            self._uncond = (np.asarray(txt)[:1], np.asarray(y)[:1])
        return self._uncond

    def decode(self, latents: jax.Array, height: int, width: int, *, tile: int | None = None) -> jax.Array:
        """Packed latents -> images NHWC float32 in [-1, 1]; ``tile`` (latents) decodes tile by tile."""
        from permuquant_jax.models.sampling import unpack_latents

        t0 = time.perf_counter()
        z = unpack_latents(latents, height, width)
        x = _ae_decode(self.ae, z) if not tile else _ae_decode_tiled(self.ae, z, tile)
        x.block_until_ready()
        self.stats.decode_s += time.perf_counter() - t0
        return x

    # ------------------------------------------------------------------ all together

    def iter_images(
        self,
        prompts: Sequence[str],
        *,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        batch: int = 1,
        release_text_encoders: bool = False,
        tile: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, str, int, np.ndarray]]:
        """Yield ``(index, prompt, seed, uint8 image [H, W, 3])`` batch by batch.

        Batches are padded to ``batch`` prompts (one compile per shape). With ``release_text_encoders``
        every prompt is encoded first, the encoders are freed, and only then is the DiT loaded.
        ``height``/``width``/``steps``/``guidance`` None: :meth:`default_size`, :meth:`default_steps`,
        :meth:`default_guidance`.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise PipelineError("no prompts")
        if batch < 1:
            raise PipelineError(f"batch must be >= 1, found {batch}")
        height, width = height or self.default_size(), width or self.default_size()
        self.check_size(height, width)
        steps = steps or self.default_steps()
        guidance = self.default_guidance() if guidance is None else guidance
        self.check_memory(height, width, batch, guidance)
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

        def encode(chunk: list[str]):
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            return self.encode_prompts(padded)

        encoded = None
        if release_text_encoders:
            encoded = [tuple(np.asarray(a) for a in encode(c)) for c in chunks]
            if self.uses_cfg(guidance):
                self.unconditional(batch)
            self.release_text_encoders()
        index = 0
        for k, chunk in enumerate(chunks):
            txt, txt_ids, y = encoded[k] if encoded is not None else encode(chunk)
            seeds = [seed + index + j for j in range(batch)]
            x = self.sample(jnp.asarray(txt), jnp.asarray(txt_ids), jnp.asarray(y), self.noise(seeds, height, width),
                            steps=steps, guidance=guidance)
            images = to_uint8(self.decode(x, height, width, tile=tile))
            for j, prompt in enumerate(chunk):
                yield index, prompt, seeds[j], images[j]
                index += 1
            self.stats.images += len(chunk)
            if on_batch is not None:
                on_batch(len(chunk))

    def generate(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int = 0, batch: int = 1,
                 release_text_encoders: bool = False, tile: int | None = None) -> np.ndarray:
        """Images for ``prompts``: uint8 ``[len(prompts), height, width, 3]`` (image i from seed ``seed + i``)."""
        out = [img for _, _, _, img in self.iter_images(
            prompts, height=height, width=width, steps=steps, guidance=guidance, seed=seed, batch=batch,
            release_text_encoders=release_text_encoders, tile=tile)]
        return np.stack(out)

    def default_steps(self) -> int:
        """The steps the DiT was trained for (``trained``), else 28 for guidance-distilled models (dev),
        4 otherwise (schnell)."""
        if self.trained.get("sample_steps"):
            return int(self.trained["sample_steps"])
        cfg = self.dit_config
        return 28 if cfg is None or cfg.guidance_embed else 4

    def default_size(self) -> int:
        """Image side in pixels: the one the DiT was trained at (``trained``), else 1024 (FLUX.1)."""
        return int(self.trained.get("image_size") or 1024)

    def default_guidance(self) -> float:
        """The classifier-free guidance scale the DiT was trained for (``trained``), else FLUX.1-dev's 3.5."""
        return float(self.trained.get("cfg_scale", 3.5))


# --------------------------------------------------------------------------- calibration text


def calibration_text(
    pipeline_or_path: FluxPipeline | str | Path | None,
    prompts: Sequence[str] | None = None,
    max_seq_len: int | None = None,
    *,
    batch_size: int = 8,
    dtype: Any = jnp.bfloat16,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """T5/CLIP embeddings of ``prompts`` (default: the built-in prompt set) for ``convert``'s calibration:
    ``(txt float32 [N, max_seq_len, T5 width], y float32 [N, CLIP width])``, the arrays ``--calib`` reads.

    ``pipeline_or_path``: a :class:`FluxPipeline` (its encoders stay loaded), a diffusers pipeline
    folder or a folder of single files (see :func:`resolve_text_encoders`; the encoders are loaded in
    ``dtype`` and released at the end), or None (the embedded tiny pipeline). ``max_seq_len`` None:
    the pipeline's, else 512 (pass 256 for FLUX.1-schnell).
    """
    prompts = builtin_prompts() if prompts is None else list(prompts)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise PipelineError("calibration_text: prompts must be a non-empty sequence of strings")
    if batch_size < 1:
        raise PipelineError(f"calibration_text: batch_size must be >= 1, found {batch_size}")
    owned = not isinstance(pipeline_or_path, FluxPipeline)
    if owned:
        source = resolve_text_encoders(pipeline_or_path)
        pipe = FluxPipeline.from_source(source, dtype=dtype, max_seq_len=max_seq_len or DEV_MAX_SEQ_LEN,
                                        progress=progress)
    else:
        pipe = pipeline_or_path
        if max_seq_len is not None and max_seq_len != pipe.max_seq_len:
            raise PipelineError(f"calibration_text: max_seq_len {max_seq_len} differs from the pipeline's "
                                f"{pipe.max_seq_len}; build the pipeline with max_seq_len={max_seq_len}")
    txts, ys = [], []
    try:
        from tqdm.auto import tqdm

        for i in tqdm(range(0, len(prompts), batch_size), desc="encoding prompts", disable=not progress, leave=False):
            chunk = prompts[i : i + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            txt, _, y = pipe.encode_prompts(padded)
            txts.append(np.asarray(txt)[: len(chunk)])
            ys.append(np.asarray(y)[: len(chunk)])
    finally:
        if owned:
            pipe.release_text_encoders()
    return np.concatenate(txts).astype(np.float32), np.concatenate(ys).astype(np.float32)


def save_calibration_npz(path: str | Path, txt: np.ndarray, y: np.ndarray, prompts: Sequence[str], *,
                         half: bool = False, overwrite: bool = False) -> Path:
    """Write ``txt``/``y`` (+ the ``prompts``) as the .npz ``convert --calib`` reads, atomically.

    ``half``: store ``txt`` as float16 (half the size; lossless for bf16 encoder outputs in float16's
    range, which is checked: any overflow keeps float32). ``convert`` reads it back as float32.
    """
    import os
    import tempfile

    from permuquant_jax.convert.atomic import OutputError

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path.parent}: the directory of the .npz is missing or not writable")
    store = txt.astype(np.float32)
    if half:
        t16 = store.astype(np.float16)
        store = t16 if np.all(np.isfinite(t16)) else store
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, txt=store, y=y.astype(np.float32), prompts=np.asarray(list(prompts), dtype=str))
        mask = os.umask(0o22)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
