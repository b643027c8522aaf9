"""Training Linen models with mutable collections: `ivon_jax.flax.linen.value_and_grad`.

Dropout (`rngs={"dropout": key}`) and BatchNorm (`mutable=["batch_stats"]`) with S weight
samples, and `TrainState.batch_stats`. References: a hand-written loop over the samples from
public pieces (`ivon_jax.sample_params`, `ivon_jax.estimate_hessian`, `model.apply`) with the
adapter's documented rules (sample s of S > 1 uses `fold_in(k, s)` for each dropout key k; the
device index is folded in first under `axis_name`; batch statistics are averaged over samples
and devices), and BatchNorm's running averages recomputed in float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ivon_jax
from ivon_jax.flax import linen as ivon_linen

RATE = 0.5
TX = ivon_jax.ivon(0.05, ess=40.0, hess_init=1.0, b2=0.5)
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)), jnp.float32)
CASES = [(1, "vmap"), (3, "vmap"), (3, "scan")]


class Net(nn.Module):
    """Dense(3→5) → BatchNorm (momentum 0.5) → tanh → Dropout → Dense(5→2)."""

    dropout: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(5, use_bias=False)(x)
        h = nn.BatchNorm(not train, momentum=0.5, use_bias=False, use_scale=False)(h)
        h = jnp.tanh(h)
        if self.dropout:
            h = nn.Dropout(RATE, deterministic=not train)(h)
        return nn.Dense(2, use_bias=False)(h)


def _loss_fn(model):
    def loss_fn(params, batch_stats, rngs, x, y):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
        )
        return jnp.mean(jnp.square(out - y)), updates["batch_stats"]

    return loss_fn


def _state(model, seed=0):
    variables = model.init(jax.random.key(seed), X, train=False)
    return ivon_linen.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=TX,
    )


def _rngs(num_samples, dropout_key, s):
    return {"dropout": dropout_key if num_samples == 1 else jax.random.fold_in(dropout_key, s)}


@pytest.mark.parametrize(("num_samples", "mode"), CASES)
def test_train_state_with_dropout_and_batch_stats_equals_hand_loop(num_samples, mode):
    # Three steps of the adapter == three steps of a loop over the S samples by hand.
    # Tolerance: rtol 1e-5 (float32; the S samples are summed in different orders).
    model = Net()
    loss_fn = _loss_fn(model)
    vg = ivon_linen.value_and_grad(loss_fn, num_samples, mode=mode)

    @jax.jit
    def step(state, key):
        noise_key, dropout_key = jax.random.split(key)
        loss, grads, hess, batch_stats = vg(
            noise_key, state.params, state.opt_state, state.batch_stats,
            {"dropout": dropout_key}, X, Y,
        )
        return state.apply_gradients(grads=grads, hess=hess, batch_stats=batch_stats), loss

    state = _state(model)
    params, opt_state, stats = state.params, state.opt_state, state.batch_stats
    for t in range(3):
        key = jax.random.key(50 + t)
        state, loss = step(state, key)
        noise_key, dropout_key = jax.random.split(key)
        outs = []
        for s, k in enumerate(jax.random.split(noise_key, num_samples)):
            sampled, noise = ivon_jax.sample_params(k, params, opt_state)
            (value, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
                sampled, stats, _rngs(num_samples, dropout_key, s), X, Y
            )
            outs.append((value, g, ivon_jax.estimate_hessian(g, noise, opt_state), new_stats))
        value, grads, hess, stats = jax.tree.map(lambda *xs: sum(xs) / num_samples, *outs)
        updates, opt_state = TX.update(grads, opt_state, params, hess=hess)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(float(loss), float(value), rtol=1e-5)

    assert int(state.step) == 3
    for got, want in ((state.params, params), (state.batch_stats, stats)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for a, b in zip(
        jax.tree.leaves(ivon_jax.posterior_std(state.opt_state)),
        jax.tree.leaves(ivon_jax.posterior_std(opt_state)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def _bn_expectation(params, opt_state, stats, keys, xs):
    """Mean over (device d, sample s) of BatchNorm's update with the batch xs[d]."""
    mu0, var0 = (np.asarray(stats["BatchNorm_0"][n], np.float64) for n in ("mean", "var"))
    mus, vars_ = [], []
    for x, ks in zip(xs, keys, strict=True):
        for k in ks:
            w = ivon_jax.sample_params(k, params, opt_state)[0]["Dense_0"]["kernel"]
            z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
            mus.append(0.5 * mu0 + 0.5 * z.mean(0))
            vars_.append(0.5 * var0 + 0.5 * z.var(0))
    return np.mean(mus, axis=0), np.mean(vars_, axis=0)


@pytest.mark.parametrize(("num_samples", "mode"), CASES)
def test_batch_stats_are_the_average_of_the_samples_updates(num_samples, mode):
    model = Net(dropout=False)
    state = _state(model, seed=1)
    vg = jax.jit(ivon_linen.value_and_grad(_loss_fn(model), num_samples, mode=mode))
    key = jax.random.key(3)
    *_, stats = vg(key, state.params, state.opt_state, state.batch_stats, None, X, Y)
    want_mu, want_var = _bn_expectation(
        state.params, state.opt_state, state.batch_stats,
        [jax.random.split(key, num_samples)], [X],
    )
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["mean"]), want_mu, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["var"]), want_var, rtol=1e-5,
                               atol=1e-6)
    assert np.max(np.abs(want_mu)) > 1e-2  # moved off the initial zeros


