"""The model-agnostic Monte-Carlo predictive (`ivon_jax._src.predictive`).

Reference values are computed independently: the weight samples come from
`ivon_jax.sample_params` with the documented keys (sample s uses `split(key, S)[s]`), and the
network, softmax, averages and variances are recomputed in float64 NumPy.

XLA compiles of the sampler dominate the run time on CPU, so the functions under test are
jitted once at module level (static apply_fn, num_samples, chunk_size) and shared by the tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax
from ivon_jax._src import predictive

S = 7  # a prime, so that most chunk sizes do not divide it
ZERO = jnp.zeros(4)  # a zero observation-noise variance: shares compiles with the nonzero one


def _init(key):
    # Two leaves keep the compiles short (each leaf adds a noise draw to every program).
    k1, k2 = jax.random.split(key)
    return {"l1": jax.random.normal(k1, (3, 5)), "l2": jax.random.normal(k2, (5, 4))}


def _apply(params, x):
    return jnp.tanh(x @ params["l1"]) @ params["l2"]


def _apply_np(params, x):
    """The same network in float64 NumPy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    return np.tanh(np.asarray(x, np.float64) @ p["l1"]) @ p["l2"]


_STATIC = {"static_argnums": 1, "static_argnames": ("num_samples", "chunk_size")}
predict_proba = jax.jit(predictive.predict_proba, **_STATIC)
predict_regression = jax.jit(predictive.predict_regression, **_STATIC)
mixture_predict_proba = jax.jit(predictive.mixture_predict_proba, **_STATIC)
mixture_predict_regression = jax.jit(predictive.mixture_predict_regression, **_STATIC)


