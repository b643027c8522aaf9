"""Data parallelism on 8 simulated CPU devices: pmap, shard_map, sharded jit, two processes.

Every run must equal ``reference_run``: the same formula written out by hand on one device
with the same per-device and per-micro-batch keys and the same batch shards (unequal numbers
of valid rows, so the B_j weighting is exercised).
"""

from __future__ import annotations

import os
import re

import distributed_common as C
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ivon_jax

RTOL, ATOL = 2e-5, 2e-6  # float32 sums in a different order


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < C.DEVICES:
        pytest.skip("needs 8 (simulated) devices")
    params, data, sizes = C.problem()
    key = jax.random.key(11)
    ref_params, ref_state = C.reference_run(params, data, sizes, key)
    return params, data, sizes, key, ref_params, ref_state


def _close(a, b):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=RTOL, atol=ATOL)


def _same_on_every_device(x):
    shards = [np.asarray(s.data) for s in x.addressable_shards]
    for s in shards[1:]:
        np.testing.assert_array_equal(s, shards[0])


def test_pmap_matches_reference(setup):
    params, data, sizes, key, ref_params, ref_state = setup
    devices = jax.devices()[: C.DEVICES]
    step = jax.pmap(C.device_step, axis_name="data", in_axes=(0, 0, None, 0, 0), devices=devices)
    bcast = lambda t: jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * C.DEVICES), t)
    p, s = bcast(params), bcast(C.OPT.init(params))
    for t in range(C.STEPS):
        mbs = tuple(jnp.asarray(a[t]) for a in data)
        p, s, _ = step(p, s, jax.random.fold_in(key, t), mbs, jnp.asarray(sizes[t]))
    # Identical on every device (bit for bit), and equal to the hand computation.
    for leaf in jax.tree.leaves((p, s)):
        a = np.asarray(leaf)
        for d in range(1, C.DEVICES):
            np.testing.assert_array_equal(a[d], a[0])
    _close({k: v[0] for k, v in p.items()}, ref_params)
    _close({k: v[0] for k, v in ivon_jax.find_ivon_states(s)[0].hess.items()},
           ivon_jax.find_ivon_states(ref_state)[0].hess)
    assert int(ivon_jax.find_ivon_states(s)[0].count[0]) == C.STEPS


