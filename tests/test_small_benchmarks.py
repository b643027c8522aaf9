"""CI runs tiny versions of the small-task benchmarks (main job, paper table, overfitting
study): they must run end to end and write what they promise. Their numbers are evidence only
at full size (README); here a few epochs check the plumbing, never a timing."""

import csv
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(*args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(text):
    """Markdown rows as {method: [cells]} (header and separator rows dropped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| method", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def mean_of(cell):
    return float(cell.split("±")[0])


def test_main_job_tiny():
    out = run(BENCH / "classify.py", "--epochs", "2", "--seeds", "2", "--samples", "4",
              "--timing-reps", "5")
    rows = table_rows(out)
    assert set(rows) == {"AdamW", "IVON@mean", "IVON (4 samples)"}, out
    for cells in rows.values():
        acc, nll, ece, brier = map(mean_of, cells)
        assert 0 <= acc <= 100 and np.isfinite(nll) and nll > 0 and 0 <= ece <= 1
        assert 0 <= brier <= 2
    # Two epochs of training beat chance (10 %) on MNIST-1D.
    assert mean_of(rows["AdamW"][0]) > 20, out
    ratio = float(re.search(r"IVON / AdamW: ([\d.]+)x", out).group(1))
    assert 0.05 < ratio < 100


def test_paper_table_quick(tmp_path):
    run(BENCH / "paper_table.py", "--quick", "--tasks", "regression-1d", "--out", tmp_path)
    with open(tmp_path / "paper_table.csv") as f:
        rows = list(csv.DictReader(f))
    tune = [r for r in rows if r["phase"] == "tune"]
    test = [r for r in rows if r["phase"] == "test"]
    # --quick: 2 configurations x 2 tuning seeds per optimizer, 6 final runs, 2 ensembles.
    assert len(tune) == 3 * 2 * 2 and all(r["split"] == "val" for r in tune)
    by_method = {}
    for r in test:
        by_method.setdefault(r["method"], []).append(r)
    assert {k: len(v) for k, v in by_method.items()} == {
        "AdamW": 6, "SGD": 6, "IVON@mean": 6, "IVON": 6,
        next(k for k in by_method if k.startswith("Deep ensemble")): 2, "Multi-IVON (x3)": 2,
    }
    # The chosen configuration is the one with the lowest mean validation NLL.
    for method in ("AdamW", "SGD", "IVON"):
        nll = {}
        for r in tune:
            if r["method"] == method:
                v = float(r["nll"])
                nll.setdefault((r["lr"], r["reg"]), []).append(v if np.isfinite(v) else np.inf)
        best = min(nll, key=lambda c: np.mean(nll[c]))
        assert {(r["lr"], r["reg"]) for r in by_method[method]} == {best}
    md = (tmp_path / "paper_table.md").read_text()
    assert "regression-1d" in md and "Multi-IVON" in md
    assert (tmp_path / "paper_table.png").stat().st_size > 10_000


def test_overfit_tiny(tmp_path):
    out = run(BENCH / "overfit.py", "--epochs", "4", "--eval-every", "2", "--seeds", "2",
              "--samples", "4", "--out", tmp_path)
    with open(tmp_path / "overfit.csv") as f:
        rows = list(csv.DictReader(f))
    # 3 methods x 2 seeds x 2 evaluation points.
    assert len(rows) == 12
    assert {r["method"] for r in rows} == {"AdamW", "IVON@mean", "IVON"}
    assert all(np.isfinite(float(r["test_nll"])) for r in rows)
    assert set(table_rows(out)) == {"AdamW", "IVON@mean", "IVON"}
    assert (tmp_path / "overfit.png").stat().st_size > 10_000


def test_hparam_sweep_quick(tmp_path):
    """Without --out, --quick writes into a new temporary folder (under tmp_path through
    TMPDIR), never over the committed results in benchmarks/results/."""
    committed = (BENCH / "results" / "hparam_sweep.csv").read_bytes()
    run(BENCH / "hparam_sweep.py", "--quick", env={**os.environ, "TMPDIR": str(tmp_path)})
    assert (BENCH / "results" / "hparam_sweep.csv").read_bytes() == committed
    (out,) = tmp_path.glob("hparam_sweep_*")
    with open(out / "hparam_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2  # 3 variants x 2 seeds
    assert {r["variant"] for r in rows} >= {"chosen", "constant lr (no decay)"}
    for r in rows:
        assert 0 <= float(r["val_acc"]) <= 100 and float(r["sigma_p50"]) > 0
    md = (out / "hparam_sweep.md").read_text()
    assert md.count("\n| ") == 3 + 1  # header + 3 variants
