"""ivon_jax.equinox: Equinox models through the core estimator, checked against the same
computation written out with ``eqx.partition``/``eqx.combine`` and the plain optax path."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

eqx = pytest.importorskip("equinox")
ivon_eqx = pytest.importorskip("ivon_jax.equinox")

D_IN, CLASSES, BATCH = 5, 3, 8


class Net(eqx.Module):
    """Two layers, a function-valued field, an int buffer and a Python float: the leaves an
    Equinox model mixes with its parameters."""

    lin1: eqx.nn.Linear
    lin2: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    act: Callable
    calls: jax.Array  # int32 buffer, never trained
    scale: float

    def __init__(self, key, rate=0.0):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(D_IN, 16, key=k1)
        self.lin2 = eqx.nn.Linear(16, CLASSES, key=k2)
        self.dropout = eqx.nn.Dropout(rate)
        self.act = jax.nn.relu  # a custom_jvp
        self.calls = jnp.zeros((), jnp.int32)
        self.scale = 0.5

    def __call__(self, x, key=None):
        h = self.act(self.lin1(x))
        h = self.dropout(h, key=key, inference=key is None)
        return self.scale * self.lin2(h) + self.calls.astype(h.dtype)


def _data(n=BATCH, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, D_IN))
    y = jax.random.randint(ky, (n,), 0, CLASSES)
    return x, y


def loss_fn(model, x, y, key=None):
    keys = None if key is None else jax.random.split(key, x.shape[0])
    logits = jax.vmap(model)(x, keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _setup(rate=0.0, opt=None):
    model = Net(jax.random.key(1), rate)
    opt = ivon_jax.ivon(0.05, ess=100.0, hess_init=0.5) if opt is None else opt
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    return model, opt, state


def _manual_one(noise_key, model, state, args, spec=eqx.is_inexact_array, **kwargs):
    """The explicit path on the partitioned model: sample, grad, estimate_hessian (with
    ``key`` as given: value_and_grad's sample s uses ``split(key, S)[s]``, also for S = 1)."""
    params, static = eqx.partition(model, spec)
    sampled, noise = ivon_jax.sample_params(noise_key, params, state)
    value, grads = jax.value_and_grad(
        lambda p: loss_fn(eqx.combine(p, static), *args, **kwargs)
    )(sampled)
    return value, grads, ivon_jax.estimate_hessian(grads, noise, state)


def _first(key):
    return jax.random.split(key, 1)[0]


def _assert_trees(a, b, rtol=0.0, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# -------------------------------------------------------------------- parity and structure


def test_matches_the_explicit_path_exactly():
    model, opt, state = _setup()
    x, y = _data()
    key = jax.random.key(7)
    value, grads, hess = ivon_eqx.value_and_grad(loss_fn)(key, model, state, x, y)
    want = _manual_one(_first(key), model, state, (x, y))
    _assert_trees((value, grads, hess), want)
    params = eqx.filter(model, eqx.is_inexact_array)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # The Equinox update: opt.update on the filtered model, eqx.apply_updates on the model.
    updates, new_state = opt.update(grads, state, params, hess=hess)
    new_model = eqx.apply_updates(model, updates)
    ref_updates, _ = opt.update(want[1], state, params, hess=want[2])
    ref_params = optax.apply_updates(params, ref_updates)
    _assert_trees(eqx.filter(new_model, eqx.is_inexact_array), ref_params)
    assert new_model.act is jax.nn.relu and new_model.calls.dtype == jnp.int32
    assert new_model.scale == 0.5


@pytest.mark.parametrize("mode", ["vmap", "scan"])
def test_several_samples_match_the_core_on_the_filtered_model(mode):
    model, _, state = _setup()
    x, y = _data()
    key = jax.random.key(3)
    got = ivon_eqx.value_and_grad(loss_fn, num_samples=3, mode=mode)(key, model, state, x, y)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    core = ivon_jax.value_and_grad(
        lambda p, x, y: loss_fn(eqx.combine(p, static), x, y), num_samples=3, mode=mode
    )
    _assert_trees(got, core(key, params, state, x, y))
    # And the mean of three explicit single-sample estimates.
    ones = [_manual_one(k, model, state, (x, y)) for k in jax.random.split(key, 3)]
    mean = jax.tree.map(lambda *t: sum(t) / 3, *ones)
    _assert_trees(got, mean, rtol=1e-5, atol=1e-6)


def test_under_filter_jit_and_has_aux():
    model, _, state = _setup()
    x, y = _data()
    key = jax.random.key(4)
    vg = ivon_eqx.value_and_grad(
        lambda m, x, y: (loss_fn(m, x, y), {"n": jnp.asarray(x.shape[0], jnp.float32)}),
        num_samples=2, has_aux=True,
    )
    eager = vg(key, model, state, x, y)
    jitted = eqx.filter_jit(vg)(key, model, state, x, y)
    _assert_trees(jitted, eager, rtol=1e-6, atol=1e-7)
    (loss, aux), _, _ = eager
    assert float(aux["n"]) == BATCH and np.isfinite(float(loss))


def test_frozen_part_via_filter_spec():
    model, opt, _ = _setup()
    spec = jax.tree.map(eqx.is_inexact_array, model)
    spec = eqx.tree_at(lambda m: (m.lin1.weight, m.lin1.bias), spec, replace=(False, False))
    params = eqx.filter(model, spec)
    state = opt.init(params)
    x, y = _data()
    vg = ivon_eqx.value_and_grad(loss_fn, filter_spec=spec)
    key = jax.random.key(5)
    value, grads, hess = vg(key, model, state, x, y)
    assert grads.lin1.weight is None and grads.lin1.bias is None
    _assert_trees((value, grads, hess), _manual_one(_first(key), model, state, (x, y), spec=spec))
    step = eqx.filter_jit(lambda k, m, s: _train_step(opt, vg, k, m, s, x, y, spec))
    new = model
    for t in range(3):
        new, state, _ = step(jax.random.key(t), new, state)
    np.testing.assert_array_equal(np.asarray(new.lin1.weight), np.asarray(model.lin1.weight))
    assert not np.array_equal(np.asarray(new.lin2.weight), np.asarray(model.lin2.weight))
    # The predictive never perturbs the frozen layer: with σ = 0 there, the first layer's
    # output is the same in every sample.
    one = ivon_eqx.sampled_model(jax.random.key(9), new, state, filter_spec=spec)
    np.testing.assert_array_equal(np.asarray(one.lin1.weight), np.asarray(new.lin1.weight))


def _train_step(opt, vg, key, model, state, x, y, spec=eqx.is_inexact_array):
    loss, grads, hess = vg(key, model, state, x, y)
    updates, state = opt.update(grads, state, eqx.filter(model, spec), hess=hess)
    return eqx.apply_updates(model, updates), state, loss


# ------------------------------------------------------------------ randomness and state


def test_dropout_key_reaches_the_loss_per_sample():
    model, _, state = _setup(rate=0.5)
    x, y = _data()
    key, dkey = jax.random.key(6), jax.random.key(60)
    one = ivon_eqx.value_and_grad(loss_fn)(key, model, state, x, y, key=dkey)
    # One sample: the dropout key is used as it is, as in plain Equinox code.
    _assert_trees(one, _manual_one(_first(key), model, state, (x, y), key=dkey))
    no_mask = ivon_eqx.value_and_grad(loss_fn)(key, model, state, x, y)
    assert float(one[0]) != float(no_mask[0])
    # Two samples: sample s uses split(key, 2)[s] for the weights, fold_in(dkey, s) for masks.
    two = ivon_eqx.value_and_grad(loss_fn, num_samples=2)(key, model, state, x, y, key=dkey)
    parts = [
        _manual_one(k, model, state, (x, y), key=jax.random.fold_in(dkey, s))
        for s, k in enumerate(jax.random.split(key, 2))
    ]
    _assert_trees(two, jax.tree.map(lambda a, b: (a + b) / 2, *parts), rtol=1e-5, atol=1e-6)


class BNNet(eqx.Module):
    lin1: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    lin2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(D_IN, 8, key=k1)
        self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="ema", momentum=0.9)
        self.lin2 = eqx.nn.Linear(8, CLASSES, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(jax.nn.tanh(self.lin1(x)), state)
        return self.lin2(h), state


def bn_loss(model, state, x, y):
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(x, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


@pytest.mark.parametrize("num_samples", [1, 2])
def test_batchnorm_state(num_samples):
    model, bn_state = eqx.nn.make_with_state(BNNet)(jax.random.key(2))
    opt = ivon_jax.ivon(0.05, ess=100.0)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = opt.init(params)
    x, y = _data()
    key = jax.random.key(8)
    vg = ivon_eqx.value_and_grad(bn_loss, num_samples=num_samples, has_state=True)
    value, grads, hess, new_bn = vg(key, model, state, bn_state, x, y)
    manual = []
    for k in jax.random.split(key, num_samples):
        sampled, noise = ivon_jax.sample_params(k, params, state)
        (v, s), g = jax.value_and_grad(
            lambda p: bn_loss(eqx.combine(p, static), bn_state, x, y), has_aux=True
        )(sampled)
        manual.append((v, g, ivon_jax.estimate_hessian(g, noise, state), s))
    mean = jax.tree.map(
        lambda *t: t[0] if t[0].dtype == jnp.bool_ else sum(t) / len(t), *manual
    )
    tol = {} if num_samples == 1 else {"rtol": 1e-5, "atol": 1e-6}
    _assert_trees((value, grads, hess, new_bn), mean, **tol)
    # The running mean moved away from its initial zeros, to the samples' average.
    rm = new_bn.get(model.norm.ema_state_index)[0]
    assert float(jnp.max(jnp.abs(rm))) > 0
    # Prediction with the state, in inference mode, through `call`.
    inference = eqx.nn.inference_mode(model)

    def call(m, x):
        return jax.vmap(m, in_axes=(0, None), out_axes=(0, None))(x, new_bn)[0]

    probs = ivon_eqx.predict_proba(key, inference, state, x, num_samples=4, call=call)
    p_i, s_i = eqx.partition(inference, eqx.is_inexact_array)
    want = ivon_jax.predictive.predict_proba(
        key, lambda p, x: call(eqx.combine(p, s_i), x), p_i, state, x, num_samples=4
    )
    _assert_trees(probs, want)


# ------------------------------------------------------------------------- prediction


def test_predictive_matches_the_model_agnostic_one():
    model, _, state = _setup()
    x, _ = _data()
    key = jax.random.key(10)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    probs = ivon_eqx.predict_proba(key, model, state, x, num_samples=6, chunk_size=4)
    want = ivon_jax.predictive.predict_proba(key, apply_fn, params, state, x, num_samples=6,
                                             chunk_size=4)
    _assert_trees(probs, want)
    np.testing.assert_allclose(np.asarray(jnp.sum(probs, -1)), 1.0, rtol=1e-5)
    mean, var = ivon_eqx.predict_regression(key, model, state, x, num_samples=6, noise_var=0.1)
    want_m, want_v = ivon_jax.predictive.predict_regression(
        key, apply_fn, params, state, x, num_samples=6, noise_var=0.1
    )
    _assert_trees((mean, var), (want_m, want_v))
    assert float(jnp.min(var)) > 0.1  # epistemic part on top of the noise
    # sampled_model is sample s of the predictive for key split(key, S)[s].
    k0 = jax.random.split(key, 6)[0]
    _assert_trees(
        eqx.filter(ivon_eqx.sampled_model(k0, model, state), eqx.is_inexact_array),
        ivon_jax.sample_params(k0, params, state)[0],
    )


# -------------------------------------------------------------------------- devices


def test_shard_map_over_eight_devices():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = 8
    mesh = jax.make_mesh((devices,), ("data",))
    model, _, state = _setup()
    x, y = _data(n=devices * 4)
    xs, ys = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    vg = ivon_eqx.value_and_grad(loss_fn, num_samples=2, axis_name="data")
    key = jax.random.key(12)

    def body(p, s, k, x, y):
        return vg(k, eqx.combine(p, static), s, x, y)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), P("data"), P("data")),
                              out_specs=(P(), P(), P())))
    got = f(params, state, key, xs, ys)
    # Truth: each device's own estimate with the device index folded into the key, averaged.
    core = ivon_eqx.value_and_grad(loss_fn, num_samples=2)
    per_device = [
        core(jax.random.fold_in(key, d), model, state, x[4 * d: 4 * d + 4], y[4 * d: 4 * d + 4])
        for d in range(devices)
    ]
    want = jax.tree.map(lambda *t: sum(t) / devices, *per_device)
    _assert_trees(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss():
    x, y = _data(n=64, seed=3)
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)  # learnable labels
    model, opt, state = _setup(rate=0.1, opt=ivon_jax.ivon(0.3, ess=640.0, hess_init=0.5,
                                                           b2=0.999))
    vg = ivon_eqx.value_and_grad(loss_fn, num_samples=2)

    @eqx.filter_jit
    def step(key, model, state):
        k_noise, k_drop = jax.random.split(key)
        loss, grads, hess = vg(k_noise, model, state, x, y, key=k_drop)
        updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array),
                                    hess=hess)
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for t in range(60):
        model, state, loss = step(jax.random.key(t), model, state)
        losses.append(float(loss))
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5]), losses[::10]
    acc = jnp.mean(jnp.argmax(ivon_eqx.predict_proba(jax.random.key(0), model, state, x,
                                                     num_samples=8), -1) == y)
    assert float(acc) > 0.8


