"""Checkpoint and resume with Orbax: nothing is lost, not a bit.

A training run saves (params, opt_state, step, key) mid-way with an Orbax
``CheckpointManager``; a *fresh process* restores it and continues. Everything IVON needs is
in that tuple: σ comes from the state (h, λ, δ), the momentum debiasing and the schedule from
the state's counts, the noise from the key. So on the same device count the continued
trajectory must equal the uninterrupted one exactly (maximum absolute difference 0): the same
compiled step runs on the same input bits.

Restoring a state sharded over 8 devices onto a 4-device mesh continues the same run, but
float32 sums over the batch (the loss and its gradient) are then split over 4 instead of 8
devices and added in another order; elementwise IVON maths and the noise (a function of the
key and the leaves' shapes, not of the sharding) are unchanged. The two trajectories agree to
float32 rounding (relative ~1e-7 per step, a dozen steps here): to 1e-5.

The worker below is this very file run as a script (``python tests/test_checkpoint.py MODE
DIR``), with ``JAX_PLATFORMS=cpu`` and ``--xla_force_host_platform_device_count`` set to 8
or 4; it writes what it computed to ``DIR/<mode>.npz``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

ocp = pytest.importorskip("orbax.checkpoint")

N_FIRST = 12  # steps before the checkpoint
N_SECOND = 12  # steps after it
BAD_STEPS = (5, 17)  # NaN batches, one on each side of the checkpoint: both get skipped
FEATURES, CLASSES, BATCH = 16, 4, 64


# ---------------------------------------------------------------------------------------------
# The training run, shared by the worker processes.


def _problem():
    """Synthetic 4-class softmax regression: (x, y) for 4 batches of 64, in numpy."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCH, FEATURES)).astype(np.float32)
    w_true = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    y = np.argmax(x @ w_true + 0.5 * rng.normal(size=(4 * BATCH, CLASSES)), axis=1)
    return x.reshape(4, BATCH, FEATURES), y.reshape(4, BATCH).astype(np.int32)


def _loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _optimizer():
    schedule = optax.cosine_decay_schedule(0.2, N_FIRST + N_SECOND)
    return ivon_jax.ivon(
        schedule, ess=4.0 * BATCH, hess_init=0.1, b2=0.999, weight_decay=1e-3,
        skip_nonfinite=True,
    )


