"""The GPT example's two scripts run end to end in tiny versions and write the CSVs they promise
(the real runs are `python benchmarks/gpt_tune.py` and `python benchmarks/gpt_pretrain.py`).

The subprocesses inherit conftest's 8 simulated devices, so the batches are multiples of 8.
"""

import csv
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_gpt_tune_quick_writes_every_configuration(tmp_path):
    out = _run("gpt_tune.py", "--quick", "--out", str(tmp_path))
    rows = _rows(tmp_path / "gpt_tune.csv")
    assert [r["optimizer"] for r in rows] == ["AdamW", "AdamW", "IVON", "IVON"]
    assert len({r["lr"] for r in rows if r["optimizer"] == "IVON"}) == 2
    for r in rows:
        assert math.isfinite(float(r["tune_loss"])) and float(r["seconds"]) >= 0
    for r in rows[2:]:  # IVON's fixed settings and σ are recorded
        assert float(r["ess"]) > 0 and float(r["hess_init"]) > 0 and float(r["wd"]) == 1e-6
        assert float(r["ivon_sigma_median"]) > 0
    assert "best per optimizer" in out and "IVON:" in out and "AdamW:" in out


def test_gpt_pretrain_tiny_two_seeds(tmp_path):
    out = _run(
        "gpt_pretrain.py", "--steps", "4", "--layers", "1", "--width", "32", "--heads", "2",
        "--seq", "16", "--batch", "8", "--eval-every", "2", "--seeds", "0", "1",
        "--corpus-mb", "0.5", "--out", str(tmp_path),
    )
    rows = _rows(tmp_path / "gpt_pretrain.csv")
    got = {(int(r["seed"]), r["optimizer"], int(r["step"])) for r in rows}
    want = {(s, o, t) for s in (0, 1) for o in ("AdamW", "IVON") for t in (2, 4)}
    assert got == want and len(rows) == len(want)
    assert all(math.isfinite(float(r["val_loss"])) for r in rows)
    # Different seeds: different init and data, so different curves.
    final = {(int(r["seed"]), r["optimizer"]): float(r["val_loss"]) for r in rows
             if r["step"] == "4"}
    assert final[0, "AdamW"] != final[1, "AdamW"]
    assert "mean ± std" in out and "tokens/s ratio" in out
    assert (tmp_path / "gpt_pretrain.png").exists()


def test_gpt_defaults_quick_tunes_only_the_learning_rate(tmp_path):
    out = _run("gpt_defaults.py", "--quick", "--out", str(tmp_path))
    rows = _rows(tmp_path / "gpt_defaults.csv")
    assert [float(r["lr"]) for r in rows] == [0.3, 1.0]
    for r in rows:
        assert int(r["steps"]) == 5 and float(r["ess"]) > 0
        assert math.isfinite(float(r["tune_loss"])) and float(r["sigma_p50"]) > 0
        # β₂ = 1 - 2/T: after all T steps h₀'s weight is (1 - 2/5)^5.
        assert abs(float(r["h0_weight"]) - 0.6**5) < 1e-4
    best = min(rows, key=lambda r: float(r["tune_loss"]))
    md = (tmp_path / "gpt_defaults.md").read_text()
    assert f"(lr {float(best['lr']):g})" in md and md.strip() in out
