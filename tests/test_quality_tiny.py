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
    # the CFG calibration (the script's own trajectory builder; the default "cond" is quantize_flux's own path)
    # one quantized row (RTN): a PermuQuant row runs the same quantize_flux call with another method (CI time)
    assert q.main(["--quick", "--calib", "cfg", "--methods", "rtn", "--out", str(out), "--json", str(js),
                   "--grid", str(grid)]) == 0
    d = json.loads(js.read_text())
    rows = d["rows"]
    assert d["setup"]["calib_mode"] == "cfg" and d["setup"]["calib"] == 2  # 2 recorded steps of one trajectory
    assert [(r["format"], r["method"]) for r in rows] == [("bf16", "bf16"), ("nvfp4", "rtn")]
    ref, rtn = rows
    assert math.isinf(ref["psnr"]) and ref["ssim"] == 1.0 and ref["latent_err"] == 0.0
    for r in (rtn,):
        assert 10.0 < r["psnr"] < 100.0 and 0.0 < r["ssim"] < 1.0, r
        assert 0.0 < r["latent_err"] < 1.0 and 0.0 < r["layer_mean"] <= r["layer_worst"] < 1.0, r
        assert r["worst_layer"] in r["layers"] and len(r["layers"]) == 6  # 2 double + 4 single blocks
        assert len(r["step_err"]) == 2 and r["step_err"][-1] == pytest.approx(r["latent_err"])
        assert len(r["psnr_each"]) == 4 and len(r["sites"]) == 35
    assert "| NVFP4 W4A4 | rtn |" in out.read_text() and grid.stat().st_size > 1000


def test_rows_of_parallel_processes_merge_into_one_table(tmp_path, capsys):
    q = _bench()
    assert q.worker_args(["--seeds", "2", "--workers", "20", "--budget=300", "--out", "x.md", "--quick",
                          "--worker-xla-flags=--xla_gpu_autotune_level=0", "--json", "x.json"]) == ["--seeds", "2",
                                                                                                    "--quick"]
    setup = dict(pictures=2, n_single=1, size=64, steps=2, cfg=3.0, accept=None, seeds="1000..1001", calib=1,
                 calib_captions=1, held=1, held_captions=1, clf_train=10, clf_heldout=[1.0, 1.0], wall_s=5.0,
                 backend="cpu", jax="x", device="cpu", init_s=1.0)

    def row(fmt, method, psnr):
        return dict(format=fmt, method=method, psnr=psnr, ssim=0.9, latent_err=0.3, layer_mean=0.01, layer_worst=0.02,
                    worst_layer="single_blocks[0]", colour=1.0, shape=1.0, agree=1.0, accepted="0/35", time=1.0,
                    step_err=[0.1, 0.3], times=dict(quantize_s=1.0, generate_s=2.0, block_errors_s=3.0),
                    psnr_each=[psnr - 1.0, psnr + 1.0], latent_err_each=[0.2, 0.4])

    ref = dict(row("bf16", "bf16", float("inf")), latent_err=0.0, step_err=[0.0, 0.0])
    paths = []
    for k, (fmt, m, sha) in enumerate((("int4-g64", "rtn", "a"), ("nvfp4", "permuquant", "a"), ("nvfp4", "rtn", "b"))):
        p = tmp_path / f"{k}.json"
        p.write_text(json.dumps(dict(setup=dict(setup, ref_sha256=sha), prompts=["a red circle", "x"], seeds=[1, 2],
                                     rows=[ref, row(fmt, m, 20.0 + k)])))
        img = np.full((2, 1, 8, 8, 3), k, np.uint8)
        labels = ["bf16", f"{q.FORMAT_LABELS[fmt]}\n{m}"]
        np.savez(p.with_suffix(".npz"), labels=np.array(labels), images=img)
        paths.append(str(p))
    out, js, grid = tmp_path / "m.md", tmp_path / "m.json", tmp_path / "m.png"
    assert q.main(["--merge", ",".join(paths), "--out", str(out), "--json", str(js), "--grid", str(grid)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert [(r["format"], r["method"]) for r in rows] == [("bf16", "bf16"), ("nvfp4", "rtn"), ("nvfp4", "permuquant"),
                                                          ("int4-g64", "rtn")]
    text = out.read_text()
    assert "DIFFER between processes (2 versions)" in text and "| NVFP4 W4A4 | permuquant | 21.00 |" in text
    assert "k=2" in text and "PSNR 21.00 vs 22.00" in text  # PermuQuant vs the RTN row of its format
    assert "PSNR higher on 0 of 2, mean difference -1.00 +- 0.00 dB" in text
    from PIL import Image

    assert Image.open(grid).size[1] == 4 * (8 * 2 + 2)  # bf16 once + the three rows
    capsys.readouterr()
