"""Fixtures shared by test files: one conversion of the embedded tiny model (the slow step, ~20-30 s)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import pytest

# Small calibration so a whole conversion stays in seconds on the CPU.
FAST_CONVERT = ["--calib-samples", "1", "--heldout-samples", "1", "--steps", "3", "--timesteps", "2",
                "--resolution", "64", "--accept", "layer", "--no-progress"]


@pytest.fixture(scope="session")
def converted_tiny(tmp_path_factory) -> SimpleNamespace:
    """`python -m permuquant_jax.convert --out DST` (in process) of the embedded model, PermuQuant + NVFP4.

    `.dst` is the output (alone in its folder; do not modify it: copy it), `.stdout` the summary
    printed, `.argv` the arguments used. Shared by tests/test_convert_cli.py and tests/test_hostile_convert.py.
    """
    from permuquant_jax.convert.cli import main

    dst = Path(tmp_path_factory.mktemp("converted")) / "flux-tiny-nvfp4"
    argv = ["--out", str(dst), *FAST_CONVERT]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    assert rc == 0, out.getvalue()
    return SimpleNamespace(dst=dst, stdout=out.getvalue(), argv=argv)
