"""A sharded checkpoint written by two ``jax.distributed`` processes, restored by two fresh
ones, continues bit for bit like an uninterrupted two-process run.

Each phase is two worker processes (``tests/checkpoint_worker.py``, 4 CPU devices each, gloo
collectives, a free port): ``first`` trains and saves with Orbax (each process writes the
shards it holds), ``resume`` restores in new processes and continues, ``full`` is the
reference. The same compiled step on the same 8-device mesh sees the same bits, so the final
parameters, IVON state, step and key must be equal, not close.
"""

from __future__ import annotations

import os

import distributed_common as C
import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_worker.py")


def _phase(mode: str, directory) -> None:
    C.run_two_processes(
        lambda i, port: [WORKER, mode, str(directory), "--process-id", str(i), "--port",
                         str(port)],
        mode,
    )


def test_two_process_sharded_checkpoint_resumes_bit_identically(tmp_path):
    _phase("first", tmp_path)
    _phase("resume", tmp_path)
    _phase("full", tmp_path)
    resumed = np.load(tmp_path / "resume.npz")
    full = np.load(tmp_path / "full.npz")
    assert sorted(resumed.files) == sorted(full.files)
    for k in full.files:
        assert resumed[k].dtype == full[k].dtype, k
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    assert int(full["['step']"]) == 12
    assert full["['params']['w1']"].shape == (16, 32)  # gathered from both processes
    # The run moved, so equality is not vacuous.
    assert float(np.max(np.abs(full["['opt_state'].inner_state[0].hess['w1']"] - 0.1))) > 1e-3
