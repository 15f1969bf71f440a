"""A generic, validating safetensors reader: headers checked up front, tensors streamed one by one.

Nothing here knows about FLUX; the model loaders (``checkpoint.py`` for the DiT, and loaders for text
encoders or the VAE) build on it:

- :class:`SafetensorsFile` opens one file. Its header is parsed and checked by our own code before
  any tensor is read (header length, JSON shape, dtype names, shapes, offsets, sizes, overlaps,
  metadata), so a truncated, corrupt or hostile file fails at once with a one-line
  :class:`CheckpointError` naming the file, the key and what was expected vs found.
- :func:`open_safetensors` opens a file, a ``*.safetensors.index.json`` of shards, or a folder that
  holds exactly one of those, as one :class:`SafetensorsCollection` (key -> file).
- :func:`check_tensors` checks a checkpoint's keys, shapes and dtypes against a loader's table of
  expected tensors (the one check every model loader runs before reading anything).
- ``read(key, dtype=None, check_finite=False)`` reads one tensor with a positioned read into a fresh
  numpy array (BF16 and FP8 as ``ml_dtypes`` types); nothing is memory-mapped, so tensors already
  consumed do not stay resident. ``check_finite`` rejects NaN/Inf (and values a cast overflows),
  naming the file and the stored key.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy dtypes (the float ones a checkpoint may store).
FLOAT_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
# Every other dtype numpy can hold (readable, never checked for finiteness).
OTHER_DTYPES: dict[str, np.dtype] = {
    "C64": np.dtype(np.complex64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Sub-byte formats: valid in a header (sizes are checked), not readable as numpy arrays here.
PACKED_DTYPE_BITS: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
DTYPE_BITS: dict[str, int] = {
    **{k: 8 * v.itemsize for k, v in {**FLOAT_DTYPES, **OTHER_DTYPES}.items()},
    **PACKED_DTYPE_BITS,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_FINITE_CHUNK = 1 << 20  # elements per step of the finiteness check (bounded scratch memory)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming file, key, expected/found.

    Line breaks inside the message (a key or path that holds one) are escaped, so it stays one line."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TensorInfo:
    """One header entry: stored ``key``, ``dtype`` name (``"BF16"``), ``shape``, and byte range
    ``[begin, end)`` relative to the start of the data region."""

    __slots__ = ("key", "dtype", "shape", "begin", "end")

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.key, self.dtype, self.shape, self.begin, self.end = key, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """The numpy dtype the tensor is read as (None for packed sub-byte formats)."""
        return FLOAT_DTYPES.get(self.dtype) or OTHER_DTYPES.get(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def __repr__(self) -> str:
        return f"TensorInfo({self.key!r}, {self.dtype}, {list(self.shape)}, [{self.begin}, {self.end}))"


def check_path(path: str | os.PathLike, want: str = "file") -> Path:
    """``path`` as a :class:`Path` if it is an existing, readable ``want`` ("file", "dir" or "any");
    otherwise a one-line :class:`CheckpointError` saying what is really wrong (missing, a parent that
    is a file, a symlink loop or dangling link, no read permission, a folder where a file is needed...)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(_missing_reason(path, e)) from None
    is_dir, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
    if want == "file" and is_dir:
        raise CheckpointError(f"{path}: is a directory, expected a .safetensors file")
    if want == "dir" and not is_dir:
        raise CheckpointError(f"{path}: is a file, expected a directory")
    if not (is_dir or is_file):
        raise CheckpointError(f"{path}: not a regular file or directory (a device, pipe or socket)")
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        kind = "directory" if is_dir else "file"
        raise CheckpointError(f"{path}: permission denied: cannot read this {kind} (check its permissions)")
    return path


def _missing_reason(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"{path}: symbolic link loop (the link points back to itself)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied: a parent directory cannot be searched (check its permissions)"
    if e.errno == errno.ENOTDIR:
        for parent in path.parents:
            if parent.is_file():
                return f"{path}: {parent} is a file, not a directory"
    if e.errno == errno.ENOENT and path.is_symlink():
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)"
    if e.errno == errno.ENOENT:
        return f"{path}: no such file or directory"
    return f"{path}: cannot access ({e.strerror})"


def _os_error(path: Path, e: OSError, what: str) -> CheckpointError:
    if e.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"{path}: permission denied: cannot {what} (check its permissions)")
    if e.errno == errno.EISDIR:
        return CheckpointError(f"{path}: is a directory, expected a file")
    return CheckpointError(f"{path}: cannot {what} ({e.strerror or e})")


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