def _shardings(mesh, tree):
    """w-shaped (2-d) leaves split over the mesh by rows, everything else replicated."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def spec(x):
        return NamedSharding(mesh, P("d", None) if len(x.shape) == 2 else P())

    return jax.tree.map(spec, tree)


def _setup(num_devices):
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == num_devices, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    opt = _optimizer()
    params0 = {
        "w": jnp.zeros((FEATURES, CLASSES), jnp.float32),
        "b": jnp.zeros((CLASSES,), jnp.float32),
    }
    key0 = jax.random.key(42)
    abstract = {
        "params": jax.eval_shape(lambda: params0),
        "opt_state": jax.eval_shape(opt.init, params0),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "key": jax.eval_shape(lambda: key0),
    }
    shardings = _shardings(mesh, abstract)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    data_sharding = NamedSharding(mesh, P("d"))
    xs, ys = _problem()
    vg = ivon_jax.value_and_grad(_loss)

    def step_fn(train, x, y):
        key, sub = jax.random.split(train["key"])
        loss, grads, hess = vg(sub, train["params"], train["opt_state"], x, y)
        updates, opt_state = opt.update(grads, train["opt_state"], train["params"], hess=hess)
        params = optax.apply_updates(train["params"], updates)
        new = {"params": params, "opt_state": opt_state, "step": train["step"] + 1, "key": key}
        return new, loss

    step = jax.jit(step_fn, out_shardings=(shardings, NamedSharding(mesh, P())))

    def batch(i):
        x = xs[i % 4] * (np.float32(np.nan) if i in BAD_STEPS else np.float32(1.0))
        return jax.device_put(x, data_sharding), jax.device_put(ys[i % 4], data_sharding)

    def fresh():
        init = jax.jit(
            lambda: {
                "params": params0,
                "opt_state": opt.init(params0),
                "step": jnp.zeros([], jnp.int32),
                "key": key0,
            },
            out_shardings=shardings,
        )
        return init()

    def run(train, n):
        """n steps from `train`; returns the final state and the params after every step."""
        traj = []
        for _ in range(n):
            train, _ = step(train, *batch(int(train["step"])))
            traj.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(train["params"])]))
        return train, np.stack(traj)

    return abstract, fresh, run


def _flat_state(train):
    """All numeric leaves of a train state (the key as its raw bits), flattened, float64."""
    train = dict(train, key=jax.random.key_data(train["key"]))
    return np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(train)]
    )


def _counts(train):
    """[loop step, IVON count, schedule count, skipped steps]."""
    st = train["opt_state"]
    return np.asarray(
        [train["step"], st.inner_state[0].count, st.inner_state[1].count, st.skipped], np.int64
    )


def _worker(mode, directory):
    directory = os.path.abspath(directory)
    num_devices = jax.device_count()
    abstract, fresh, run = _setup(num_devices)
    mngr = ocp.CheckpointManager(os.path.join(directory, "ckpt"))
    if mode == "uninterrupted":
        train, _ = run(fresh(), N_FIRST)
        mngr.save(int(train["step"]), args=ocp.args.StandardSave(train))
        mngr.wait_until_finished()
        at_checkpoint = _flat_state(train)
        counts_at_checkpoint = _counts(train)
        train, traj2 = run(train, N_SECOND)
        out = {
            "traj": traj2,
            "at_checkpoint": at_checkpoint,
            "final": _flat_state(train),
            "counts_at_checkpoint": counts_at_checkpoint,
            "counts_final": _counts(train),
        }
    else:
        step = mngr.latest_step()
        train = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        restored = _flat_state(train)
        devices = {len(x.sharding.device_set) for x in jax.tree.leaves(train)}
        w_shards = len(train["opt_state"].inner_state[0].hess["w"].addressable_shards)
        final, traj2 = run(train, N_SECOND)
        out = {
            "traj": traj2,
            "restored": restored,
            "final": _flat_state(final),
            "counts_final": _counts(final),
            "step": np.asarray(step),
            "devices": np.asarray(sorted(devices)),
            "w_shards": np.asarray(w_shards),
            "key_is_typed": np.asarray(
                jax.dtypes.issubdtype(train["key"].dtype, jax.dtypes.prng_key)
            ),
        }
        if mode == "resume_controls":
            # What a careless resume would do: lose the step counts, or draw a fresh key.
            zero = jnp.zeros([], jnp.int32)
            no_count = dict(
                train, opt_state=optax.tree_utils.tree_set(train["opt_state"], count=zero)
            )
            _, out["traj_lost_count"] = run(no_count, N_SECOND)
            new_key = dict(train, key=jax.random.key(43))
            _, out["traj_new_key"] = run(new_key, N_SECOND)
    mngr.close()
    np.savez(os.path.join(directory, f"{mode}.npz"), **out)


# ---------------------------------------------------------------------------------------------
# The tests.


def _spawn(mode, directory, num_devices):
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), mode, str(directory)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"worker {mode} failed:\n{proc.stdout}\n{proc.stderr}"
    return dict(np.load(os.path.join(directory, f"{mode}.npz")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ivon_ckpt")
    return directory, _spawn("uninterrupted", directory, 8)


def test_resume_in_fresh_process_is_bit_identical(uninterrupted):
    directory, full = uninterrupted
    resumed = _spawn("resume_controls", directory, 8)
    assert int(resumed["step"]) == N_FIRST
    assert bool(resumed["key_is_typed"])
    assert resumed["devices"].tolist() == [8]  # every restored leaf lives on the 8-device mesh
    assert int(resumed["w_shards"]) == 8  # and the 2-d statistics are split over it
    # The restore is lossless: params, g, h, counts, skipped, step and key bits all equal.
    np.testing.assert_array_equal(resumed["restored"], full["at_checkpoint"])
    max_diff = float(np.max(np.abs(resumed["traj"] - full["traj"])))
    assert max_diff == 0.0, max_diff
    np.testing.assert_array_equal(resumed["final"], full["final"])
    # Step 5 (before the checkpoint at 12) and step 17 (after it) hold NaN batches: each is
    # skipped, so the counts lag the loop step by the skips, on both sides of the restore.
    assert full["counts_at_checkpoint"].tolist() == [12, 11, 11, 1]
    assert full["counts_final"].tolist() == [24, 22, 22, 2]
    assert resumed["counts_final"].tolist() == [24, 22, 22, 2]
    # The run moved (so equality is not vacuous).
    assert float(np.max(np.abs(np.diff(full["traj"], axis=0)))) > 1e-4
    # Losing the counts (momentum debiasing, cosine schedule) or the key changes the run.
    assert float(np.max(np.abs(resumed["traj_lost_count"] - full["traj"]))) > 1e-4
    assert float(np.max(np.abs(resumed["traj_new_key"] - full["traj"]))) > 1e-4


def test_restore_8_device_state_onto_4_device_mesh(uninterrupted):
    directory, full = uninterrupted
    resumed = _spawn("resume", directory, 4)
    assert resumed["devices"].tolist() == [4]
    assert int(resumed["w_shards"]) == 4
    # Restoring onto another mesh moves bits, it does not change them.
    np.testing.assert_array_equal(resumed["restored"], full["at_checkpoint"])
    # Continuing differs only by the order of float32 batch sums (see the module docstring).
    np.testing.assert_allclose(resumed["traj"], full["traj"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(resumed["final"], full["final"], rtol=1e-5, atol=1e-5)


def test_in_process_round_trip_of_nested_state(tmp_path):
    """Masked + chained + injected hyper-parameters + skip wrapper, bfloat16 params, typed
    key: the restored tree has the same structure, dtypes and bits."""
    params = {
        "w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32).reshape(2, 3).astype(jnp.bfloat16),
        "b": jnp.array([0.5, -0.25], jnp.float32),
        "frozen": jnp.arange(3, dtype=jnp.int32),
    }
    mask = {"w": True, "b": True, "frozen": False}
    with jax.numpy_dtype_promotion("standard"):
        opt = ivon_jax.skip_nonfinite(
            optax.masked(
                optax.chain(
                    optax.clip_by_global_norm(1.0),
                    optax.inject_hyperparams(ivon_jax.ivon)(learning_rate=0.1, ess=10.0),
                ),
                mask, mask_compatible_extra_args=True,
            )
        )
        state = opt.init(params)
        frozen = jnp.zeros(3, jnp.int32)
        grads = {"w": jnp.full((2, 3), 0.5, jnp.bfloat16), "b": jnp.ones(2), "frozen": frozen}
        hess = {"w": jnp.full((2, 3), 2.0), "b": jnp.full(2, 3.0), "frozen": frozen}
        _, state = opt.update(grads, state, params, hess=hess)
    train = {"params": params, "opt_state": state, "step": jnp.asarray(7, jnp.int32),
             "key": jax.random.key(3, impl="rbg")}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", train)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, train))
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(train)
    assert restored["key"].dtype == train["key"].dtype  # key<rbg>, not raw uint32
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(train["key"])
    )
    for a, b in zip(
        jax.tree.leaves(dict(restored, key=None)), jax.tree.leaves(dict(train, key=None)),
        strict=True,
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert restored["params"]["w"].dtype == jnp.bfloat16
    st = ivon_jax.find_ivon_states(restored["opt_state"])[0]
    assert st.hess["w"].dtype == jnp.float32 and int(st.count) == 1
    # The restored state samples exactly as the original.
    key = jax.random.key(5)
    a = ivon_jax.sample_params(key, restored["params"], restored["opt_state"])
    b = ivon_jax.sample_params(key, params, state)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