# ------------------------------------------------------------------------------ errors


def test_unfiltered_model_at_init_says_to_filter():
    model, opt, _ = _setup()
    with pytest.raises(
        TypeError,
        match=r"must be arrays, but `params\.act` is a custom_jvp.*"
        r"For an Equinox model, initialise with `opt\.init\(eqx\.filter\(model, "
        r"eqx\.is_inexact_array\)\)`",
    ):
        opt.init(model)


def test_int_leaf_at_init_says_to_filter_inexact():
    model, opt, _ = _setup()
    with pytest.raises(
        TypeError,
        match=r"floating-point parameters only, but `params\.calls` has dtype int32.*"
        r"eqx\.filter\(model, eqx\.is_inexact_array\)",
    ):
        opt.init(eqx.filter(model, eqx.is_array))


def test_equinox_hint_for_plain_trees_once_equinox_is_imported():
    with pytest.raises(TypeError, match=r"For Equinox code, initialise with"):
        ivon_jax.ivon(0.1, ess=1.0).init({"n": jnp.zeros(2, jnp.int32)})


def test_call_out_of_order_shows_the_call():
    model, _, state = _setup()
    x, y = _data()
    vg = ivon_eqx.value_and_grad(loss_fn)
    with pytest.raises(TypeError, match=r"called as `vg\(key, model, opt_state, \*args\)`.*"
                                        r"got a Net as the key"):
        vg(model, state, x, y)
    stateful = ivon_eqx.value_and_grad(bn_loss, has_state=True)
    with pytest.raises(TypeError, match=r"`vg\(key, model, opt_state, state, \*args\)`.*missing"):
        stateful(jax.random.key(0), model, state)
