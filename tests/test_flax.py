"""The Flax adapters: `ivon_jax.flax.nnx` and `ivon_jax.flax.linen`.

Reference values are independent of the adapters: weight samples come from
`ivon_jax.sample_params` on the pure parameter dict with the documented keys, and the networks
(including BatchNorm in inference mode) are recomputed in float64 NumPy.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ivon_jax
from ivon_jax.flax import linen as ivon_linen
from ivon_jax.flax import nnx as ivon_nnx

S, CHUNK = 4, 2  # 2 chunks of 2: the chunked path, one sampler per compiled program
STATIC = ("num_samples", "chunk_size")


class NNXNet(nnx.Module):
    """Linear(3→5) → tanh → Linear(5→4), no biases (each parameter leaf adds a noise draw to
    every compiled program); attribute names match Linen's automatic names."""

    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(3, 5, use_bias=False, rngs=rngs)
        self.Dense_1 = nnx.Linear(5, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.Dense_1(jnp.tanh(self.Dense_0(x)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(5, use_bias=False)(x))  # Dense_0
        return nn.Dense(4, use_bias=False)(h)  # Dense_1


def _net_np(p, x):
    """NNXNet / LinenNet in float64 NumPy, from a pure parameter dict."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    return np.tanh(np.asarray(x, np.float64) @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"]


def _softmax_np(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _fake_hess(params, seed):
    """A positive Hessian estimate that varies per element, like `params`."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(rng.uniform(0.0, 8.0, jnp.shape(p)), jnp.float32) for p in leaves]
    )


# Jitted once here and shared by the tests (compiles dominate the run time on CPU).
nnx_predict_proba = nnx.jit(ivon_nnx.predict_proba, static_argnames=STATIC)
nnx_predict_regression = nnx.jit(ivon_nnx.predict_regression, static_argnames=STATIC)
nnx_mixture_proba = nnx.jit(ivon_nnx.mixture_predict_proba, static_argnames=STATIC)
nnx_mixture_regression = nnx.jit(ivon_nnx.mixture_predict_regression, static_argnames=STATIC)
_LINEN_STATIC = {"static_argnums": 1, "static_argnames": STATIC}
linen_predict_proba = jax.jit(ivon_linen.predict_proba, **_LINEN_STATIC)
linen_predict_regression = jax.jit(ivon_linen.predict_regression, **_LINEN_STATIC)
linen_mixture_proba = jax.jit(ivon_linen.mixture_predict_proba, **_LINEN_STATIC)

X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
TX = ivon_jax.ivon(0.05, ess=40.0, hess_init=1.0, b2=0.5)  # b2 = 0.5: one step moves h a lot


def _nnx_run(seed):
    """An NNX model and optimizer after one IVON step with a varied Hessian estimate."""
    model = NNXNet(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    grads = jax.tree.map(lambda p: 0.3 * p, nnx.state(model, nnx.Param))
    hess = jax.tree.map(jnp.asarray, _fake_hess(_pure(model), seed))
    optimizer.update(model, grads, hess=nnx.State(hess))
    return model, optimizer


def _hand_probs(key, params, opt_state, x, num_samples):
    keys = jax.random.split(key, num_samples)
    outs = [_net_np(ivon_jax.sample_params(k, params, opt_state)[0], x) for k in keys]
    return np.mean([_softmax_np(o) for o in outs], axis=0), np.stack(outs)


@pytest.fixture(scope="module")
def nnx_run():
    return _nnx_run(0)


# ------------------------------------------------------------------------- NNX training


def test_nnx_optimizer_with_value_and_grad_matches_pure_optax():
    # nnx.Optimizer.update forwards `hess` to IVON, and the NNX value_and_grad draws the same
    # noise as ivon_jax.value_and_grad on the pure dict: the trajectories agree.
    model = NNXNet(nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    params = _pure(model)
    state = TX.init(params)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)

    def pure_loss(p, x, y):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"])
        return jnp.mean(jnp.square(h @ p["Dense_1"]["kernel"] - y))

    vg_nnx = ivon_nnx.value_and_grad(
        lambda m, x, y: jnp.mean(jnp.square(m(x) - y)), num_samples=2, mode="scan"
    )
    vg_pure = ivon_jax.value_and_grad(pure_loss, num_samples=2, mode="scan")

    @nnx.jit
    def nnx_step(model, optimizer, key):
        loss, grads, hess = vg_nnx(key, model, optimizer, X, y)
        optimizer.update(model, grads, hess=hess)
        return loss

    @jax.jit
    def pure_step(params, state, key):
        loss, grads, hess = vg_pure(key, params, state, X, y)
        updates, state = TX.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, loss

    for t in range(3):
        key = jax.random.key(10 + t)
        loss_nnx = nnx_step(model, optimizer, key)
        params, state, loss_pure = pure_step(params, state, key)
        np.testing.assert_allclose(float(loss_nnx), float(loss_pure), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(_pure(model)), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    sigma_nnx = ivon_jax.posterior_std(optimizer.opt_state, nnx.state(model, nnx.Param))
    sigma_pure = ivon_jax.posterior_std(state)
    for a, b in zip(jax.tree.leaves(sigma_nnx), jax.tree.leaves(sigma_pure), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    # h moved away from h0 = 1: the Hessian estimate really reached the state.
    h0_sigma = 1.0 / np.sqrt(40.0 * (1.0 + 1e-4))
    assert np.max(np.abs(np.asarray(jax.tree.leaves(sigma_pure)[1]) - h0_sigma)) > 1e-3


# --------------------------------------------------------------------- NNX prediction


def test_nnx_predict_proba_equals_hand_average(nnx_run):
    model, optimizer = nnx_run
    key = jax.random.key(3)
    want, outs = _hand_probs(key, _pure(model), optimizer.opt_state, X, S)
    got = nnx_predict_proba(key, model, optimizer, X, num_samples=S, chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    assert np.max(np.abs(want - _softmax_np(_net_np(_pure(model), X)))) > 1e-3
    mean, var = nnx_predict_regression(key, model, optimizer, X, num_samples=S, chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(mean), outs.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), outs.var(0), rtol=1e-4, atol=1e-7)


def test_nnx_sampled_model_is_one_predictive_sample(nnx_run):
    model, optimizer = nnx_run
    key = jax.random.key(4)
    sampled, _ = ivon_jax.sample_params(key, _pure(model), optimizer.opt_state)
    one = ivon_nnx.sampled_model(key, model, optimizer)
    assert isinstance(one, NNXNet) and one is not model
    np.testing.assert_allclose(np.asarray(one(X)), _net_np(sampled, X), rtol=1e-5, atol=1e-6)
    # From the bare optimizer state too, and the original model is untouched.
    again = ivon_nnx.sampled_model(key, model, optimizer.opt_state)
    np.testing.assert_array_equal(np.asarray(again(X)), np.asarray(one(X)))
    assert not np.allclose(np.asarray(one(X)), np.asarray(model(X)))


def test_nnx_single_sample_tiny_posterior_equals_mean_prediction():
    model = NNXNet(nnx.Rngs(2))
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=1e30), wrt=nnx.Param)
    probs = nnx_predict_proba(jax.random.key(0), model, optimizer, X, num_samples=1)
    np.testing.assert_allclose(
        np.asarray(probs), _softmax_np(_net_np(_pure(model), X)), rtol=1e-5, atol=1e-7
    )


# ------------------------------------------------------------- Linen, and Linen == NNX


def test_linen_train_state_forwards_hess_and_matches_nnx():
    # Same weights (copied from NNX), same IVON step, same keys: the same predictive.
    params0 = _pure(NNXNet(nnx.Rngs(0)))
    linen_model = LinenNet()
    init_vars = linen_model.init(jax.random.key(99), X)
    assert jax.tree.structure(init_vars["params"]) == jax.tree.structure(params0)
    state = ivon_linen.TrainState.create(apply_fn=linen_model.apply, params=params0, tx=TX)
    grads = jax.tree.map(lambda p: 0.3 * p, params0)
    hess = _fake_hess(params0, 0)
    state = state.apply_gradients(grads=grads, hess=hess)
    assert int(state.step) == 1
    # The pure optax step, by hand.
    updates, want_state = TX.update(grads, TX.init(params0), params0, hess=hess)
    want_params = optax.apply_updates(params0, updates)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(
        jax.tree.leaves(ivon_jax.posterior_std(state.opt_state)),
        jax.tree.leaves(ivon_jax.posterior_std(want_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    model, optimizer = _nnx_run(0)  # the same step on the NNX side
    for a, b in zip(jax.tree.leaves(_pure(model)), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    key = jax.random.key(5)
    variables = {"params": state.params}
    p_linen = linen_predict_proba(
        key, state.apply_fn, variables, state.opt_state, X, num_samples=S, chunk_size=CHUNK
    )
    p_nnx = nnx_predict_proba(key, model, optimizer, X, num_samples=S, chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(p_linen), np.asarray(p_nnx), rtol=1e-6, atol=1e-7)
    want, outs = _hand_probs(key, state.params, state.opt_state, X, S)
    np.testing.assert_allclose(np.asarray(p_linen), want, rtol=2e-5, atol=1e-6)
    m_linen, v_linen = linen_predict_regression(
        key,
        state.apply_fn,
        variables,
        state.opt_state,
        X,
        num_samples=S,
        chunk_size=CHUNK,
        noise_var=0.1,
    )
    np.testing.assert_allclose(np.asarray(m_linen), outs.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v_linen), outs.var(0) + 0.1, rtol=1e-4)


def test_linen_apply_gradients_requires_hess():
    params = LinenNet().init(jax.random.key(0), X)["params"]
    state = ivon_linen.TrainState.create(apply_fn=LinenNet().apply, params=params, tx=TX)
    with pytest.raises(TypeError, match="hess"):
        state.apply_gradients(grads=params)
    assert isinstance(state, ivon_linen.TrainState)


# --------------------------------------------------- non-parameter state is never perturbed


class NNXBNNet(nnx.Module):
    def __init__(self, rngs):
        self.Dense_0 = nnx.Linear(3, 5, use_bias=False, rngs=rngs)
        self.BatchNorm_0 = nnx.BatchNorm(5, use_bias=False, use_scale=False, rngs=rngs)
        self.Dropout_0 = nnx.Dropout(0.5, rngs=rngs)
        self.Dense_1 = nnx.Linear(5, 4, use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = self.Dropout_0(jnp.tanh(self.BatchNorm_0(self.Dense_0(x))))
        return self.Dense_1(h)


class LinenBNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(5, use_bias=False)(x)
        bn = nn.BatchNorm(not train, momentum=0.5, use_bias=False, use_scale=False)
        return nn.Dense(4, use_bias=False)(jnp.tanh(bn(h)))


def _bn_net_np(p, stats, x, eps=1e-5):
    """Dense → BatchNorm (running statistics) → tanh → Dense, in float64 NumPy."""
    p, stats = (jax.tree.map(lambda a: np.asarray(a, np.float64), t) for t in (p, stats))
    z = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"]
    st = stats["BatchNorm_0"]
    z = (z - st["mean"]) / np.sqrt(st["var"] + eps)
    return np.tanh(z) @ p["Dense_1"]["kernel"]


def _leaves_np(tree):
    def np_of(a):
        is_key = jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
        return np.asarray(jax.random.key_data(a) if is_key else a)

    return [np_of(a) for a in jax.tree.leaves(tree)]


def test_nnx_batch_stats_and_rngs_are_not_perturbed():
    model = NNXBNNet(nnx.Rngs(0))
    model(3.0 * X + 1.0)  # training mode: moves the running statistics off their init values
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=30.0), wrt=nnx.Param)
    model.eval()
    before = _leaves_np(nnx.state(model))
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert np.all(np.asarray(stats["BatchNorm_0"]["mean"]) != 0.0)

    one = ivon_nnx.sampled_model(jax.random.key(1), model, optimizer)
    for a, b in zip(
        _leaves_np(nnx.state(one, nnx.Not(nnx.Param))),
        _leaves_np(nnx.state(model, nnx.Not(nnx.Param))),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)  # batch statistics and RNG state: identical
    for a, b in zip(
        _leaves_np(nnx.state(one, nnx.Param)), _leaves_np(nnx.state(model, nnx.Param)), strict=True
    ):
        assert np.all(a != b)  # every parameter moved

    key = jax.random.key(2)
    keys = jax.random.split(key, S)
    params = _pure(model)
    want = np.mean(
        [
            _softmax_np(
                _bn_net_np(ivon_jax.sample_params(k, params, optimizer.opt_state)[0], stats, X)
            )
            for k in keys
        ],
        axis=0,
    )
    got = nnx_predict_proba(key, model, optimizer, X, num_samples=S, chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    for a, b in zip(_leaves_np(nnx.state(model)), before, strict=True):
        np.testing.assert_array_equal(a, b)  # the model itself is untouched

    model.train()  # BatchNorm would update its statistics, Dropout its RNG: a clear error
    with pytest.raises(ValueError, match=r"BatchNorm_0.*model\.eval\(\)"):
        nnx_predict_proba(key, model, optimizer, X, num_samples=S, chunk_size=CHUNK)
    # (Training in this mode writes the changes back: tests/test_flax_stateful.py.)
    for a, b in zip(_leaves_np(nnx.state(model)), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_linen_batch_stats_are_not_perturbed():
    model = LinenBNNet()
    variables = model.init(jax.random.key(0), X, train=False)
    _, updated = model.apply(variables, 3.0 * X + 1.0, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
    assert np.all(np.asarray(variables["batch_stats"]["BatchNorm_0"]["mean"]) != 0.0)
    opt_state = ivon_jax.ivon(0.1, ess=30.0).init(variables["params"])

    sampled = ivon_linen.sample_variables(jax.random.key(1), variables, opt_state)
    assert set(sampled) == {"params", "batch_stats"}
    for a, b in zip(
        _leaves_np(sampled["batch_stats"]), _leaves_np(variables["batch_stats"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves_np(sampled["params"]), _leaves_np(variables["params"]), strict=True):
        assert np.all(a != b)

    key = jax.random.key(2)
    keys = jax.random.split(key, S)
    want = np.mean(
        [
            _softmax_np(
                _bn_net_np(
                    ivon_jax.sample_params(k, variables["params"], opt_state)[0],
                    variables["batch_stats"],
                    X,
                )
            )
            for k in keys
        ],
        axis=0,
    )
    apply_fn = functools.partial(model.apply, train=False)
    got = linen_predict_proba(
        key, apply_fn, variables, opt_state, X, num_samples=S, chunk_size=CHUNK
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------ Multi-IVON


def test_nnx_and_linen_multi_ivon(nnx_run):
    model_a, opt_a = nnx_run
    model_b, opt_b = _nnx_run(7)
    key = jax.random.key(8)
    # K = 1 reduces to the single predictive: tests/test_predictive.py.
    # K = 2 is the hand average of the members' averages, member k with split(key, 2)[k].
    members = [(model_a, opt_a), (model_b, opt_b)]
    k0, k1 = jax.random.split(key, 2)
    want_a, outs_a = _hand_probs(k0, _pure(model_a), opt_a.opt_state, X, S)
    want_b, outs_b = _hand_probs(k1, _pure(model_b), opt_b.opt_state, X, S)
    got = nnx_mixture_proba(key, members, X, num_samples=S, chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(got), (want_a + want_b) / 2, rtol=2e-5, atol=1e-6)
    # Regression: the pooled moments of the 2 × S sampled predictions.
    pooled = np.concatenate([outs_a, outs_b])
    mean, var = nnx_mixture_regression(key, members, X, num_samples=S, chunk_size=CHUNK)
    np.testing.assert_allclose(np.asarray(mean), pooled.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), pooled.var(0), rtol=1e-4, atol=1e-7)
    # Linen: the same members as (variables, opt_state) pairs give the same mixture.
    linen_members = [({"params": _pure(m)}, o.opt_state) for m, o in members]
    got_linen = linen_mixture_proba(
        key, LinenNet().apply, linen_members, X, num_samples=S, chunk_size=CHUNK
    )
    np.testing.assert_allclose(np.asarray(got_linen), np.asarray(got), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------- errors


def test_errors(nnx_run):
    model, optimizer = nnx_run
    key = jax.random.key(0)
    variables = {"params": _pure(model)}
    apply_fn = LinenNet().apply
    with pytest.raises(ValueError, match="chunk_size"):
        ivon_nnx.predict_proba(key, model, optimizer, X, num_samples=4, chunk_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        ivon_nnx.predict_regression(key, model, optimizer, X, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        ivon_nnx.value_and_grad(lambda m: 0.0, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ivon_linen.predict_proba(
            key, apply_fn, variables, optimizer.opt_state, X, num_samples=4, chunk_size=-1
        )
    with pytest.raises(ValueError, match="num_samples"):
        ivon_linen.predict_regression(
            key, apply_fn, variables, optimizer.opt_state, X, num_samples=0
        )
    with pytest.raises(ValueError, match="K >= 1"):
        ivon_nnx.mixture_predict_proba(key, [], X, num_samples=2)
    with pytest.raises(ValueError, match="K >= 1"):
        ivon_linen.mixture_predict_regression(key, apply_fn, [], X, num_samples=2)
    with pytest.raises(ValueError, match=r"\(model, optimizer\)"):
        ivon_nnx.mixture_predict_proba(key, (model, optimizer), X, num_samples=2)
    with pytest.raises(ValueError, match="'params'"):
        ivon_linen.predict_proba(
            key, apply_fn, variables["params"], optimizer.opt_state, X, num_samples=2
        )
    sgd = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    with pytest.raises(ValueError, match="no IVON state"):
        ivon_nnx.sampled_model(key, model, sgd)