def _softmax_np(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _trained_state(params, ess=30.0, seed=100):
    """An IVON state whose h varies per element, in [0.1, 2.1)."""
    state = ivon_jax.ivon(0.05, ess=ess).init(params)
    leaves, treedef = jax.tree.flatten(params)
    hess = [
        np.random.default_rng(seed + i).uniform(0.1, 2.1, p.shape).astype(np.float32)
        for i, p in enumerate(leaves)
    ]
    return optax.tree_utils.tree_set(state, hess=jax.tree.unflatten(treedef, hess))


def _hand_outputs(key, params, state, x, num_samples):
    """Network outputs (float64) at each of the S samples, sample s from split(key, S)[s]."""
    keys = jax.random.split(key, num_samples)
    return np.stack([_apply_np(ivon_jax.sample_params(k, params, state)[0], x) for k in keys])


@pytest.fixture(scope="module")
def setup():
    params = _init(jax.random.key(0))
    state = _trained_state(params)
    x = jax.random.normal(jax.random.key(1), (6, 3))
    return params, state, x


def test_sigma_is_not_uniform(setup):
    # Guards the other tests: a non-trivial posterior (σ differs across elements).
    _, state, _ = setup
    sigma = np.concatenate([np.ravel(s) for s in jax.tree.leaves(ivon_jax.posterior_std(state))])
    assert sigma.std() > 0.1 * sigma.mean()


def test_predict_proba_equals_hand_average(setup):
    params, state, x = setup
    key = jax.random.key(7)
    want = _softmax_np(_hand_outputs(key, params, state, x, S)).mean(axis=0)
    got = predict_proba(key, _apply, params, state, x, num_samples=S)
    assert got.shape == (6, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    # The samples really differ: the average is not the prediction at the mean.
    at_mean = _softmax_np(_apply_np(params, x))
    assert np.max(np.abs(want - at_mean)) > 1e-3


def test_predict_regression_equals_hand_moments(setup):
    params, state, x = setup
    key = jax.random.key(8)
    outs = _hand_outputs(key, params, state, x, S)
    mean, var = predict_regression(key, _apply, params, state, x, num_samples=S, noise_var=ZERO)
    np.testing.assert_allclose(np.asarray(mean), outs.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), outs.var(axis=0), rtol=1e-4, atol=1e-6)
    # Observation noise, broadcast over the rows (a scalar one: see the mixture test).
    nv = jnp.asarray([0.0, 1.0, 2.0, 3.0])
    _, var_a = predict_regression(key, _apply, params, state, x, num_samples=S, noise_var=nv)
    np.testing.assert_allclose(
        np.asarray(var_a), outs.var(axis=0) + np.asarray(nv)[None, :], rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_chunked_equals_unchunked(setup, chunk_size):
    # S = 7: chunks of 1 (7 full chunks), 3 (2 full + 1), 4 (1 full + 3).
    params, state, x = setup
    key = jax.random.key(9)
    m_all, v_all = predict_regression(key, _apply, params, state, x, num_samples=S, noise_var=ZERO)
    m_chk, v_chk = predict_regression(
        key, _apply, params, state, x, num_samples=S, chunk_size=chunk_size, noise_var=ZERO
    )
    np.testing.assert_allclose(np.asarray(m_chk), np.asarray(m_all), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v_chk), np.asarray(v_all), rtol=1e-5, atol=1e-7)
    # The variance is not trivially zero.
    assert np.min(np.asarray(v_all)) > 1e-3


def test_single_sample_zero_variance_equals_mean_prediction(setup):
    params, _, x = setup
    # σ = 1/sqrt(1e30 (1 + 1e-4)) ≈ 1e-15: the sample is the mean up to rounding.
    state = ivon_jax.ivon(0.1, ess=1e30).init(params)
    key = jax.random.key(3)
    mean, var = predict_regression(key, _apply, params, state, x, num_samples=1)
    np.testing.assert_allclose(np.asarray(mean), _apply_np(params, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(var), 0.0)  # one sample: exactly no spread


def test_single_sample_variance_is_zero_even_with_wide_posterior(setup):
    params, state, x = setup
    _, var = predict_regression(jax.random.key(4), _apply, params, state, x, num_samples=1)
    np.testing.assert_array_equal(np.asarray(var), 0.0)


def test_linear_model_variance_matches_closed_form():
    # f(x) = x · w with w ~ N(m, diag(σ²)): Var f(x) = Σ_i x_i² σ_i², mean = x · m.
    # With S = 4096 samples the relative standard error of a variance is √(2/S) ≈ 2.2%.
    w = jnp.asarray([0.5, -1.0, 2.0])
    params = {"w": w}
    state = _trained_state(params, ess=20.0)
    sigma = np.asarray(ivon_jax.posterior_std(state)["w"], np.float64)
    x = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 2.0, -1.0]])
    apply = lambda p, x: x @ p["w"]
    mean, var = predict_regression(
        jax.random.key(5), apply, params, state, x, num_samples=4096, chunk_size=512
    )
    want_var = (np.asarray(x, np.float64) ** 2) @ sigma**2
    np.testing.assert_allclose(np.asarray(var), want_var, rtol=5 * np.sqrt(2 / 4096))
    se_mean = np.sqrt(want_var / 4096)
    assert np.all(np.abs(np.asarray(mean) - np.asarray(x @ w)) < 5 * se_mean)


def test_mean_and_variance_of_a_pytree(setup):
    params, state, _ = setup
    key = jax.random.key(6)
    fn = lambda p: {"sq": p["l1"] ** 2, "sum": jnp.sum(p["l2"])}
    keys = jax.random.split(key, S)
    draws = [ivon_jax.sample_params(k, params, state)[0] for k in keys]
    sq = np.stack([np.asarray(d["l1"], np.float64) ** 2 for d in draws])
    sums = np.asarray([np.asarray(d["l2"], np.float64).sum() for d in draws])
    mean, var = jax.jit(
        lambda k: predictive.mean_and_variance(k, fn, params, state, num_samples=S, chunk_size=2)
    )(key)
    np.testing.assert_allclose(np.asarray(mean["sq"]), sq.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var["sq"]), sq.var(0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(var["sum"]), sums.var(), rtol=1e-4)
    np.testing.assert_allclose(float(mean["sum"]), sums.mean(), rtol=1e-5)