class _DuplicateKey(ValueError):
    pass


def load_json(path: str | os.PathLike, what: str) -> dict:
    """Read ``path`` as a strict JSON object (no duplicate keys); ``what`` names it in errors."""
    path = check_path(path, "file")
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text, object_pairs_hook=_unique_object)
    except OSError as e:
        raise _os_error(path, e, "read the file") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not a {what} (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: not a valid {what}: key '{e}' appears twice") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not a {what} (invalid JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a {what} (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a {what}: expected a JSON object, found a JSON {_json_type(data)}")
    return data


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


class SafetensorsFile:
    """One safetensors file with a validated header.

    ``tensors`` maps each stored key (file order) to a :class:`TensorInfo`; ``metadata`` is the
    ``__metadata__`` dict of strings (empty if absent); :meth:`read` returns one tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = check_path(path, "file")
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                raw = b""
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    if 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                        raw = f.read(n)
        except OSError as e:
            raise _os_error(self.path, e, "read the file") from None
        if len(head) < 8:
            raise CheckpointError(
                f"{self.path}: not a safetensors file (only {size} bytes, expected an "
                "8-byte header length then a JSON header)"
            )
        if n == 0 or len(raw) != n:
            kind = _sniff(head)
            if kind:
                raise CheckpointError(f"{self.path}: not a safetensors file ({kind})")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{self.path}: not a safetensors file (its first 8 bytes give a header of {n} bytes, "
                    f"above the {MAX_HEADER_BYTES}-byte limit)"
                )
            raise CheckpointError(
                f"{self.path}: not a safetensors file (its first 8 bytes give a header of {n} bytes, "
                f"expected 1 to {max(size - 8, 0)} for a file of {size} bytes)"
            )
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        header = self._parse_header(raw)
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: '__metadata__' must be an object of strings, "
                f"found a JSON {_json_type(meta)}"
            )
        for k, v in (meta or {}).items():
            if not isinstance(v, str):
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header: '__metadata__' entry '{k}' must be a string, "
                    f"found {_short(v)}"
                )
        self.metadata: dict[str, str] = dict(meta or {})
        self.tensors: dict[str, TensorInfo] = {k: self._entry(k, v) for k, v in header.items()}
        self._check_overlaps()

    def _parse_header(self, raw: bytes) -> dict:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object)
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"{self.path}: not a safetensors file (header is not UTF-8 text: {e.reason} at byte {e.start})"
            ) from None
        except _DuplicateKey as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: key '{e}' appears twice") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
        except RecursionError:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise CheckpointError(
                f"{self.path}: not a safetensors file (header is a JSON {_json_type(header)}, expected an object)"
            )
        return header

    def _entry(self, key: str, entry: object) -> TensorInfo:
        def bad(field: str, expected: str, found: object) -> CheckpointError:
            return CheckpointError(
                f"{self.path}: corrupt safetensors header: tensor '{key}': {field} must be {expected}, "
                f"found {_short(found)}"
            )

        if not isinstance(entry, dict):
            raise bad("the entry", "an object with dtype, shape and data_offsets", entry)
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
        if missing:
            raise bad("the entry", f"an object with dtype, shape and data_offsets (no '{missing[0]}')", entry)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad("'dtype'", f"one of {', '.join(DTYPE_BITS)}", dtype)
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise bad("'shape'", "a list of non-negative integers", shape)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise bad("'data_offsets'", "a pair [begin, end] of non-negative integers", offsets)
        begin, end = offsets
        if begin > end:
            raise bad("'data_offsets'", "[begin, end] with begin <= end", offsets)
        bits = DTYPE_BITS[dtype] * math.prod(shape)
        if bits % 8:
            raise bad("'shape'", f"a whole number of bytes for {dtype} ({DTYPE_BITS[dtype]} bits per value)", shape)
        if end - begin != bits // 8:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header: tensor '{key}' ({dtype} {shape}) needs "
                f"{bits // 8} bytes but its data_offsets {offsets} span {end - begin}"
            )
        if end > self.data_size:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor '{key}' ends at data byte {end} but the file holds "
                f"only {self.data_size} data bytes (re-download the file)"
            )
        return TensorInfo(key, dtype, tuple(shape), begin, end)

    def _check_overlaps(self) -> None:
        spans = sorted((t.begin, t.end, t.key) for t in self.tensors.values() if t.end > t.begin)
        for (_b, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:], strict=False):
            if begin_b < end_a:
                a, b = self.tensors[key_a], self.tensors[key_b]
                raise CheckpointError(
                    f"{self.path}: corrupt safetensors header: tensors '{key_a}' (bytes [{a.begin}, {a.end})) "
                    f"and '{key_b}' (bytes [{b.begin}, {b.end})) overlap; expected disjoint data ranges"
                )

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, key: str) -> TensorInfo:
        """The header entry of ``key`` (a :class:`CheckpointError` naming the file if absent)."""
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor '{key}' in this file ({len(self)} tensors)") from None

    def read(self, key: str, dtype=None, *, check_finite: bool = False) -> np.ndarray:
        """Read tensor ``key`` from disk into a new numpy array of its stored dtype (BF16 and FP8 as
        ml_dtypes types), cast to ``dtype`` if given.

        ``check_finite``: raise :class:`CheckpointError` naming the file and key if a float tensor
        holds NaN/Inf, or if the cast to ``dtype`` overflows to Inf.
        """
        info = self.info(key)
        np_dtype = info.numpy_dtype
        if np_dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' is stored as {info.dtype} (packed sub-byte values); "
                f"expected one of {', '.join([*FLOAT_DTYPES, *OTHER_DTYPES])}"
            )
        out = np.empty(info.shape, np_dtype)
        self._read_bytes(key, info, out)
        if check_finite and info.is_float:
            _raise_nonfinite(out, self.path, key, f"stored as {info.dtype}")
        if dtype is not None and np.dtype(dtype) != np_dtype:
            with np.errstate(over="ignore"):  # overflow becomes Inf, reported below if checked
                out = out.astype(dtype)
            if check_finite and info.is_float:
                _raise_nonfinite(out, self.path, key, f"after the cast from {info.dtype} to {np.dtype(dtype)}")
        return out

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Read tensor ``key`` straight into ``out`` (C-contiguous, the stored dtype and element count):
        no intermediate array; the caller checks finiteness."""
        info = self.info(key)
        if info.numpy_dtype is None or out.dtype != info.numpy_dtype or out.size != math.prod(info.shape) \
                or not out.flags.c_contiguous:
            raise ValueError(f"read_into {key!r}: needs a C-contiguous {info.numpy_dtype} array of "
                             f"{math.prod(info.shape)} elements, found {out.dtype} {out.shape}")
        self._read_bytes(key, info, out)

    def _read_bytes(self, key: str, info: TensorInfo, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + info.begin)
                while got < info.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except OSError as e:
            raise _os_error(self.path, e, f"read tensor '{key}'") from None
        if got != info.nbytes:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor '{key}' has {got} of {info.nbytes} bytes (re-download the file)"
            )

    def iter_tensors(
        self, keys: Iterable[str] | None = None, dtype=None, *, check_finite: bool = False
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(key, array)`` one tensor at a time (all keys in file order by default)."""
        for key in self.keys() if keys is None else keys:
            yield key, self.read(key, dtype, check_finite=check_finite)


# Per float dtype: (unsigned view, mask, least non-finite): a value is NaN/Inf iff its bits with
# the sign masked off are >= the last number (exponent all ones). The fnuz types have one NaN code
# (0x80, "negative zero") and no Inf: mask None, exact match.
_NONFINITE_BITS: dict[np.dtype, tuple[type, int | None, int]] = {
    np.dtype(np.float64): (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    np.dtype(np.float32): (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF, 0x7F80),
    np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, 0x7F, 0x7F),
    np.dtype(ml_dtypes.float8_e5m2): (np.uint8, 0x7F, 0x7C),
    np.dtype(ml_dtypes.float8_e8m0fnu): (np.uint8, 0xFF, 0xFF),
    np.dtype(ml_dtypes.float8_e4m3fnuz): (np.uint8, None, 0x80),
    np.dtype(ml_dtypes.float8_e5m2fnuz): (np.uint8, None, 0x80),
}


def all_finite(arr: np.ndarray) -> bool:
    """True if the float array ``arr`` holds no NaN/Inf (an integer test on the bits in bounded
    chunks: no float ufuncs, no scratch array the size of ``arr``). Non-float arrays are always finite."""
    spec = _NONFINITE_BITS.get(arr.dtype)
    if spec is None:
        return bool(np.isfinite(arr).all()) if np.issubdtype(arr.dtype, np.inexact) else True
    uint, mask, least = spec
    flat = np.ascontiguousarray(arr).reshape(-1).view(uint)
    if mask is None:
        return not bool((flat == uint(least)).any())
    scratch = np.empty(min(flat.size, _FINITE_CHUNK), uint)
    for start in range(0, flat.size, _FINITE_CHUNK):
        part = flat[start : start + _FINITE_CHUNK]
        tmp = scratch[: part.size]
        np.bitwise_and(part, uint(mask), out=tmp)
        if tmp.max() >= least:
            return False
    return True


def _raise_nonfinite(arr: np.ndarray, path: Path, key: str, how: str) -> None:
    if all_finite(arr):
        return
    wide = arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr
    nan, inf = int(np.isnan(wide).sum()), int(np.isinf(wide).sum())
    first = tuple(int(i) for i in np.unravel_index(int(np.argmax(~np.isfinite(wide))), arr.shape))
    raise CheckpointError(
        f"{path}: tensor '{key}' ({how}, shape {list(arr.shape)}) holds {nan} NaN and {inf} Inf values "
        f"(first at index {list(first)}); expected finite weights (the file is corrupt or was saved from a "
        "diverged run)"
    )


class SafetensorsCollection:
    """Tensors spread over one or more safetensors files (a single file or an index of shards).

    ``files``: the opened :class:`SafetensorsFile` s; ``where``: stored key -> its file; ``metadata``:
    the single file's ``__metadata__`` (empty for shards); ``index``: the index path or None.
    """

    def __init__(self, path: Path, files: list[SafetensorsFile], index: Path | None = None):
        self.path, self.files, self.index = path, files, index
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.tensors:
                if k in self.where:
                    raise CheckpointError(f"{f.path}: key '{k}' also appears in {self.where[k].path}")
                self.where[k] = f
        self.metadata: dict[str, str] = dict(files[0].metadata) if len(files) == 1 else {}

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def file_of(self, key: str) -> SafetensorsFile:
        try:
            return self.where[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor '{key}' ({len(self)} tensors)") from None

    def info(self, key: str) -> TensorInfo:
        return self.file_of(key).info(key)

    def read(self, key: str, dtype=None, *, check_finite: bool = False) -> np.ndarray:
        """:meth:`SafetensorsFile.read` on the file holding ``key``."""
        return self.file_of(key).read(key, dtype, check_finite=check_finite)

    def iter_tensors(
        self, keys: Iterable[str] | None = None, dtype=None, *, check_finite: bool = False
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(key, array)`` one tensor at a time (all keys, shard by shard, by default)."""
        for key in self.keys() if keys is None else keys:
            yield key, self.read(key, dtype, check_finite=check_finite)


def read_index(index_path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a ``*.safetensors.index.json``, validated: a
    JSON object whose ``weight_map`` is a non-empty object of strings naming files inside the index's
    folder (no absolute paths, no ``..``)."""
    index_path = Path(index_path)
    data = load_json(index_path, "safetensors index")
    if "weight_map" not in data:
        raise CheckpointError(f"{index_path}: not a safetensors index: no 'weight_map' (found keys {sorted(data)[:8]})")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_path}: 'weight_map' must be a non-empty object of tensor key -> shard file, found "
            f"{_short(weight_map) if not isinstance(weight_map, dict) else 'an empty object'}"
        )
    if "metadata" in data and not isinstance(data["metadata"], dict | type(None)):
        raise CheckpointError(f"{index_path}: 'metadata' must be an object, found {_short(data['metadata'])}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(
                f"{index_path}: weight_map['{key}'] must be a shard file name (a string), found {_short(shard)}"
            )
        pure = PurePosixPath(shard.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or os.path.isabs(shard) or (len(shard) > 1 and shard[1] == ":"):
            raise CheckpointError(
                f"{index_path}: weight_map['{key}'] is {shard!r}; expected a file name inside "
                f"{index_path.parent} (no absolute path, no '..')"
            )
    return weight_map


def open_index(index_path: str | os.PathLike) -> SafetensorsCollection:
    """Open every shard listed by an index; each key must be in the shard the index names, and each
    shard must hold only keys the index lists."""
    index_path = check_path(index_path, "file")
    weight_map = read_index(index_path)
    folder = index_path.parent
    shards: dict[str, SafetensorsFile] = {}
    for key, shard in weight_map.items():
        if shard not in shards:
            try:
                shards[shard] = SafetensorsFile(folder / shard)
            except CheckpointError as e:
                if not os.path.lexists(folder / shard):
                    raise CheckpointError(
                        f"{folder / shard}: shard listed in {index_path.name} (for key '{key}') does not exist"
                    ) from None
                raise e from None
        if key not in shards[shard].tensors:
            raise CheckpointError(
                f"{folder / shard}: {index_path.name} says it holds key '{key}', but the file has no such tensor"
            )
    for name, f in shards.items():
        extra = next((k for k in f.tensors if weight_map.get(k) != name), None)
        if extra is not None:
            listed = weight_map.get(extra)
            said = f"lists it in {listed}" if listed else "does not list it"
            raise CheckpointError(f"{f.path}: holds key '{extra}' but {index_path.name} {said}")
    return SafetensorsCollection(index_path, list(shards.values()), index=index_path)


def open_safetensors(path: str | os.PathLike) -> SafetensorsCollection:
    """Open ``path``: a ``.safetensors`` file, a ``*.safetensors.index.json``, or a folder holding
    exactly one index or (without an index) exactly one ``.safetensors`` file."""
    path = check_path(path, "any")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return open_index(path)
        return SafetensorsCollection(path, [SafetensorsFile(path)])
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise _os_error(path, e, "list the directory") from None
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return open_index(path / indexes[0])
    if not indexes and len(files) == 1:
        return SafetensorsCollection(path, [SafetensorsFile(path / files[0])])
    found = indexes if indexes else files
    raise CheckpointError(
        f"{path}: expected one .safetensors file or one .safetensors.index.json in this directory, found "
        f"{len(found)}: {found[:6]}"
    )


def _sniff(head: bytes) -> str:
    """Name a few formats people mistake for safetensors, from their first bytes."""
    if head.startswith(b"GGUF"):
        return "this is a GGUF file: use the .safetensors checkpoint"
    if head.startswith(b"PK\x03\x04"):
        return "this is a zip / PyTorch .pt/.ckpt file: convert it to .safetensors first"
    if head[:1] == b"\x80":
        return "this is a Python pickle: convert it to .safetensors first"
    return ""


# --------------------------------------------------------------------------- what a loader expects


def check_tensors(
    expected: Mapping[str, tuple[int, ...]],
    present: Iterable[str],
    info: Callable[[str], TensorInfo],
    *,
    checkpoint: str | os.PathLike,
    describe: str,
    dtypes: Collection[str],
    stored: Callable[[str], str],
    where: Callable[[str], str | os.PathLike],
    basis: str | None = None,
    missing_note: Callable[[str], str] | None = None,
    unexpected_note: Callable[[str], str] | None = None,
) -> None:
    """Check a checkpoint's tensors against a loader's table before anything is read.

    ``expected``: (unprefixed) key -> shape; ``present``: the keys the checkpoint holds, unprefixed, in
    file order; ``info(key)``: a present key's header entry (``.key`` the name as stored, ``.shape``,
    ``.dtype``); ``stored(key)``: the name a key has (or would have) in the file; ``where(key)``: the
    file holding a present key. ``describe`` names the model the table was made for ("a FLUX
    autoencoder with ch=128, ..."); ``basis``, where its config came from ("inferred from the other
    keys"), is said after a missing key. ``*_note(key)``: extra words for one key (an alternative
    name, what an unexpected key belongs to).

    Raises :class:`CheckpointError` (one line) at the first of: a missing key (the first in table
    order, and how many more), an unexpected key (the first in file order, and how many more), a
    shape, a dtype not in ``dtypes``.
    """
    present = list(present)
    have = set(present)
    missing = [k for k in expected if k not in have]
    if missing:
        k = missing[0]
        note = missing_note(k) if missing_note else ""
        raise CheckpointError(
            f"{checkpoint}: missing key '{stored(k)}'{note} (expected shape {list(expected[k])})"
            f"{_more(missing)}; expected {describe}" + (f" ({basis})" if basis else "")
        )
    unexpected = [k for k in present if k not in expected]
    if unexpected:
        k = unexpected[0]
        t = info(k)
        note = unexpected_note(k) if unexpected_note else ""
        raise CheckpointError(
            f"{where(k)}: unexpected key '{t.key}' (shape {list(t.shape)}){_more(unexpected)}; not part of "
            f"{describe}{note}"
        )
    for k, shape in expected.items():
        t = info(k)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{where(k)}: key '{t.key}': expected shape {list(shape)}, found {list(t.shape)} (for {describe})"
            )
        if t.dtype not in dtypes:
            raise CheckpointError(
                f"{where(k)}: key '{t.key}': expected a float tensor ({', '.join(dtypes)}), found {t.dtype}"
            )


def _more(keys: list[str]) -> str:
    return f" and {len(keys) - 1} more" if len(keys) > 1 else ""
