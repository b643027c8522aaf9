"""The Equinox example (benchmarks/equinox_example.py) runs end to end in its quick mode and
prints what the Equinox guide shows: a table of test accuracy, NLL and ECE for the prediction
at the mean and for IVON's MC predictive. Five epochs check the plumbing; the only claim on
the numbers is that they are finite, in range, and well above chance (10 % on digits)."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("equinox")
pytest.importorskip("sklearn")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_equinox_example_quick():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "equinox_example.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^epoch +5 +train loss [\d.]+$", out, re.M), out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| prediction"):
            name, *cells = (c.strip() for c in line.strip("|").split("|"))
            rows[name] = [float(c) for c in cells]
    assert set(rows) == {"mean", "IVON MC (16 samples)"}, out
    for acc, nll, ece in rows.values():
        assert np.isfinite([acc, nll, ece]).all(), out
        assert 0 <= acc <= 100 and nll > 0 and 0 <= ece <= 1, out
        # Five epochs reach about 95 % on digits; chance is 10 %.
        assert acc > 60, out
