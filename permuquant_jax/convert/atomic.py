"""Write a directory all at once: build it under a temporary name beside the target, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputError(ValueError):
    """The output path cannot be written (exists, unwritable parent, ...)."""


def check_output_dir(dst: str | os.PathLike, *, overwrite: bool) -> Path:
    """Validate `dst` before any long work starts, so a bad path fails in the first second.

    Refuses an existing `dst` unless `overwrite`, a `dst` that is an existing file, and a parent
    directory that is missing or not writable.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"output {dst} exists and is a file, not a directory; choose another --out")
    if dst.exists() and not overwrite:
        raise OutputError(f"output {dst} already exists; pass --overwrite to replace it")
    parent = dst.parent
    if not parent.is_dir():
        raise OutputError(f"parent directory {parent} of the output does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"parent directory {parent} of the output is not writable")
    return dst


@contextlib.contextmanager
def atomic_output_dir(dst: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `dst`, on any error it is deleted.

    The temporary directory sits in `dst`'s parent so the final step is a rename on one filesystem:
    an interrupted or failed run leaves no `dst` (and an existing `dst` untouched until the end).
    """
    dst = check_output_dir(dst, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():  # only reachable with overwrite=True
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / "x")
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
