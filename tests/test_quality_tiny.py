"""benchmarks/quality_tiny.py at its reduced setting (--quick) on the embedded trained pipeline."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("quality_tiny", REPO / "benchmarks" / "quality_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scene_classifier_reads_rendered_scenes():
    q = _bench()
    from permuquant_jax.train import data as D

    clf = q.SceneClassifier(64, num=600, seed=int(np.random.default_rng().integers(1 << 30)))
    assert clf.heldout[0] >= 0.95 and clf.heldout[1] >= 0.9, clf.heldout
    # fresh scenes of every colour x shape, drawn by the renderer itself
    scenes = [D.Scene(f"a {c} {s}", (D.Shape(s, c, 30.0 + i, 34.0 - i, 9.0 + 0.5 * i),), 64)
              for i, (c, s) in enumerate((c, s) for c in D.COLOURS for s in D.SHAPES)]
    pred = clf.predict(np.stack([D.render(sc) for sc in scenes]))
    assert pred == [(sc.shapes[0].colour, sc.shapes[0].kind) for sc in scenes]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_quality_table(tmp_path):
    q = _bench()
    out, js, grid = tmp_path / "q.md", tmp_path / "q.json", tmp_path / "q.png"
    assert q.main(["--quick", "--out", str(out), "--json", str(js), "--grid", str(grid)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["format"], r["method"]) for r in rows] == [("bf16", "bf16"), ("nvfp4", "rtn"), ("nvfp4", "permuquant")]
    ref, rtn, pq = rows
    assert math.isinf(ref["psnr"]) and ref["ssim"] == 1.0 and ref["latent_err"] == 0.0
    for r in (rtn, pq):
        assert 10.0 < r["psnr"] < 100.0 and 0.0 < r["ssim"] < 1.0, r
        assert 0.0 < r["latent_err"] < 1.0 and 0.0 < r["layer_mean"] <= r["layer_worst"] < 1.0, r
        assert r["worst_layer"] in r["layers"] and len(r["layers"]) == 6  # 2 double + 4 single blocks
    assert "| NVFP4 W4A4 | rtn |" in out.read_text() and grid.stat().st_size > 1000
