"""Save and load quantized FLUX models: an orbax-checkpoint directory plus `permuquant.json`.

Layout of a saved model directory::

    DST/
      params/            orbax-checkpoint (StandardCheckpointer) of a flat {name: array} dict:
                         every non-empty variable of the quantized FluxDiT, named by its module path
                         joined with '.', e.g. 'double_blocks.img_attn.qkv.w_codes'
      permuquant.json    metadata: format version, library and JAX versions, FluxConfig, format,
                         method and its settings, the quantized layers (how to rebuild them), the
                         manifest of tensors (shape, dtype) and a SHA-256 of their bytes, the source
                         checkpoint and its hash, and `fields_sha256`: a SHA-256 of every other field
                         (of each entry of the fields that are objects), so an edit is named on load
      report.json        the PermuQuant report (per site: candidates, errors, choice)
      report.md          the same, for people

`load(DST)` rebuilds the module structure from the metadata without allocating float weights
(`nnx.eval_shape`), checks the hash of every metadata field before using it, restores the arrays and
checks their hash, so a corrupted, edited or mismatched directory fails with a `SavedModelError` naming
what changed instead of computing something else. All JSON is strict (no NaN / Infinity).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import permuquant_jax
from permuquant_jax.models.flux import FluxConfig, FluxDiT, abstract_flux
from permuquant_jax.quant.linear import QuantLinear

FORMAT_VERSION = 2  # 2: fields_sha256 covers the metadata, strict JSON
METADATA_FILE = "permuquant.json"
PARAMS_DIR = "params"


class SavedModelError(ValueError):
    """A saved quantized model directory is missing, corrupted or does not match this library."""


# ----------------------------------------------------------------------------- structure


def _stack_of(q: QuantLinear) -> tuple[int, ...]:
    if q.format is None:
        return tuple(q.kernel.get_value().shape[:-2])
    if hasattr(q, "w_global"):
        return tuple(q.w_global.get_value().shape)
    return tuple(q.w_values.get_value().shape[:-2])


def _param_dtype(q: QuantLinear) -> str:
    for name in ("kernel", "w_values", "bias"):
        v = getattr(q, name, None)
        if v is not None:
            return str(jnp.dtype(v.get_value().dtype))
    return "float32"


def quant_layer_specs(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """Constructor arguments of every `QuantLinear` in `model`, keyed by module path."""
    specs = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            specs[".".join(map(str, path))] = dict(
                in_features=node.in_features,
                out_features=node.out_features,
                format=node.format,
                stack=list(_stack_of(node)),
                use_bias=node.bias is not None,
                hadamard_block=node.hadamard_block,
                param_dtype=_param_dtype(node),
            )
    return specs


def _flat_arrays(model: nnx.Module) -> dict[str, jax.Array]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if value is None:
            continue
        out[".".join(map(str, path))] = value
    return out


def _tensor_hash(arrays: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _sha(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


DIGEST_FIELD = "fields_sha256"


def field_digests(meta: dict[str, Any]) -> dict[str, Any]:
    """SHA-256 of every metadata field but `fields_sha256` itself; a field that is a JSON object gets
    one per entry (so a mismatch names e.g. `config.theta`), under the key `{field: {entry: sha}}`."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k == DIGEST_FIELD:
            continue
        out[k] = {sub: _sha(x) for sub, x in v.items()} if isinstance(v, dict) else _sha(v)
    return out


def _first_mismatch(recorded: Any, actual: dict[str, Any]) -> str | None:
    """The name of the first field (or `field.entry`) whose digest differs, was added or removed."""
    if not isinstance(recorded, dict):
        return DIGEST_FIELD
    for k in sorted(set(recorded) | set(actual)):
        r, a = recorded.get(k), actual.get(k)
        if r is None or a is None:
            return k
        if isinstance(a, dict) or isinstance(r, dict):
            if not (isinstance(a, dict) and isinstance(r, dict)):
                return k
            for sub in sorted(set(r) | set(a)):
                if r.get(sub) != a.get(sub):
                    return f"{k}.{sub}"
        elif r != a:
            return k
    return None


