"""One process of a two-process ``jax.distributed`` run that checkpoints with Orbax (see
``tests/test_checkpoint_multiprocess.py``).

Eight CPU devices, four per process, one mesh axis ``d`` across both processes. The 2-d
parameters and their IVON statistics are split by rows over the mesh (each process holds half
of every matrix), everything else is replicated; each process feeds its half of every batch.

Modes: ``first`` trains N_FIRST steps and saves (every process writes its shards);
``resume`` restores the latest checkpoint in fresh processes and trains N_SECOND more;
``full`` trains N_FIRST + N_SECOND steps without stopping. ``resume`` and ``full`` write the
final state, gathered from both processes, to ``DIR/<mode>.npz`` (process 0).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ivon_jax

N_FIRST, N_SECOND = 6, 6
FEATURES, HIDDEN, CLASSES, BATCH = 16, 32, 4, 64
DEVICES = 8


def problem():
    """Synthetic 4-class data: (x, y) for 4 batches of 64, in numpy."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * BATCH, FEATURES)).astype(np.float32)
    w_true = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    y = np.argmax(x @ w_true + 0.5 * rng.normal(size=(4 * BATCH, CLASSES)), axis=1)
    return x.reshape(4, BATCH, FEATURES), y.reshape(4, BATCH).astype(np.int32)


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def main(mode: str, directory: str, process_id: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    assert jax.device_count() == DEVICES and jax.local_device_count() == DEVICES // 2
    mesh = jax.make_mesh((DEVICES,), ("d",))
    opt = ivon_jax.ivon(
        optax.cosine_decay_schedule(0.2, N_FIRST + N_SECOND),
        ess=4.0 * BATCH,
        hess_init=0.1,
        b2=0.999,
        weight_decay=1e-3,
    )
    vg = ivon_jax.value_and_grad(loss_fn)

    def fresh():
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {
            "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) / 4.0,
            "b1": jnp.zeros(HIDDEN),
            "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / 4.0,
            "b2": jnp.zeros(CLASSES),
        }
        return {
            "params": params,
            "opt_state": opt.init(params),
            "step": jnp.zeros([], jnp.int32),
            "key": jax.random.key_data(jax.random.key(42)),
        }

    # Matrices split by rows over both processes' devices; vectors and scalars replicated.
    abstract = jax.eval_shape(fresh)
    shardings = jax.tree.map(
        lambda a: NamedSharding(mesh, P("d", None) if a.ndim == 2 else P()), abstract
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )

    def step_fn(train, x, y):
        key, sub = jax.random.split(jax.random.wrap_key_data(train["key"]))
        _, grads, hess = vg(sub, train["params"], train["opt_state"], x, y)
        updates, opt_state = opt.update(grads, train["opt_state"], train["params"], hess=hess)
        return {
            "params": optax.apply_updates(train["params"], updates),
            "opt_state": opt_state,
            "step": train["step"] + 1,
            "key": jax.random.key_data(key),
        }

    step = jax.jit(step_fn, out_shardings=shardings)
    data = NamedSharding(mesh, P("d"))
    xs, ys = problem()
    half = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)

    def run(train, n):
        for _ in range(n):
            i = int(train["step"]) % 4  # the data position is the loop step
            x = jax.make_array_from_process_local_data(data, xs[i][half])
            y = jax.make_array_from_process_local_data(data, ys[i][half])
            train = step(train, x, y)
        return train

    mngr = ocp.CheckpointManager(os.path.join(directory, "ckpt"))
    if mode == "resume":
        latest = mngr.latest_step()
        assert latest == N_FIRST, latest
        train = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        w1 = ivon_jax.find_ivon_states(train["opt_state"])[0].hess["w1"]
        assert w1.sharding.is_equivalent_to(shardings["params"]["w1"], 2)
        # Each process holds its own 4 row blocks, not the whole matrix.
        assert len(w1.addressable_shards) == DEVICES // 2
        assert len(w1.sharding.device_set) == DEVICES
        train = run(train, N_SECOND)
    else:
        train = run(jax.jit(fresh, out_shardings=shardings)(), N_FIRST)
        if mode == "first":
            mngr.save(N_FIRST, args=ocp.args.StandardSave(train))
            mngr.wait_until_finished()
        else:
            train = run(train, N_SECOND)
    mngr.close()
    if mode != "first":
        full = multihost_utils.process_allgather(train, tiled=True)
        if process_id == 0:
            flat = jax.tree_util.tree_flatten_with_path(full)[0]
            np.savez(
                os.path.join(directory, f"{mode}.npz"),
                **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat},
            )
    jax.distributed.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("first", "resume", "full"))
    parser.add_argument("directory")
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    a = parser.parse_args()
    main(a.mode, os.path.abspath(a.directory), a.process_id, a.port)
