"""Checkpoint and resume of a Flax NNX model and its ``nnx.Optimizer`` with Orbax.

``nnx.state((model, optimizer))`` holds everything the run needs besides the loop's key: the
parameters (the mean m), the model's other variables (here the Dropout stream's key and
counter), the optimizer's step and IVON's state (g, h, λ, δ, counts, the skip counter). A
first process trains, saves that state with the key, and carries on; a *fresh process*
rebuilds the model and optimizer abstractly (``nnx.eval_shape`` + ``nnx.split``), restores
into that skeleton, merges, and carries on too. The two continuations must agree bit for bit.

The worker below is this very file run as a script (``python tests/test_checkpoint_nnx.py
MODE DIR``) with ``JAX_PLATFORMS=cpu``; it writes what it computed to ``DIR/<mode>.npz``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

ocp = pytest.importorskip("orbax.checkpoint")
nnx = pytest.importorskip("flax.nnx")

N_FIRST = 8  # steps before the checkpoint
N_SECOND = 8  # steps after it
BAD_STEPS = (3, 11)  # NaN batches, one on each side of the checkpoint: both get skipped
FEATURES, HIDDEN, CLASSES, BATCH = 8, 16, 3, 32


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
        self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(jax.nn.relu(self.norm(self.hidden(x)))))


def _make():
    """The model and its optimizer; run for real, or under ``nnx.eval_shape`` to restore."""
    model = MLP(nnx.Rngs(params=0, dropout=1))
    schedule = optax.cosine_decay_schedule(0.2, N_FIRST + N_SECOND)
    tx = ivon_jax.ivon(
        schedule, ess=4.0 * BATCH, hess_init=0.1, b2=0.999, weight_decay=1e-3,
        skip_nonfinite=True,
    )
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, BATCH, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=(4, BATCH)).astype(np.int32)
    return x, y


def _loss(model, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model(x), y))


def _runner():
    from ivon_jax.flax import nnx as ivon_nnx

    vg = ivon_nnx.value_and_grad(_loss)

    @nnx.jit
    def step(model, optimizer, key, x, y):
        loss, grads, hess = vg(key, model, optimizer, x, y)
        optimizer.update(model, grads, hess=hess)
        return loss

    xs, ys = _problem()

    def run(model, optimizer, key, n):
        """n steps; returns the new key and the flat parameters after every step."""
        traj = []
        for _ in range(n):
            i = int(optimizer.step.value)
            x = xs[i % 4] * (np.float32(np.nan) if i in BAD_STEPS else np.float32(1.0))
            key, sub = jax.random.split(key)
            step(model, optimizer, sub, jnp.asarray(x), jnp.asarray(ys[i % 4]))
            traj.append(_flat(nnx.state(model, nnx.Param)))
        return key, np.stack(traj)

    return run


def _flat(tree):
    """All leaves (typed keys as their raw bits), flattened into one float64 vector."""

    def raw(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.ravel(np.asarray(x, np.float64))

    return np.concatenate([raw(x) for x in jax.tree.leaves(tree)])


def _counts(model, optimizer):
    """[optimizer step, IVON count, schedule count, skipped steps, dropout draws]."""
    st = optimizer.opt_state
    return np.asarray(
        [
            optimizer.step.value,
            ivon_jax.find_ivon_states(st)[0].count.value,
            st.inner_state[1].count.value,
            st.skipped.value,
            model.dropout.rngs.count.value,
        ],
        np.int64,
    )


def _worker(mode, directory):
    directory = os.path.abspath(directory)
    run = _runner()
    ckpt = ocp.StandardCheckpointer()
    path = os.path.join(directory, "ckpt")
    if mode == "uninterrupted":
        model, optimizer = _make()
        key, _ = run(model, optimizer, jax.random.key(42), N_FIRST)
        # Everything in one tree: model and optimizer state (nnx.State) and the loop's key.
        ckpt.save(path, {"state": nnx.state((model, optimizer)), "key": key})
        ckpt.wait_until_finished()
        at_checkpoint = _flat([nnx.state((model, optimizer)), key])
        counts_at_checkpoint = _counts(model, optimizer)
        key, traj = run(model, optimizer, key, N_SECOND)
        out = {
            "traj": traj,
            "at_checkpoint": at_checkpoint,
            "counts_at_checkpoint": counts_at_checkpoint,
            "final": _flat([nnx.state((model, optimizer)), key]),
            "counts_final": _counts(model, optimizer),
        }
    else:

        def restore():
            # A skeleton of shapes and dtypes, no arrays allocated: restore into it, merge.
            graphdef, abstract = nnx.split(nnx.eval_shape(_make))
            target = {"state": abstract, "key": jax.eval_shape(lambda: jax.random.key(0))}
            restored = ckpt.restore(path, target)
            return (*nnx.merge(graphdef, restored["state"]), restored["key"])

        model, optimizer, key = restore()
        out = {"restored": _flat([nnx.state((model, optimizer)), key])}
        out["hess_is_array"] = np.asarray(
            all(isinstance(h, jax.Array) for h in jax.tree.leaves(
                ivon_jax.find_ivon_states(optimizer.opt_state)[0].hess
            ))
        )
        key, out["traj"] = run(model, optimizer, key, N_SECOND)
        out["final"] = _flat([nnx.state((model, optimizer)), key])
        out["counts_final"] = _counts(model, optimizer)
        # A careless resume: parameters and optimizer restored, but the model's Dropout
        # stream taken from a freshly built model (it repeats the first masks).
        model, optimizer, key = restore()
        nnx.update(model, nnx.state(_make()[0], nnx.RngState))
        _, out["traj_fresh_dropout"] = run(model, optimizer, key, N_SECOND)
    ckpt.close()
    np.savez(os.path.join(directory, f"{mode}.npz"), **out)


# ---------------------------------------------------------------------------------------------
# The tests.


def _spawn(mode, directory):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), mode, str(directory)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"worker {mode} failed:\n{proc.stdout}\n{proc.stderr}"
    return dict(np.load(os.path.join(directory, f"{mode}.npz")))


def test_nnx_optimizer_resume_in_fresh_process_is_bit_identical(tmp_path):
    full = _spawn("uninterrupted", tmp_path)
    resumed = _spawn("resume", tmp_path)
    # The restore is lossless: parameters, LayerNorm scale, Dropout key and counter, the
    # optimizer step, g, h, λ, δ, the counts and the loop's key all have the saved bits.
    np.testing.assert_array_equal(resumed["restored"], full["at_checkpoint"])
    assert bool(resumed["hess_is_array"])
    max_diff = float(np.max(np.abs(resumed["traj"] - full["traj"])))
    assert max_diff == 0.0, max_diff
    np.testing.assert_array_equal(resumed["final"], full["final"])
    # Step 3 (before the checkpoint at 8) and step 11 (after it) hold NaN batches: each is
    # skipped by IVON (counts lag the optimizer step) but still draws its Dropout mask.
    assert full["counts_at_checkpoint"].tolist() == [8, 7, 7, 1, 8]
    assert full["counts_final"].tolist() == [16, 14, 14, 2, 16]
    assert resumed["counts_final"].tolist() == [16, 14, 14, 2, 16]
    # The run moved, so equality is not vacuous.
    assert float(np.max(np.abs(np.diff(full["traj"], axis=0)))) > 1e-4
    # The model's non-parameter state is part of the run: a fresh Dropout stream changes it.
    assert float(np.max(np.abs(resumed["traj_fresh_dropout"] - full["traj"]))) > 1e-4

if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