def strict_json(value: Any, *, indent: int | None = 1, what: str = "metadata") -> str:
    """JSON text of `value` with no NaN / Infinity (a ValueError names the first offending field)."""
    try:
        return json.dumps(value, indent=indent, sort_keys=True, allow_nan=False, default=_json_default)
    except ValueError:
        bad = "?"
        if isinstance(value, dict):
            for k, v in value.items():
                try:
                    json.dumps(v, allow_nan=False, default=_json_default)
                except ValueError:
                    bad = k
                    break
        raise ValueError(f"{what}: field {bad!r} holds NaN or Infinity, which strict JSON cannot hold") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _resolve(model: nnx.Module, dotted: str) -> tuple[Any, str]:
    """(parent object, attribute name) of a dotted module path."""
    parts = dotted.split(".")
    node: Any = model
    for p in parts[:-1]:
        node = getattr(node, p)
    return node, parts[-1]


def files_sha256(files: Sequence[str | os.PathLike], *, root: str | os.PathLike, progress: bool = False) -> str:
    """SHA-256 over `files` (each prefixed by its path relative to `root`), in sorted order."""
    from tqdm.auto import tqdm

    root = Path(root)
    files = sorted({Path(f) for f in files})
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing source",
              disable=not progress or total < (1 << 28)) as bar:
        for f in files:
            h.update(str(f.relative_to(root) if f != root else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
                    bar.update(len(chunk))
    return h.hexdigest()


# ----------------------------------------------------------------------------- save


def save_quantized(
    model: FluxDiT,
    directory: str | os.PathLike,
    *,
    metadata: dict[str, Any],
    report: Any | None = None,
) -> dict[str, Any]:
    """Write `model` into the (empty or new) `directory`; returns the metadata written.

    Use inside `atomic_output_dir` so a failure leaves nothing behind. `metadata` holds the
    conversion settings (format, method, ...) and is completed with versions, config, layer specs,
    the tensor manifest and its hash.
    """
    import orbax.checkpoint as ocp

    from permuquant_jax.quant.linear import drop_device_layouts

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    drop_device_layouts(model)  # a kernel's device layout is not the saved format: canonical scales back (lossless)
    arrays = _flat_arrays(model)
    meta = dict(metadata)
    meta.update(
        format_version=FORMAT_VERSION,
        library_version=permuquant_jax.__version__,
        jax_version=jax.__version__,
        config=model.config.to_dict(),
        dtype=str(jnp.dtype(model.dtype)),
        quant_layers=quant_layer_specs(model),
        tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(arrays.items())},
        tensors_sha256=_tensor_hash(arrays),
    )
    meta.pop(DIGEST_FIELD, None)
    meta = json.loads(strict_json(meta, what=METADATA_FILE))  # the values exactly as a reader will see them
    meta[DIGEST_FIELD] = field_digests(meta)
    report_text = None
    if report is not None:  # strict JSON too: a NaN error is a failed run, not a number to write
        report_text = strict_json(json.loads(report.to_json()), what="report.json")
    # Synchronous: when save() returns no background thread is still writing into `directory`.
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        ckptr.save((directory / PARAMS_DIR).absolute(), args=ocp.args.StandardSave(arrays))
    finally:
        ckptr.close()
    (directory / METADATA_FILE).write_text(strict_json(meta))
    if report is not None:
        (directory / "report.json").write_text(report_text)
        (directory / "report.md").write_text(report.to_markdown())
    return meta


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray | jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} to permuquant.json")


