"""Reading safetensors files one tensor at a time, with errors that name the file and the key.

The header is parsed and validated up front (so a truncated or foreign file fails before anything
is built); each tensor is then read with a plain positioned read into a fresh buffer. Nothing is
memory-mapped, so the bytes of tensors already converted do not stay resident.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

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
}
_OTHER_SIZES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line naming file, key, expected/found."""


class TensorInfo:
    __slots__ = ("key", "dtype", "shape", "begin", "end")

    def __init__(self, key: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.key, self.dtype, self.shape, self.begin, self.end = key, dtype, shape, begin, end


class SafetensorsFile:
    """The header of one safetensors file; :meth:`read` returns one tensor as a numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head, raw = f.read(8), b""
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    if 0 < n <= min(_MAX_HEADER, size - 8):
                        raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read the file ({e.strerror})") from None
        if len(head) < 8:
            raise CheckpointError(
                f"{self.path}: not a safetensors file (only {size} bytes, expected an "
                "8-byte header length then a JSON header)"
            )
        if not raw:
            kind = _sniff(head)
            raise CheckpointError(
                f"{self.path}: not a safetensors file ({kind + '; ' if kind else ''}its first 8 bytes give a "
                f"header of {n} bytes, the file has {size} bytes)"
            )
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(
                f"{self.path}: not a safetensors file (header is a JSON {type(header).__name__}, expected an object)"
            )
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            try:
                dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
                if not all(isinstance(s, int) and s >= 0 for s in shape):
                    raise ValueError
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(
                    f"{self.path}: not a safetensors file (bad header entry for key '{key}': {entry!r})"
                ) from None
            itemsize = FLOAT_DTYPES[dtype].itemsize if dtype in FLOAT_DTYPES else _OTHER_SIZES.get(dtype)
            if itemsize is not None and end - begin != itemsize * math.prod(shape):
                raise CheckpointError(
                    f"{self.path}: corrupt header: tensor '{key}' ({dtype} {list(shape)}) needs "
                    f"{itemsize * math.prod(shape)} bytes but its offsets span {end - begin}"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor '{key}' ends at data byte {end} but the file holds "
                    f"only {data_size} data bytes (re-download the file)"
                )
            self.tensors[key] = TensorInfo(key, dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> np.ndarray:
        """Read tensor ``key`` (a float dtype) from disk into a new numpy array."""
        info = self.tensors[key]
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor '{key}' is stored as {info.dtype}; expected a float dtype "
                f"({', '.join(FLOAT_DTYPES)})"
            )
        dtype = FLOAT_DTYPES[info.dtype]
        out = np.empty(info.shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + info.begin)
                got = f.readinto(view)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{key}' ({e.strerror})") from None
        if got != info.end - info.begin:
            raise CheckpointError(
                f"{self.path}: truncated file: tensor '{key}' has {got} of {info.end - info.begin} bytes"
            )
        return out


def _sniff(head: bytes) -> str:
    """Name a few formats people mistake for safetensors, from their first bytes."""
    if head.startswith(b"GGUF"):
        return "this is a GGUF file: use the .safetensors checkpoint"
    if head.startswith(b"PK\x03\x04"):
        return "this is a zip / PyTorch .pt/.ckpt file: convert it to .safetensors first"
    if head[:1] == b"\x80":
        return "this is a Python pickle: convert it to .safetensors first"
    return ""
