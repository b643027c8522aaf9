"""Strict JAX settings for the whole suite: implicit dtype or rank promotion is a bug.

The suite also leaves the checkout as it found it: a session fixture compares ``git status``
(and the content of the files it lists) before the first test and after the last, and reports
an error naming the files if a test, a benchmark's quick mode or a notebook run wrote into the
tree (skipped outside a git checkout).
"""

import os
from pathlib import Path

# 8 simulated CPU devices for pmap/shard_map tests; must be set before JAX starts its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import pytest
import worktree

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def tree_is_left_unchanged():
    before = worktree.snapshot(ROOT)
    yield
    after = worktree.snapshot(ROOT)
    if before is None or after is None:
        return  # not a git checkout: nothing to compare
    changed = worktree.changes(before, after)
    assert not changed, (
        "the test run changed the checkout (write to a temporary folder instead): "
        + ", ".join(changed)
    )
