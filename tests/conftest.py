"""Shared test set-up: a session-wide JAX compilation cache, the xdist grouping, one conversion of the
embedded tiny model (the slow step) shared by the CLI tests."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# Small calibration so a whole conversion stays in seconds on the CPU.
FAST_CONVERT = ["--calib-samples", "1", "--heldout-samples", "1", "--steps", "3", "--timesteps", "2",
                "--resolution", "64", "--accept", "layer", "--no-progress"]

# The persistent compilation cache of this test session: a fresh temporary folder (never the user's
# cache), made by the first pytest process (the xdist controller, or the only process) and removed by
# it at the end. Its environment variables reach the xdist workers and the CLI subprocesses, so an
# identical program compiled again (another jit wrapper, another process) is read back, not compiled.
# A cached executable is the same executable: results do not change. Tests that must see a real
# compile (tests/test_hostile_convert.py's signal cases) drop these variables for their subprocesses.
# PERMUQUANT_TEST_JAX_CACHE=0 turns it off.
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": None, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
_CACHE_OWNER = "_PERMUQUANT_TEST_JAX_CACHE"  # set to the folder by the process that made it


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PERMUQUANT_TEST_JAX_CACHE") == "0":  # to time or debug the tests without it
        return
    cache = os.environ.get(_CACHE_OWNER)
    if cache is None or not Path(cache).is_dir():
        _remove_stale_caches()
        cache = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}-")
        os.environ[_CACHE_OWNER] = cache
        config.stash[_cache_key] = cache  # this process removes it
    os.environ.update({k: v or cache for k, v in CACHE_ENV.items()})
    import jax

    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = config.stash.get(_cache_key, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


_cache_key = pytest.StashKey[str]()
_CACHE_PREFIX = "permuquant-test-jax-cache-"


def _remove_stale_caches() -> None:
    """Remove the caches of test sessions that were killed (no pytest_unconfigure): their pid is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{_CACHE_PREFIX}*-*"):
        pid = d.name[len(_CACHE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def uncached_env(env: dict[str, str]) -> dict[str, str]:
    """`env` without the session's compilation cache (for a subprocess whose compile is the point)."""
    return {k: v for k, v in env.items() if k not in CACHE_ENV}


# xdist units of work (`--dist loadfile`): a test file is one unit, so its module fixtures are built
# once, except as below. A unit is named by the first prefix of its node id found here: files that
# share a session fixture are one unit (built once), and a slow test that shares nothing with the rest
# of its file is a unit of its own. Units listed here go first, the slowest first, so that no long
# unit starts last.
XDIST_UNITS = {
    "tests/test_convert_cli.py::test_each_method_on_a_bfl_file": "convert-each-method",
    "tests/test_convert_cli.py": "converted_tiny",
    "tests/test_hostile_convert.py": "converted_tiny",
}
XDIST_FIRST = ["converted_tiny", "convert-each-method"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            unit = next((u for prefix, u in XDIST_UNITS.items() if nodeid.startswith(prefix)), None)
            return unit or nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:
                self.ordered = True
                for unit in reversed(XDIST_FIRST):
                    if unit in self.workqueue:
                        self.workqueue.move_to_end(unit, last=False)
            super()._assign_work_unit(node)

    return Units(config, log)


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