def test_shard_map_matches_reference(setup):
    params, data, sizes, key, ref_params, ref_state = setup
    mesh = jax.make_mesh((C.DEVICES,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    put = lambda tree: jax.tree.map(lambda a: jax.device_put(np.asarray(a), sharding), tree)
    p = jax.device_put(jax.tree.map(jnp.asarray, params), NamedSharding(mesh, P()))
    p, s = C.train_shard_map(mesh, p, data, sizes, key, put)
    for leaf in jax.tree.leaves((p, s)):
        _same_on_every_device(leaf)
    _close(p, ref_params)
    _close(ivon_jax.find_ivon_states(s)[0].hess, ivon_jax.find_ivon_states(ref_state)[0].hess)


def test_sharded_jit_with_vmap_axis_matches_reference(setup):
    """Plain jit: the per-device step under ``vmap(axis_name='data')``, batch sharded over
    the mesh's data axis; XLA partitions the vmapped groups across devices. (The mesh axis
    is ``Auto``: with JAX's default ``Explicit`` axes, random draws under a vmap over a
    sharded axis are not supported.)"""
    params, data, sizes, key, ref_params, ref_state = setup
    mesh = jax.make_mesh((C.DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    @jax.jit
    def step(params, state, key, mbs, sizes):
        f = jax.vmap(
            C.device_step, in_axes=(None, None, None, 0, 0), out_axes=None, axis_name="data"
        )
        return f(params, state, key, mbs, sizes)

    p = jax.device_put(jax.tree.map(jnp.asarray, params), replicated)
    s = jax.device_put(C.OPT.init(params), replicated)
    for t in range(C.STEPS):
        mbs = jax.device_put(tuple(np.asarray(a[t]) for a in data), sharding)
        p, s, _ = step(p, s, jax.random.fold_in(key, t), mbs, jax.device_put(sizes[t], sharding))
    for leaf in jax.tree.leaves((p, s)):
        _same_on_every_device(leaf)
    _close(p, ref_params)
    _close(ivon_jax.find_ivon_states(s)[0].hess, ivon_jax.find_ivon_states(ref_state)[0].hess)


def test_devices_draw_different_noise_and_same_key_reproduces():
    mesh = jax.make_mesh((C.DEVICES,), ("data",))
    params, _, _ = C.problem()
    state = C.OPT.init(params)

    def noise_on_device(key):
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        return ivon_jax.sample_params(key, params, state)[1]["w1"][None]

    f = jax.jit(jax.shard_map(noise_on_device, mesh=mesh, in_specs=P(), out_specs=P("data")))
    n1 = np.asarray(f(jax.random.key(5)))
    n2 = np.asarray(f(jax.random.key(5)))
    np.testing.assert_array_equal(n1, n2)
    flat = n1.reshape(C.DEVICES, -1)
    corr = np.corrcoef(flat)
    off = corr[~np.eye(C.DEVICES, dtype=bool)]
    # 96 values per device: independent noise gives |corr| ≲ 4/sqrt(96) ≈ 0.41.
    assert np.max(np.abs(off)) < 0.45, off
    assert not np.allclose(flat[0], flat[1])


def test_accumulating_microbatches_equals_weighted_union():
    """4 micro-batches accumulated == the B_j-weighted formula on their union."""
    params, (x, y, mask), sizes = C.problem()
    state = C.OPT.init(params)
    mbs = (x[0, 0:2].reshape(-1, C.ROWS, C.D_IN)[:4], y[0, 0:2].reshape(-1, C.ROWS)[:4],
           mask[0, 0:2].reshape(-1, C.ROWS)[:4])
    b = sizes[0, 0:2].reshape(-1)[:4]
    acc = ivon_jax.accumulated_value_and_grad(C.loss_fn, num_samples=1)
    key = jax.random.key(2)
    loss, grads, hess = jax.jit(acc)(key, params, state, mbs, b)
    # By hand: micro-batch j uses split(fold_in(key, j), 1)[0].
    g_sum, h_sum, l_sum = 0.0, 0.0, 0.0
    for j in range(4):
        k = jax.random.split(jax.random.fold_in(key, j), 1)[0]
        sampled, noise = ivon_jax.sample_params(k, params, state)
        lj, gj = jax.value_and_grad(C.loss_fn)(sampled, tuple(a[j] for a in mbs))
        hj = ivon_jax.estimate_hessian(gj, noise, state)
        g_sum = g_sum + b[j] * np.asarray(gj["w1"])
        h_sum = h_sum + b[j] * np.asarray(hj["w1"])
        l_sum = l_sum + b[j] * float(lj)
    np.testing.assert_allclose(np.asarray(grads["w1"]), g_sum / b.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(hess["w1"]), h_sum / b.sum(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), l_sum / b.sum(), rtol=1e-6)
    # vmap over micro-batches gives the same numbers as the scan.
    acc_v = ivon_jax.accumulated_value_and_grad(C.loss_fn, micro_mode="vmap")
    _, grads_v, hess_v = jax.jit(acc_v)(key, params, state, mbs, b)
    np.testing.assert_allclose(np.asarray(grads_v["w1"]), np.asarray(grads["w1"]), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(hess_v["w1"]), np.asarray(hess["w1"]), rtol=1e-5,
                               atol=1e-6)


def test_accumulation_memory_does_not_grow_with_microbatches():
    """The scan keeps one micro-batch's temporaries: peak temp memory is flat in K."""
    params = {"w": jnp.zeros((256, 256), jnp.float32)}
    state = C.OPT.init(params)
    loss = lambda p, xb: jnp.mean(jnp.tanh(xb @ p["w"]) ** 2)
    acc = ivon_jax.accumulated_value_and_grad(loss)

    def temp_bytes(k):
        xs = jnp.zeros((k, 8, 256), jnp.float32)
        compiled = jax.jit(acc).lower(jax.random.key(0), params, state, xs, None).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # The parameter is 256 KiB; 8 → 64 micro-batches must not add even one such buffer
    # (a per-micro-batch buffer would add 56 of them).
    small, large = temp_bytes(8), temp_bytes(64)
    assert large <= small + 64 * 1024, (small, large)


def test_multistep_wrapper_is_refused():
    params = {"w": jnp.zeros(3)}
    state = optax_multisteps_state(params)
    with pytest.raises(ValueError, match="MultiSteps"):
        ivon_jax.sample_params(jax.random.key(0), params, state)


def optax_multisteps_state(params):
    import optax

    return optax.MultiSteps(ivon_jax.ivon(0.1, ess=10.0), every_k_schedule=4).init(params)


@pytest.mark.parametrize("guard", [False, True], ids=["unguarded", "guarded"])
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_parameters_stay_sharded(axis_type, guard):
    """FSDP-style: parameters and state sharded over the mesh keep their sharding through
    init, sample_params, estimate_hessian and update, with no collective in the compiled
    step (the noise is drawn shard by shard) — except, with the default non-finite guard,
    all-reduces of a few numbers: the per-leaf sums that let every device decide the same."""
    mesh = jax.make_mesh(
        (C.DEVICES,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),)
    )
    row = NamedSharding(mesh, P("data", None))
    col = NamedSharding(mesh, P(None, "data"))
    shardings = {"a": row, "b": col}
    opt = ivon_jax.ivon(0.1, ess=100.0, skip_nonfinite=guard)

    def step(key, params, state):
        sampled, noise = ivon_jax.sample_params(key, params, state)
        grads = jax.tree.map(lambda s: 2.0 * s, sampled)  # gradient of Σ θ², elementwise
        hess = ivon_jax.estimate_hessian(grads, noise, state)
        updates, state = opt.update(grads, state, params, hess=hess)
        return sampled, jax.tree.map(lambda p, u: p + u, params, updates), state

    with jax.set_mesh(mesh):
        # Leaves above noise.SMALL_LEAF elements: those are drawn in their own shape (smaller
        # ones share one flat draw, which under Auto axes is not partitioned).
        params = {"a": jnp.ones((512, 16), jnp.float32), "b": jnp.ones((16, 512), jnp.float32)}
        params = jax.device_put(params, shardings)
        # Explicit axes: a jitted init keeps the sharding (it is part of the type). Auto
        # axes: sharding propagation cannot see through zeros_like, so initialise eagerly
        # (or give jit out_shardings), as for any optax optimizer.
        state = jax.jit(opt.init)(params) if axis_type == "Explicit" else opt.init(params)
        jitted = jax.jit(step)
        hlo = jitted.lower(jax.random.key(0), params, state).compile().as_text()
        sampled, new_params, new_state = jitted(jax.random.key(0), params, state)
    for collective in ("all-gather", "all-to-all", "collective-permute"):
        assert collective not in hlo, collective
    all_reduces = [line for line in hlo.splitlines() if " all-reduce(" in line]
    if guard:
        # Only the guard's sums cross devices: scalars, and for the row-sharded leaf its 16
        # column sums (one number per column, never a parameter-sized array).
        assert all_reduces
        for line in all_reduces:
            out_type = line.split("=", 1)[1].split(" all-reduce(")[0]
            sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                     for dims in re.findall(r"f32\[([0-9,]*)\]", out_type)]
            assert sizes and max(sizes) <= 16, line
    else:
        assert not all_reduces
    for k, sh in shardings.items():
        old_ivon, new_ivon = (ivon_jax.find_ivon_states(s)[0] for s in (state, new_state))
        trees = (old_ivon.hess, sampled, new_params, new_ivon.hess, new_ivon.momentum)
        for tree in trees:
            assert tree[k].sharding.is_equivalent_to(sh, 2), (k, tree[k].sharding)
            # Each device holds only its block.
            assert tree[k].addressable_shards[0].data.size == params[k].size // C.DEVICES
    # The noise differs between shards (not one block replicated everywhere).
    blocks = [np.asarray(s.data) for s in (sampled["a"] - params["a"]).addressable_shards]
    assert not np.allclose(blocks[0], blocks[1])


def test_two_processes_match_single_process(setup, tmp_path):
    """Two jax.distributed processes with 4 CPU devices each == one process with 8."""
    params, data, sizes, key, _, _ = setup
    mesh = jax.make_mesh((C.DEVICES,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    put = lambda tree: jax.tree.map(lambda a: jax.device_put(np.asarray(a), sharding), tree)
    p0 = jax.device_put(jax.tree.map(jnp.asarray, params), NamedSharding(mesh, P()))
    single_params, single_state = C.train_shard_map(mesh, p0, data, sizes, key, put)

    script = os.path.join(os.path.dirname(__file__), "distributed_common.py")
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    C.run_two_processes(
        lambda i, port: [script, "--process-id", str(i), "--port", str(port), "--out",
                         str(outs[i])],
        "two processes",
    )
    for path in outs:
        got = np.load(path)
        for k in single_params:
            np.testing.assert_allclose(got[k], np.asarray(single_params[k]), rtol=1e-6,
                                       atol=1e-7)
        single_hess = ivon_jax.find_ivon_states(single_state)[0].hess
        np.testing.assert_allclose(got["hess_w1"], np.asarray(single_hess["w1"]),
                                   rtol=1e-6, atol=1e-7)
