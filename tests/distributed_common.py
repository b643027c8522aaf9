"""A small data-parallel IVON problem shared by the distributed tests and their worker processes.

Eight devices, each with K micro-batches padded to a common size and a mask of valid rows
(the numbers of valid rows differ, so the B_j weighting matters). Run as a script, it is one
process of a ``jax.distributed`` run (see ``tests/test_distributed.py``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ivon_jax

DEVICES, MICRO, ROWS, D_IN, HIDDEN, CLASSES = 8, 2, 4, 6, 16, 3
SAMPLES, STEPS = 2, 5


def run_two_processes(argv: Callable[[int, int], list[str]], what: str = "") -> None:
    """Runs ``argv(process_id, port)`` as two processes with 4 CPU devices each on a free
    port (a ``jax.distributed`` pair) and fails, with their output, unless both exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen([sys.executable, *argv(i, port)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), f"{what}:\n" + "\n".join(logs)[-6000:]


def problem(seed: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(STEPS, DEVICES, MICRO, ROWS, D_IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=(STEPS, DEVICES, MICRO, ROWS)).astype(np.int32)
    sizes = rng.integers(1, ROWS + 1, size=(STEPS, DEVICES, MICRO))
    mask = (np.arange(ROWS)[None, None, None, :] < sizes[..., None]).astype(np.float32)
    params = {
        "w1": (rng.normal(size=(D_IN, HIDDEN)) * 0.5).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.normal(size=(HIDDEN, CLASSES)) * 0.5).astype(np.float32),
    }
    return params, (x, y, mask), sizes.astype(np.float32)


def loss_fn(params, mb):
    """Mean cross-entropy over the valid rows of one micro-batch."""
    x, y, mask = mb
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    ce = optax.softmax_cross_entropy_with_integer_labels(h @ params["w2"], y)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


OPT = ivon_jax.ivon(0.05, ess=200.0, hess_init=0.5, b2=0.999, weight_decay=1e-3)
ACC = ivon_jax.accumulated_value_and_grad(loss_fn, num_samples=SAMPLES, axis_name="data")


def device_step(params, state, key, mbs, sizes):
    """The per-device step: the same function under pmap, shard_map and vmap."""
    loss, grads, hess = ACC(key, params, state, mbs, sizes)
    updates, state = OPT.update(grads, state, params, hess=hess)
    return optax.apply_updates(params, updates), state, loss


def shard_map_step(mesh):
    spec = P("data")

    def body(params, state, key, mbs, sizes):
        # shard_map keeps the device axis with size 1 in each block: drop it.
        mbs, sizes = jax.tree.map(lambda a: a[0], (mbs, sizes))
        return device_step(params, state, key, mbs, sizes)

    f = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(), P(), spec, spec), out_specs=(P(), P(), P())
    )
    return jax.jit(f)


def train_shard_map(mesh, params, data, sizes, key, put):
    """Runs STEPS steps; ``put(step_arrays)`` turns host arrays into global device arrays."""
    step = shard_map_step(mesh)
    state = OPT.init(params)
    for t in range(STEPS):
        mbs = put(tuple(a[t] for a in data))
        params, state, _ = step(params, state, jax.random.fold_in(key, t), mbs, put(sizes[t]))
    return params, state


def worker(process_id: int, num_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
        process_id=process_id,
    )
    assert jax.device_count() == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = DEVICES // num_processes
    rows = slice(process_id * local, (process_id + 1) * local)

    def put(tree):
        return jax.tree.map(
            lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)[rows]), tree
        )

    params, data, sizes = problem()
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(replicated, a), params
    )
    params, state = train_shard_map(mesh, params, data, sizes, jax.random.key(11), put)
    flat = {k: np.asarray(v.addressable_shards[0].data) for k, v in params.items()}
    hess_w1 = ivon_jax.find_ivon_states(state)[0].hess["w1"]
    flat["hess_w1"] = np.asarray(hess_w1.addressable_shards[0].data)
    np.savez(out, **flat)
    jax.distributed.shutdown()


def _add_scaled(acc, w, tree):
    """acc + w * tree (acc None means 0)."""
    scaled = jax.tree.map(lambda a: w * a, tree)
    return scaled if acc is None else jax.tree.map(jnp.add, acc, scaled)


def reference_run(params, data, sizes, key):
    """The same training written out by hand on one device: per-device and per-micro-batch
    keys, explicit sample_params / grad / estimate_hessian, the B_j-weighted means."""
    params = jax.tree.map(jnp.asarray, params)
    state = OPT.init(params)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    for t in range(STEPS):
        key_t = jax.random.fold_in(key, t)
        g_sum = h_sum = None
        total = 0.0
        for d in range(DEVICES):
            key_d = jax.random.fold_in(key_t, d)
            for j in range(MICRO):
                b = float(sizes[t, d, j])
                total += b
                mb = tuple(jnp.asarray(a[t, d, j]) for a in data)
                keys = jax.random.split(jax.random.fold_in(key_d, j), SAMPLES)
                for s in range(SAMPLES):
                    sampled, noise = ivon_jax.sample_params(keys[s], params, state)
                    _, g = grad(sampled, mb)
                    h = ivon_jax.estimate_hessian(g, noise, state)
                    g_sum = _add_scaled(g_sum, b / SAMPLES, g)
                    h_sum = _add_scaled(h_sum, b / SAMPLES, h)
        grads = _add_scaled(None, 1.0 / total, g_sum)
        hess = _add_scaled(None, 1.0 / total, h_sum)
        updates, state = OPT.update(grads, state, params, hess=hess)
        params = optax.apply_updates(params, updates)
    return params, state


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    a = parser.parse_args()
    worker(a.process_id, a.num_processes, a.port, a.out)
    sys.exit(0)