def test_each_sample_draws_its_own_dropout_mask():
    class Masks(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.ones, (3,))
            return jnp.mean(x @ w), nn.Dropout(RATE, deterministic=False)(jnp.ones((64,)))

    model = Masks()
    params = model.init(jax.random.key(0), X)["params"]
    opt_state = TX.init(params)

    def loss_fn(params, model_state, rngs, x):
        value, mask = model.apply({"params": params}, x, rngs=rngs)
        return (value, mask), model_state

    dropout_key = jax.random.key(9)
    masks = [
        np.asarray(model.apply({"params": params}, X, rngs=_rngs(4, dropout_key, s))[1])
        for s in range(4)
    ]
    assert all(not np.array_equal(masks[0], m) for m in masks[1:])
    for mode in ("vmap", "scan"):
        vg = ivon_linen.value_and_grad(loss_fn, 4, has_aux=True, mode=mode)
        (_, aux), _, _, out_state = vg(
            jax.random.key(1), params, opt_state, {}, {"dropout": dropout_key}, X
        )
        np.testing.assert_allclose(np.asarray(aux), np.mean(masks, axis=0), rtol=1e-6)
        assert out_state == {}
    # S = 1 uses the key as it is: Flax's own mask.
    vg1 = ivon_linen.value_and_grad(loss_fn, 1, has_aux=True)
    (_, aux), *_ = vg1(jax.random.key(1), params, opt_state, {}, {"dropout": dropout_key}, X)
    plain = model.apply({"params": params}, X, rngs={"dropout": dropout_key})[1]
    np.testing.assert_array_equal(np.asarray(aux), np.asarray(plain))


def test_unchanged_state_is_returned_exactly():
    # A loss in evaluation mode returns its batch statistics unchanged: no averaging of S
    # equal values (which could round), the very same numbers come back.
    model = Net()
    state = _state(model, seed=2)
    stats = jax.tree.map(lambda a: a + jnp.float32(1.0 / 3.0), state.batch_stats)

    def loss_fn(params, batch_stats, rngs, x, y):
        out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return jnp.mean(jnp.square(out - y)), batch_stats

    vg = ivon_linen.value_and_grad(loss_fn, 3)
    *_, out = vg(jax.random.key(0), state.params, state.opt_state, stats, None, X, Y)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shard_map_averages_batch_stats_over_devices():
    # 2 devices, each with half the batch and its own weight noise (fold_in(key, d)): the
    # returned statistics are the mean over devices and samples, the same on both devices.
    model = Net()
    state = _state(model, seed=3)
    num_samples, devices = 2, 2
    vg = ivon_linen.value_and_grad(_loss_fn(model), num_samples, axis_name="d")
    mesh = jax.make_mesh((devices,), ("d",), devices=jax.devices()[:devices])
    dropout_key = jax.random.key(11)

    def step(key, params, opt_state, stats, x, y):
        loss, _, _, stats = vg(key, params, opt_state, stats, {"dropout": dropout_key}, x, y)
        return loss, stats

    sharded = jax.jit(
        jax.shard_map(
            step, mesh=mesh, in_specs=(P(), P(), P(), P(), P("d"), P("d")), out_specs=P()
        )
    )
    key = jax.random.key(4)
    x, y = jax.device_put((X, Y), NamedSharding(mesh, P("d")))
    loss, stats = sharded(key, state.params, state.opt_state, state.batch_stats, x, y)
    # The same with Dropout masks by the documented rule, by hand: a loop over (d, s).
    want_loss, want_stats = [], []
    for d in range(devices):
        keys = jax.random.split(jax.random.fold_in(key, d), num_samples)
        for s, k in enumerate(keys):
            sampled = ivon_jax.sample_params(k, state.params, state.opt_state)[0]
            rng = jax.random.fold_in(jax.random.fold_in(dropout_key, d), s)
            value, new_stats = _loss_fn(model)(
                sampled, state.batch_stats, {"dropout": rng}, X[4 * d : 4 * d + 4],
                Y[4 * d : 4 * d + 4],
            )
            want_loss.append(value)
            want_stats.append(new_stats)
    np.testing.assert_allclose(float(loss), float(np.mean(want_loss)), rtol=1e-5)
    want = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *want_stats)
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    # The batch-norm part of that rule, independently in NumPy.
    mu, _ = _bn_expectation(
        state.params, state.opt_state, state.batch_stats,
        [jax.random.split(jax.random.fold_in(key, d), num_samples) for d in range(devices)],
        [X[:4], X[4:]],
    )
    np.testing.assert_allclose(np.asarray(stats["BatchNorm_0"]["mean"]), mu, rtol=1e-5,
                               atol=1e-6)


def test_train_state_batch_stats_field():
    model = Net()
    state = _state(model)
    assert set(state.batch_stats) == {"BatchNorm_0"}
    plain = ivon_linen.TrainState.create(apply_fn=model.apply, params=state.params, tx=TX)
    assert plain.batch_stats is None
    grads = jax.tree.map(jnp.zeros_like, state.params)
    new = jax.tree.map(lambda a: a + 1.0, state.batch_stats)
    out = state.apply_gradients(grads=grads, hess=grads, batch_stats=new)
    np.testing.assert_array_equal(
        np.asarray(out.batch_stats["BatchNorm_0"]["var"]),
        np.asarray(state.batch_stats["BatchNorm_0"]["var"]) + 1.0,
    )
