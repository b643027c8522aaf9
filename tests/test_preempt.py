"""``benchmarks/preempt.py --kills 3``: a checkpointing run SIGKILLed three times at random
instants (during saves too) and restarted from Orbax's latest complete checkpoint ends with
the uninterrupted run's parameters and IVON state, bit for bit. The kill instants vary with
the machine's timing; the equality must hold whatever they are."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("orbax.checkpoint")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_preempted_run_is_bit_identical():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "preempt.py"), "--kills", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    kills = re.search(
        r"^kills: (\d+) \(during a save: (\d+), during start-up/restore: (\d+)\)", out, re.M
    )
    assert kills is not None, out
    assert int(kills.group(1)) == 3
    assert int(kills.group(2)) + int(kills.group(3)) <= 3
    restores = re.search(r"^restores: (\d+)", out, re.M)
    assert restores is not None and 0 <= int(restores.group(1)) <= 4, out
    diff = re.search(r"^max difference: (\S+)$", out, re.M)
    assert diff is not None and float(diff.group(1)) == 0.0, out
