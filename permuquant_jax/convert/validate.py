"""Checks of the converter's inputs at the door: options, `--calib` files, paths, and finite results.

Everything here is cheap (no model weights are read): the CLI runs it before the long work starts, so
a bad input fails in the first seconds with one line that names the option or file and expected vs
found. Each check raises :class:`UsageError` (a ``ValueError``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class UsageError(ValueError):
    """Invalid command-line input (an option's value, a file it names, a combination of options)."""


# ----------------------------------------------------------------------------- scalar options


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_int_range(name: str, value: int | None, lo: int, hi: int | None = None) -> None:
    """`value` (an integer option; None = unset) lies in [lo, hi]."""
    if value is None:
        return
    if value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise UsageError(f"{_opt(name)} must be {want}, found {value}")


def require_finite(name: str, value: float | None, lo: float | None = None, hi: float | None = None) -> None:
    """`value` (a float option; None = unset) is finite and lies in [lo, hi] (bounds optional)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{_opt(name)} must be a finite number, found {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise UsageError(f"{_opt(name)} must lie in [{lo_s}, {hi_s}], found {value:g}")


def parse_unit_floats(name: str, text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers in [0, 1] (e.g. `--alpha 0,0.5,1`)."""
    try:
        values = tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise UsageError(f"{_opt(name)} must be comma-separated numbers in [0, 1], found {text!r}") from None
    if not values:
        raise UsageError(f"{_opt(name)} must list at least one number in [0, 1], found {text!r}")
    bad = [v for v in values if not 0.0 <= v <= 1.0]  # NaN fails the comparison too
    if bad:
        raise UsageError(f"{_opt(name)} values must lie in [0, 1], found {bad[0]:g} in {text!r}")
    return values


MAX_IMAGE_SIDE = 4096  # pixels a side: FLUX.1 is used up to ~2 MP; 4096 x 4096 is 16 MP


def require_multiple(name: str, value: int | None, of: int, most: int | None = None) -> None:
    """`value` (None = unset) is a positive multiple of `of` (and at most `most`)."""
    if value is not None and (value < of or value % of):
        raise UsageError(f"{_opt(name)} must be a positive multiple of {of}, found {value}")
    if value is not None and most is not None and value > most:
        raise UsageError(f"{_opt(name)} {value} exceeds {most} (FLUX.1 is used up to about 2 MP): pass a smaller value")


# ----------------------------------------------------------------------------- options against the model


def linear_paths(model: Any) -> dict[str, int]:
    """Dotted module path -> input width of every float linear of a (possibly abstract) model."""
    from permuquant_jax.quant.sites import find_linears, path_str

    return {path_str(p): int(lin.kernel.get_value().shape[-2]) for p, lin in find_linears(model).items()}


def compile_patterns(name: str, patterns: Iterable[str]) -> None:
    """Every `re:` pattern compiles."""
    for pat in patterns:
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise UsageError(f"{_opt(name)} pattern {pat!r} is not a valid regular expression ({e})") from None


def effective_keep(patterns: Sequence[str] | None, defaults: Sequence[str], paths: Iterable[str]) -> list[str]:
    """The `--keep-bf16` patterns to use on a model with these module `paths`.

    `patterns` None means the defaults, of which those that match nothing in this model (e.g.
    `guidance_in.*` on FLUX.1-schnell) are dropped silently; a user-given pattern that matches nothing
    is an error naming it and the closest module paths.
    """
    from permuquant_jax.quant.sites import match_any

    paths = list(paths)
    if patterns is None:
        return [p for p in defaults if any(match_any(x, [p]) for x in paths)]
    compile_patterns("keep_bf16", patterns)
    for pat in patterns:
        if not any(match_any(x, [pat]) for x in paths):
            close = difflib.get_close_matches(pat.removeprefix("re:"), paths, n=3, cutoff=0.3) or paths[:3]
            raise UsageError(
                f"--keep-bf16 pattern {pat!r} matches no linear of this model; closest module paths: "
                f"{', '.join(close)} (patterns are fnmatch globs over whole paths, or re:REGEX)")
    return list(patterns)


def check_widths(widths: dict[str, int], keep: Sequence[str], *, group: int, format: str,
                 hadamard_block: int | None, segment_widths: Sequence[int] = ()) -> None:
    """Every quantized linear's input width is a multiple of the format group and of the Hadamard block
    (when the method rotates), and so are the site segment widths (hidden and MLP sizes)."""
    from permuquant_jax.quant.sites import match_any

    targets = {p: k for p, k in widths.items() if not match_any(p, keep)}
    if not targets:
        raise UsageError("--keep-bf16 keeps every linear in 16 bits: nothing would be quantized")
    for p, k in targets.items():
        if k % group:
            raise UsageError(f"linear {p!r} has {k} input channels, not a multiple of the {format} group {group}; "
                             f"add it to --keep-bf16")
    if hadamard_block:
        for p, k in list(targets.items()) + [(f"site width {w}", w) for w in segment_widths]:
            if k % hadamard_block:
                raise UsageError(f"--hadamard-block {hadamard_block} does not divide {p!r} "
                                 f"({k} channels); use a block that divides the model's widths, e.g. "
                                 f"{_largest_pow2_divisor([*targets.values(), *segment_widths], 128)}")


def _largest_pow2_divisor(values: Sequence[int], cap: int) -> int:
    b = cap
    while b > 1 and any(v % b for v in values):
        b //= 2
    return b


# ----------------------------------------------------------------------------- --calib .npz


def load_calib_npz(path: str | os.PathLike, *, txt_width: int, y_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and check an `.npz` of text embeddings: 'txt' [N, S, txt_width] and 'y' [N, y_width],
    float, N >= 1, S >= 1, the same N, all values finite. Returns them as float32."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--calib {path}: is a directory, expected an .npz file with 'txt' and 'y'")
    if not path.is_file():
        raise UsageError(f"--calib {path}: no such file (expected an .npz with 'txt' and 'y', or 'synthetic')")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise UsageError(f"--calib {path}: cannot read the file ({e.strerror})") from None
    with fh:
        try:
            z = np.load(fh, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"--calib {path}: not a readable .npz of text embeddings "
                             f"({' '.join(str(e).split())[:200]})") from None
        if not hasattr(z, "files"):
            raise UsageError(f"--calib {path}: a single .npy array, expected an .npz with 'txt' [N, S, "
                             f"{txt_width}] and 'y' [N, {y_width}]")
        with z:
            missing = [k for k in ("txt", "y") if k not in z.files]
            if missing:
                raise UsageError(f"--calib {path}: missing array {missing[0]!r}; expected 'txt' [N, S, {txt_width}] "
                                 f"and 'y' [N, {y_width}], found {sorted(z.files)}")
            arrays = {}
            for key in ("txt", "y"):
                try:
                    arrays[key] = z[key]
                except (OSError, ValueError, EOFError, KeyError) as e:  # object arrays, corrupt members
                    raise UsageError(f"--calib {path}: array {key!r} cannot be read "
                                     f"({' '.join(str(e).split())[:200]})") from None
    txt, y = arrays["txt"], arrays["y"]
    for key, a, want in (("txt", txt, f"[N, S, {txt_width}]"), ("y", y, f"[N, {y_width}]")):
        if a.dtype.kind != "f":
            raise UsageError(f"--calib {path}: array {key!r} has dtype {a.dtype}, expected a float dtype "
                             f"(float16/32/64) {want}")
    if txt.ndim != 3:
        raise UsageError(f"--calib {path}: 'txt' must be [N, S, {txt_width}], found shape {list(txt.shape)}")
    if y.ndim != 2:
        raise UsageError(f"--calib {path}: 'y' must be [N, {y_width}], found shape {list(y.shape)}")
    if txt.shape[0] < 1 or txt.shape[1] < 1:
        raise UsageError(f"--calib {path}: 'txt' holds no prompts or no tokens (shape {list(txt.shape)}); "
                         "expected N >= 1 prompts of S >= 1 tokens")
    if y.shape[0] != txt.shape[0]:
        raise UsageError(f"--calib {path}: 'txt' has {txt.shape[0]} prompts but 'y' has {y.shape[0]}; "
                         "expected the same N")
    if txt.shape[2] != txt_width or y.shape[1] != y_width:
        raise UsageError(
            f"--calib {path}: 'txt' has width {txt.shape[2]} and 'y' {y.shape[1]}, the model expects "
            f"{txt_width} (T5) and {y_width} (CLIP pooled)")
    for key, a in (("txt", txt), ("y", y)):
        bad = ~np.isfinite(a)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise UsageError(f"--calib {path}: array {key!r} holds {int(bad.sum())} non-finite values, the first "
                             f"{a[idx]} at index {list(idx)}; expected finite embeddings")
    txt32, y32 = txt.astype(np.float32), y.astype(np.float32)
    for key, a, a32 in (("txt", txt, txt32), ("y", y, y32)):
        if not np.isfinite(a32).all():
            raise UsageError(f"--calib {path}: array {key!r} overflows float32 (max |value| "
                             f"{float(np.max(np.abs(a))):g})")
    return txt32, y32


# ----------------------------------------------------------------------------- never destroy input


def check_not_source(dst: str | os.PathLike, sources: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """Refuse an output that is, contains or lies inside any source path (symlinks resolved).

    `sources`: (label, path) pairs, e.g. ("SRC", ...), ("--calib", ...). With `--overwrite` such an
    output would delete the input; without it, writing into a source folder would change it.
    """
    d = Path(os.path.realpath(dst))
    for label, src in sources:
        s = Path(os.path.realpath(src))
        if d == s:
            how = "is"
        elif s.is_relative_to(d):
            how = "contains"
        elif d.is_relative_to(s):
            how = "lies inside"
        else:
            continue
        resolved = f" (resolved: {d})" if str(d) != str(Path(dst).absolute()) else ""
        raise UsageError(f"--out {dst}{resolved} {how} the input {label} {src}; writing there would destroy the "
                         "input: choose an output outside it")


# ----------------------------------------------------------------------------- finite results


def first_nonfinite(arrays: dict[str, Any]) -> tuple[str, list[int], float] | None:
    """(name, index, value) of the first non-finite entry over `arrays` in their order, or None."""
    for name, a in arrays.items():
        if a is None:
            continue
        a = np.asarray(a, dtype=np.float32) if np.asarray(a).dtype.kind not in "fc" else np.asarray(a)
        if a.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(a)
        if bad.any():
            idx = [int(i) for i in np.argwhere(bad)[0]] if a.ndim else []
            return name, idx, float(a[tuple(idx)])
    return None


class NonFiniteError(ValueError):
    """A calibration or evaluation result holds NaN or Inf: the run is a failure."""


def check_batches_finite(batches: Sequence[dict[str, Any]], what: str) -> None:
    """Every array of every batch (DiT inputs along the sampled trajectories) is finite."""
    for i, b in enumerate(batches):
        hit = first_nonfinite({k: v for k, v in b.items() if v is not None})
        if hit:
            key, idx, val = hit
            raise NonFiniteError(
                f"{what} batch {i} of {len(batches)}: '{key}' holds {val} at index {idx}: the float model's "
                "sampling trajectory diverged (non-finite weights or embeddings too large?); nothing was written")


def check_stats_finite(stats: Any) -> None:
    """Every layer's calibration statistics (sum of x^2, max |x|, amax) are finite; names the first layer."""
    from permuquant_jax.quant.sites import path_str

    for p, s in stats.layers.items():
        hit = first_nonfinite({"sum of x^2": s.sumsq, "max |x|": s.absmax, "amax": s.amax})
        if hit:
            field, idx, val = hit
            raise NonFiniteError(
                f"calibration statistics of layer '{path_str(p)}': {field} is {val} at index {idx} (the input "
                "of this linear overflowed or holds NaN); nothing was written")


def check_report_finite(report: Any) -> None:
    """Every error measured in the acceptance pass (each candidate's numbers) is finite; names the site,
    layer and candidate."""
    for s in report.sites:
        for c in s.candidates:
            for key, val in c.items():
                if isinstance(val, float | int) and not isinstance(val, bool) and not math.isfinite(val):
                    layer = f" layer {list(s.layer)}" if s.layer else ""
                    raise NonFiniteError(
                        f"acceptance pass: site '{s.site}'{layer} (consumers {', '.join(s.consumers)}): candidate "
                        f"{c.get('label')!r} has {key} {val}; nothing was written")


def check_error_finite(value: float, what: str) -> None:
    """A scalar result (e.g. the held-out error) is finite."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} is {value}: the quantized model's output is not finite; nothing was written")
