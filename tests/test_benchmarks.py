"""CI runs a tiny version of the performance suite: it must run end to end and report sane
numbers (the full suite is `python benchmarks/perf.py`; timings are never asserted)."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_perf_smoke_runs_and_reports(tmp_path):
    """Without --out, the smoke run writes into a new temporary folder (here under tmp_path,
    through TMPDIR), never over the committed full-run results in benchmarks/results/."""
    committed = (ROOT / "benchmarks" / "results" / "perf.md").read_bytes()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--smoke"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = tmp_path.glob("perf_*")
    assert f"wrote {out / 'perf.md'}" in proc.stdout
    assert (ROOT / "benchmarks" / "results" / "perf.md").read_bytes() == committed
    report = (out / "perf.md").read_text()
    for section in ("Whole train step", "Optimizer alone", "Memory", "compile time", "Noise",
                    "Non-finite guard"):
        assert section in report
    ratios = [float(r) for r in re.findall(r"\| (\d+\.\d+) \|\n", report)]
    assert ratios and all(0.05 < r < 100 for r in ratios), ratios
    # IVON's optimizer state is AdamW's plus λ, δ, β₂ and the guard's count of skipped steps
    # (16 bytes in float32/int32) and one h₀ per parameter leaf (the smoke MLP has 4 leaves:
    # 16 bytes).
    states = [int(s.replace(",", "")) for s in re.findall(r"\| ([\d,]+) \|\n", report)]
    adamw_state, ivon_states = states[0], states[1:]
    assert all(s - adamw_state == 16 + 4 * 4 for s in ivon_states), states


def test_gpu_script_smoke_runs_and_keeps_its_tables_apart(tmp_path):
    """``benchmarks/gpu.sh --smoke DIR`` (tiny sizes, any device) runs the suite and the GPT
    comparison end to end and writes only into DIR, not over the CPU results."""
    cpu_gpt = (ROOT / "benchmarks" / "results" / "gpt_pretrain.csv").read_bytes()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("perf.md", "gpt_pretrain.csv", "gpt_pretrain.txt"):
        assert (tmp_path / name).is_file(), name
    assert "IVON/AdamW tokens/s ratio" in proc.stdout
    assert "**Whole train step**" in proc.stdout  # the perf tables are printed at the end
    assert (ROOT / "benchmarks" / "results" / "gpt_pretrain.csv").read_bytes() == cpu_gpt
