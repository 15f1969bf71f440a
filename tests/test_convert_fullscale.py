"""Long-run features of the converter on the tiny model: --save-stats / --stats (reuse gives the output of
a fresh run; a file of another model, settings or kind is one error line), --timings."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
from flax import nnx

import permuquant_jax
from permuquant_jax.convert.cli import main
from permuquant_jax.convert.saved import load_metadata

FAST = ["--calib-samples", "1", "--heldout-samples", "1", "--steps", "3", "--timesteps", "2",
        "--resolution", "64", "--accept", "layer", "--no-progress"]  # = conftest.FAST_CONVERT


def _run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _arrays(dst):
    m = permuquant_jax.load(dst)
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(m))}


def test_stats_reuse_equals_fresh_run_and_bad_stats_are_one_line(converted_tiny, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    timings = tmp_path / "t.json"
    rc, _ = _run(["--out", str(tmp_path / "a"), *FAST, "--save-stats", str(stats), "--timings", str(timings)])
    assert rc == 0 and stats.is_file()
    t = json.loads(timings.read_text())
    assert {"loading", "calibrating", "acceptance", "saving"} <= set(t["phases"]) and t["current"] == "done"
    assert t["peak_host_rss_bytes"] > 0 and t["output_bytes"] > 0
    rc, out = _run(["--out", str(tmp_path / "b"), *FAST, "--stats", str(stats)])
    assert rc == 0, out
    fresh, reused = converted_tiny.dst, tmp_path / "b"
    ma, mb = load_metadata(fresh), load_metadata(reused)
    assert ma["permutations"] and ma["permutations"] == mb["permutations"]
    assert ma["act_global_scales"] == mb["act_global_scales"]
    qa, qb = _arrays(fresh), _arrays(reused)
    assert qa.keys() == qb.keys() and all(np.array_equal(qa[k], qb[k]) for k in qa)

    capsys.readouterr()
    junk = tmp_path / "junk.npz"
    np.savez(junk, x=np.zeros(3))
    cases = [(["--seed", "1", "--stats", str(stats)], "--seed 0"),  # other calibration settings
             (["--stats", str(junk)], "without calibration-statistics metadata"),
             (["--stats", str(tmp_path / "none.npz")], "no such file")]
    for extra, needle in cases:
        rc, _ = _run(["--out", str(tmp_path / "c"), *FAST, *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert rc == 2 and len(err) == 1 and needle in err[0], (extra, err)
        assert not (tmp_path / "c").exists()