# ----------------------------------------------------------------------------- load


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check `permuquant.json` of a saved model directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SavedModelError(f"{directory} is not a directory written by `python -m permuquant_jax.convert`")
    meta_file = directory / METADATA_FILE
    if not meta_file.is_file():
        raise SavedModelError(f"{directory} has no {METADATA_FILE}: not a permuquant-jax model directory")
    try:
        meta = json.loads(meta_file.read_text(), parse_constant=_reject_constant)
    except OSError as e:
        raise SavedModelError(f"{meta_file}: cannot read the file ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise SavedModelError(f"{meta_file} is corrupted (not valid JSON: {e})") from None
    if not isinstance(meta, dict):
        raise SavedModelError(f"{meta_file} is corrupted (a JSON {type(meta).__name__}, expected an object)")
    if "format_version" not in meta:
        raise SavedModelError(f"{meta_file} lacks the key 'format_version': corrupted or not written by permuquant-jax")
    if meta["format_version"] != FORMAT_VERSION:
        raise SavedModelError(
            f"{meta_file} has format_version {meta['format_version']}, this permuquant-jax "
            f"{permuquant_jax.__version__} reads version {FORMAT_VERSION}: convert the model again"
        )
    if _version_tuple(meta["library_version"]) > _version_tuple(permuquant_jax.__version__):
        raise SavedModelError(
            f"{directory} was written by permuquant-jax {meta['library_version']}, newer than the installed "
            f"{permuquant_jax.__version__}: upgrade permuquant-jax"
        )
    for key in ("config", "quant_layers", "tensors", "tensors_sha256", DIGEST_FIELD):
        if key not in meta:
            raise SavedModelError(f"{meta_file} lacks the key {key!r}: corrupted or not written by permuquant-jax")
    bad = _first_mismatch(meta[DIGEST_FIELD], field_digests(meta))
    if bad is not None:
        raise SavedModelError(
            f"{meta_file}: field {bad!r} does not match the SHA-256 recorded when the model was written "
            "(edited or corrupted); convert the model again")
    return meta


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _iter_abstract(model: nnx.Module) -> Iterator[str]:
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var.get_value(), jax.ShapeDtypeStruct):
            yield ".".join(map(str, path))


def load(directory: str | os.PathLike, *, backend: str = "auto") -> FluxDiT:
    """Load a quantized FluxDiT written by `python -m permuquant_jax.convert`.

    The quantized linears call the kernel dispatch with `backend` ("auto": Pallas kernels on a GPU,
    the pure-JAX reference on the CPU). Raises `SavedModelError` on a missing, corrupted or
    mismatched directory.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    meta = load_metadata(directory)
    try:
        config = FluxConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    except (TypeError, ValueError) as e:
        raise SavedModelError(f"{directory / METADATA_FILE}: invalid config: {e}") from None
    try:
        dtype = jnp.dtype(meta.get("dtype", "bfloat16"))
        model = abstract_flux(config, dtype)
    except (TypeError, ValueError) as e:
        raise SavedModelError(f"{directory / METADATA_FILE}: invalid config or dtype: {e}") from None
    for dotted, spec in meta["quant_layers"].items():
        try:
            spec = dict(spec)
            spec["param_dtype"] = jnp.dtype(spec["param_dtype"])
        except (TypeError, ValueError, KeyError) as e:
            raise SavedModelError(f"{directory}: quantized layer {dotted!r} has an invalid spec ({e})") from None
        try:
            parent, name = _resolve(model, dotted)
        except AttributeError:
            raise SavedModelError(f"{directory}: quantized layer {dotted!r} does not exist in a FLUX model") from None
        try:
            layer = nnx.eval_shape(lambda spec=spec: QuantLinear(**spec, backend=backend))
        except (TypeError, ValueError) as e:
            raise SavedModelError(f"{directory}: quantized layer {dotted!r} has an invalid spec ({e})") from None
        setattr(parent, name, layer)

    try:
        targets = {
            k: jax.ShapeDtypeStruct(tuple(v["shape"]), jnp.dtype(v["dtype"])) for k, v in meta["tensors"].items()
        }
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise SavedModelError(f"{directory / METADATA_FILE}: invalid tensor manifest ({e})") from None
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise SavedModelError(f"{directory} has no {PARAMS_DIR}/ directory (interrupted copy?)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(params_dir, targets)
    except Exception as e:  # orbax raises many kinds; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SavedModelError(f"{params_dir}: cannot restore the arrays ({first[:300]})") from None
    if _tensor_hash(arrays) != meta["tensors_sha256"]:
        raise SavedModelError(
            f"{params_dir}: the arrays' SHA-256 does not match {METADATA_FILE} (corrupted or edited files); "
            "convert the model again"
        )
    for key, value in arrays.items():
        try:
            parent, name = _resolve(model, key)
            var = getattr(parent, name)
        except AttributeError:
            raise SavedModelError(f"{directory}: tensor {key!r} has no place in the model") from None
        if not isinstance(var, nnx.Variable):
            raise SavedModelError(f"{directory}: tensor {key!r} does not name a model variable")
        var.set_value(jnp.asarray(value))
    missing = list(_iter_abstract(model))
    if missing:
        raise SavedModelError(f"{directory}: no saved value for {len(missing)} variables, e.g. {missing[0]!r}")
    return model
