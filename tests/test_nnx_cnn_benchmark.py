"""The NNX CNN benchmark's quick mode runs end to end and writes the rows it promises.

One epoch checks the plumbing (NNX train/eval modes, BatchNorm, Dropout, IVON's NNX path,
the protocol's bookkeeping), never the numbers: those are evidence only at full size."""

import csv
import json
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_nnx_cnn_quick(tmp_path):
    kwargs = {"hess_init": 0.2}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nnx_cnn.py"), "--quick", "--task", "digits",
         "--ivon-kwargs", json.dumps(kwargs), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Non-default IVON arguments put a suffix on the file names.
    stem = "nnx_cnn_digits_hess_init=0.2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.csv", f"{stem}.md"]
    with open(tmp_path / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "task", "data", "epochs", "batch", "steps", "phase", "method", "lr", "wd", "seed",
        "split", "acc", "nll", "ece", "h_p50", "sigma_p50", "frac_h_learned",
        "sigma_prior_ratio_p50", "ivon_kwargs", "seconds"]
    tune = [r for r in rows if r["phase"] == "tune"]
    test = [r for r in rows if r["phase"] == "test"]
    # --quick: 2 configurations x 1 tuning seed per optimizer; 1 test seed, IVON scored twice.
    assert [(r["method"], float(r["lr"])) for r in tune] == [
        ("AdamW", 1e-3), ("AdamW", 1e-3), ("IVON", 0.25), ("IVON", 0.5)]
    assert [float(r["wd"]) for r in tune[:2]] == [1e-2, 3e-1] and tune[2]["wd"] == ""
    assert all(r["split"] == "val" and r["epochs"] == "1" for r in tune)
    assert [r["method"] for r in test] == ["AdamW", "IVON@mean", "IVON (4 samples)"]
    assert all(r["split"] == "test" and r["seed"] == "1" for r in test)
    for r in rows:
        assert 0 <= float(r["acc"]) <= 100 and 0 <= float(r["ece"]) <= 1
        assert np.isfinite(float(r["nll"])) and float(r["nll"]) > 0
        assert json.loads(r["ivon_kwargs"]) == kwargs
    # The chosen configuration is the lowest validation NLL of each optimizer's grid.
    for method in ("AdamW", "IVON"):
        cands = [r for r in tune if r["method"] == method]
        best = min(cands, key=lambda r: float(r["nll"]))
        chosen = [r for r in test if r["method"].startswith(method)]
        assert {(r["lr"], r["wd"]) for r in chosen} == {(best["lr"], best["wd"])}
    # IVON's final state is summarised: σ > 0 and h's median finite.
    for r in test[1:]:
        assert float(r["sigma_p50"]) > 0 and np.isfinite(float(r["h_p50"]))
        assert 0 <= float(r["frac_h_learned"]) <= 1
    md = (tmp_path / f"{stem}.md").read_text()
    assert "hess_init=0.2" in md and "| IVON (4 samples) | 1 |" in md and "NOT evidence" in md


def test_nnx_cnn_quick_refuses_results_dir():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "nnx_cnn.py"), "--quick", "--out",
         str(ROOT / "benchmarks" / "results")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "never writes" in proc.stderr
