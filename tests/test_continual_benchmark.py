"""CI runs a tiny version of the continual-learning benchmark (benchmarks/continual.py): it
must run end to end, write what it promises, choose on validation only and install the
previous posterior as the prior. Its numbers are evidence only at full size; here two epochs
per task check the plumbing."""

import csv
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
METHODS = {"IVON + posterior prior", "IVON, prior at task start", "AdamW"}
N_TASKS = 3
PAIRS = N_TASKS * (N_TASKS + 1) // 2  # (after task t, task j ≤ t)


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def load_benchmark():
    spec = importlib.util.spec_from_file_location("continual_bench", BENCH / "continual.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_continual_quick(tmp_path):
    committed = {p.name: p.read_bytes() for p in (BENCH / "results").glob("continual.*")}
    out = run(BENCH / "continual.py", "--quick", "--out", tmp_path)
    assert {p.name: p.read_bytes() for p in (BENCH / "results").glob("continual.*")} == committed

    with open(tmp_path / "continual.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"phase", "method", "lr", "wd", "seed", "after_task", "eval_task",
                            "split", "predictive", "acc", "nll"}
    assert {r["method"] for r in rows} == METHODS
    for r in rows:
        assert 0 <= float(r["acc"]) <= 100 and np.isfinite(float(r["nll"]))
        assert float(r["nll"]) > 0 and int(r["eval_task"]) <= int(r["after_task"]) < N_TASKS
        # Tuning reads validation splits only; the test splits are read by the final runs.
        assert r["split"] == ("val" if r["phase"] == "tune" else "test")
        assert r["predictive"] in (("mean", "mc") if r["method"].startswith("IVON") else
                                   ("mean",))
    # --quick: 2 configurations x 1 tuning seed, then 2 final seeds, per method; every run
    # scored after every task on every task seen, IVON with 2 predictives (mean, MC).
    for method in METHODS:
        n_pred = 2 if method.startswith("IVON") else 1
        for phase in ("tune", "final"):
            sel = [r for r in rows if r["method"] == method and r["phase"] == phase]
            assert len(sel) == 2 * PAIRS * n_pred, (method, phase, len(sel))
        # The final configuration is the tuning one with the best mean validation accuracy
        # over all tasks after the last task (IVON: its MC predictive).
        which = "mean" if method == "AdamW" else "mc"
        val = {}
        for r in rows:
            if (r["method"], r["phase"], r["predictive"], r["after_task"]) == (
                    method, "tune", which, str(N_TASKS - 1)):
                val.setdefault((r["lr"], r["wd"]), []).append(float(r["acc"]))
        best = max(val, key=lambda c: np.mean(val[c]))
        finals = {(r["lr"], r["wd"]) for r in rows
                  if r["method"] == method and r["phase"] == "final"}
        assert finals == {best}, (method, val, finals)

    # The check of what set_prior installed passed (the script stops otherwise) at every new
    # task, and the report says so.
    md = (tmp_path / "continual.md").read_text()
    for t in range(1, N_TASKS):
        assert f"- task {t}: prior mean = previous weights (max |m0 - m| 0.0e+00)" in md
    assert md in out
    for method in METHODS:
        assert f"| {method} |" in md
    assert "Accuracy matrices" in md and "set_prior" in md
    assert (tmp_path / "continual.png").stat().st_size > 10_000


def test_quick_without_out_uses_a_new_temporary_folder(tmp_path, monkeypatch):
    """Without --out a --quick run writes into a fresh temporary folder, never into
    benchmarks/results (the full run's default)."""
    bench = load_benchmark()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    quick = bench.output_folder(quick=True, out=None)
    assert quick.parent == tmp_path and quick.is_dir() and not any(quick.iterdir())
    assert bench.output_folder(quick=True, out=None) != quick  # a new one each time
    assert bench.output_folder(quick=False, out=None) == BENCH / "results"
    assert bench.output_folder(quick=True, out=tmp_path / "x") == tmp_path / "x"