def test_chunk_size_larger_than_num_samples_is_all_at_once():
    assert predictive.check_chunk_size(50, 7) == 7
    assert predictive.check_chunk_size(None, 7) == 7
    assert predictive.check_chunk_size(3, 7) == 3


# ------------------------------------------------------------------------------ Multi-IVON


def _members():
    out = []
    for seed in (11, 12):
        params = _init(jax.random.key(seed))
        out.append((params, _trained_state(params, ess=40.0 + seed, seed=seed)))
    return out


def test_mixture_single_member_equals_single_predictive(setup):
    params, state, x = setup
    key = jax.random.key(20)
    mix = mixture_predict_proba(key, _apply, [(params, state)], x, num_samples=S)
    member_key = jax.random.split(key, 1)[0]
    single = predict_proba(member_key, _apply, params, state, x, num_samples=S)
    np.testing.assert_allclose(np.asarray(mix), np.asarray(single), rtol=1e-6, atol=1e-7)


def test_mixture_of_two_equals_hand_average(setup):
    _, _, x = setup
    members = _members()
    key = jax.random.key(21)
    keys = jax.random.split(key, 2)
    outs = [_hand_outputs(keys[k], p, s, x, S) for k, (p, s) in enumerate(members)]
    want = np.mean([_softmax_np(o).mean(axis=0) for o in outs], axis=0)
    got = mixture_predict_proba(key, _apply, members, x, num_samples=S, chunk_size=3)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    # Regression: the mixture of 2 × S point masses has the pooled mean and variance.
    pooled = np.concatenate(outs, axis=0)
    mean, var = mixture_predict_regression(key, _apply, members, x, num_samples=S, noise_var=0.5)
    np.testing.assert_allclose(np.asarray(mean), pooled.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), pooled.var(0) + 0.5, rtol=1e-4)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_bad_num_samples(setup, bad):
    params, state, x = setup
    with pytest.raises(ValueError, match="num_samples"):
        predictive.predict_proba(jax.random.key(0), _apply, params, state, x, num_samples=bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_chunk_size(setup, bad):
    params, state, x = setup
    with pytest.raises(ValueError, match="chunk_size"):
        predictive.predict_regression(
            jax.random.key(0), _apply, params, state, x, num_samples=3, chunk_size=bad
        )


def test_traced_num_samples_is_a_clear_error(setup):
    params, state, x = setup
    f = jax.jit(
        lambda n: predictive.predict_proba(
            jax.random.key(0), _apply, params, state, x, num_samples=n
        )
    )
    with pytest.raises(ValueError, match="static"):
        f(3)


def test_mixture_errors(setup):
    params, state, x = setup
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="K >= 1"):
        predictive.mixture_predict_proba(key, _apply, [], x, num_samples=2)
    with pytest.raises(ValueError, match="K >= 1"):
        predictive.mixture_predict_regression(key, _apply, [], x, num_samples=2)
    with pytest.raises(ValueError, match="list of"):
        predictive.mixture_predict_proba(key, _apply, (params, state), x, num_samples=2)
    with pytest.raises(ValueError, match=r"members\[1\]"):
        predictive.mixture_predict_proba(key, _apply, [(params, state), params], x, num_samples=2)


def test_other_errors(setup):
    params, state, x = setup
    key = jax.random.key(0)
    # Jitted, so the errors come at trace time, before any compile.
    with pytest.raises(ValueError, match="noise_var"):
        predict_regression(key, _apply, params, state, x, num_samples=2, noise_var=jnp.ones(3))
    with pytest.raises(ValueError, match="one array"):
        predict_proba(key, lambda p, x: (_apply(p, x), 0), params, state, x, num_samples=2)
    with pytest.raises(ValueError, match="no IVON state"):
        predictive.predict_proba(key, _apply, params, optax.sgd(0.1).init(params), x, num_samples=2)
