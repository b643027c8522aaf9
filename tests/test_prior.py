"""A prior centred away from zero: ``prior_mean="init"``, ``set_prior``, ``posterior_as_prior``.

The independent truth is Bayesian linear regression (y = Xθ + unit-variance noise, loss
ℓ̄(θ) = (1/N) Σ ½ (yᵢ − xᵢᵀθ)², ess λ = N). With prior N(m₀, diag(1/(N δ))) the exact
posterior has precision P = XᵀX + N diag(δ) and mean μ = P⁻¹(Xᵀy + N δ ⊙ m₀). The mean-field
(diagonal Gaussian) optimum of a Gaussian has the same mean and precisions diag(P), so IVON's
fixed point is m = μ, 1/σ² = λ (h + δ) = diag(P).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from regression_common import scan_regression

import ivon_jax
from ivon_jax import merging

N, D, SAMPLES = 200, 3, 16
STEPS, AVERAGE_LAST = 12000, 6000
M0 = np.array([0.5, -1.0, 2.0])
DELTA = np.array([0.02, 0.1, 0.5])


def _data(seed, orthogonal=False):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, D))
    if orthogonal:  # XᵀX diagonal: the mean-field posterior is the exact one
        q, _ = np.linalg.qr(z)
        x = q * np.sqrt(N) * np.array([1.5, 0.7, 1.1])
    else:
        x = z @ np.array([[2.0, 0.6, 0.0], [0.0, 0.5, -0.5], [0.0, 0.0, 1.5]])
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=N)
    return x.astype(np.float32), y.astype(np.float32)


def _run(opt, params, state, x, y, steps=STEPS, seed=0):
    record = lambda p, s: (p["theta"], ivon_jax.posterior_std(s)["theta"])
    (params, state), (ms, sigmas) = scan_regression(opt, params, state, x, y, steps=steps,
                                                    samples=SAMPLES, seed=seed, record=record)
    return params, state, np.asarray(ms), np.asarray(sigmas)


def _opt(weight_decay=0.0, **kw):
    # Exponential decay from 0.1 to 0.002 (optax's schedules mix int and float under the
    # suite's strict promotion).
    schedule = lambda count: 0.1 * jnp.float32(0.02) ** (count.astype(jnp.float32) / STEPS)
    return ivon_jax.ivon(
        schedule, ess=float(N), hess_init=1.0, b2=0.999, weight_decay=weight_decay, **kw
    )


def _errors(ms, sigmas, mu, precision):
    post_std = np.sqrt(np.diag(np.linalg.inv(precision)))
    mf_sigma = 1 / np.sqrt(np.diag(precision))
    m_err = np.abs(ms[-AVERAGE_LAST:].mean(0) - mu) / post_std  # in posterior stds
    # Time-averaged precision 1/σ² against diag(P) (h is a noisy EMA of ĥ).
    prec = (1 / sigmas[-AVERAGE_LAST:] ** 2).mean(0)
    s_err = np.abs(1 / np.sqrt(prec) - mf_sigma) / mf_sigma
    return m_err, s_err


def test_nonzero_mean_and_per_element_precision_reach_the_closed_form():
    """prior_mean="init" (m₀ = the initial parameters) and a per-element δ from set_prior."""
    x, y = _data(7)
    opt = _opt(prior_mean="init")
    params = {"theta": jnp.asarray(M0, jnp.float32)}
    state = ivon_jax.set_prior(opt.init(params), precision={"theta": jnp.asarray(DELTA)})
    _, _, ms, sigmas = _run(opt, params, state, x, y)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    precision = x64.T @ x64 + N * np.diag(DELTA)
    mu = np.linalg.solve(precision, x64.T @ y64 + N * DELTA * M0)
    m_err, s_err = _errors(ms, sigmas, mu, precision)
    print("mean error / posterior std:", m_err, "relative sigma error:", s_err)
    # Seen: mean errors ≤ 0.5% of a posterior std, σ within 0.5%; bounds leave ~4x margin and
    # reject m₀ = 0 (μ moves by > 1 posterior std) or δ scalar (σ moves by > 5%).
    assert np.all(m_err < 0.02), m_err
    assert np.all(s_err < 0.02), s_err
    # The check is not trivially met: the zero-mean posterior is far from this one.
    mu_zero = np.linalg.solve(precision, x64.T @ y64)
    post_std = np.sqrt(np.diag(np.linalg.inv(precision)))
    assert np.max(np.abs(mu_zero - mu) / post_std) > 1.0


def test_set_prior_from_a_posterior_is_sequential_bayes():
    """Task 1's posterior as task 2's prior = the closed form on both tasks' data."""
    delta = 0.05
    x1, y1 = _data(1, orthogonal=True)
    x2, y2 = _data(2)
    opt = _opt(weight_decay=delta)
    params = {"theta": jnp.zeros(D, jnp.float32)}
    params, state1, _, _ = _run(opt, params, opt.init(params), x1, y1, seed=1)
    opt2 = _opt(weight_decay=123.0)  # overridden by set_prior's δ
    state2 = ivon_jax.set_prior(opt2.init(params), **ivon_jax.posterior_as_prior(params, state1))
    _, _, ms, sigmas = _run(opt2, params, state2, x2, y2, seed=2)
    a, b = (v.astype(np.float64) for v in (x1, x2))
    precision = a.T @ a + b.T @ b + N * delta * np.eye(D)
    mu = np.linalg.solve(precision, a.T @ y1.astype(np.float64) + b.T @ y2.astype(np.float64))
    m_err, s_err = _errors(ms, sigmas, mu, precision)
    print("mean error / posterior std:", m_err, "relative sigma error:", s_err)
    # Task 1's final (not time-averaged) h carries its EMA noise into the prior: looser.
    assert np.all(m_err < 0.05), m_err
    assert np.all(s_err < 0.03), s_err
    # Task 2 alone (prior N(0, 1/(Nδ))) is far from this answer.
    alone = np.linalg.solve(b.T @ b + N * delta * np.eye(D), b.T @ y2.astype(np.float64))
    post_std = np.sqrt(np.diag(np.linalg.inv(precision)))
    assert np.max(np.abs(alone - mu) / post_std) > 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prior_mean_init_pulls_towards_the_initial_weights(dtype):
    init = jnp.asarray([1.0, -2.0, 3.0], dtype)
    loss = lambda p: jnp.mean(jnp.square(p["w"].astype(jnp.float32) - 10.0))
    vg = ivon_jax.value_and_grad(loss)
    finals = {}
    for mean in ("zero", "init"):
        opt = ivon_jax.ivon(0.5, ess=100.0, weight_decay=1e4, rescale_lr=False, b2=0.99,
                            prior_mean=mean)
        params = {"w": init}
        state = opt.init(params)
        for i in range(100):
            _, grads, hess = vg(jax.random.key(i), params, state)
            updates, state = opt.update(grads, state, params, hess=hess)
            params = optax.apply_updates(params, updates)
        finals[mean] = np.asarray(params["w"], np.float64)
    # δ = 1e4 dominates the data (gradient ~ 20): the mean sits at the prior's centre.
    np.testing.assert_allclose(finals["init"], np.asarray(init, np.float64), atol=0.02)
    assert np.all(np.abs(finals["zero"]) < 0.02), finals["zero"]


def test_state_size_only_grows_when_used():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3)}
    base = ivon_jax.ivon(0.1, ess=10.0).init(params)
    st = ivon_jax.find_ivon_states(base)[0]
    assert st.prior_mean is None and st.prior_precision is None
    leaves0 = jax.tree.leaves(base)
    init = ivon_jax.find_ivon_states(
        ivon_jax.ivon(0.1, ess=10.0, prior_mean="init").init(params))[0]
    assert len(jax.tree.leaves(init)) == len(jax.tree.leaves(st)) + 2
    assert init.prior_mean["w"].dtype == jnp.bfloat16  # one buffer like the parameter
    np.testing.assert_array_equal(np.asarray(init.prior_mean["w"], np.float32), 1.0)
    scalar = ivon_jax.find_ivon_states(ivon_jax.set_prior(base, precision=0.5))[0]
    assert [d.shape for d in jax.tree.leaves(scalar.prior_precision)] == [(), ()]
    assert sum(x.size for x in jax.tree.leaves(base)) == sum(x.size for x in leaves0)


def test_everything_reads_the_per_element_precision():
    params = {"w": jnp.asarray([[0.3, -1.0], [2.0, 0.1]])}
    opt = ivon_jax.ivon(0.1, ess=50.0, hess_init=0.5, weight_decay=1e-3)
    delta = np.array([[0.0, 1.0], [4.0, 9.0]])
    state = ivon_jax.set_prior(opt.init(params), mean={"w": jnp.ones((2, 2))},
                               precision={"w": jnp.asarray(delta, jnp.float32)})
    sigma = 1 / np.sqrt(50.0 * (0.5 + delta))
    np.testing.assert_allclose(ivon_jax.posterior_std(state)["w"], sigma, rtol=1e-6)
    np.testing.assert_allclose(ivon_jax.posterior_std(state, params)["w"], sigma, rtol=1e-6)
    np.testing.assert_allclose(merging.hessian_from_state(state)["w"], 50 * (0.5 + delta),
                               rtol=1e-6)
    summary = ivon_jax.state_summary(state)
    np.testing.assert_allclose(summary["sigma_max"], sigma.max(), rtol=1e-6)
    # Noise: many draws, per-element std against σ.
    draws = jax.vmap(lambda k: ivon_jax.sample_params(k, params, state)[1]["w"])(
        jax.random.split(jax.random.key(0), 20000)
    )
    np.testing.assert_allclose(np.std(np.asarray(draws), axis=0), sigma, rtol=0.03)
    grads = {"w": jnp.ones((2, 2))}
    noise = {"w": jnp.full((2, 2), 0.01)}
    np.testing.assert_allclose(
        ivon_jax.estimate_hessian(grads, noise, state)["w"], 0.01 * (0.5 + delta) * 50, rtol=1e-6
    )
    # One step: (ḡ + δ (m − m₀)) / (h + δ) with zero gradient and ĥ = h (h stays 0.5).
    zero = {"w": jnp.zeros((2, 2))}
    updates, _ = opt.update(zero, state, params, hess={"w": jnp.full((2, 2), 0.5)})
    m = np.asarray(params["w"])
    expected = -0.1 * (0.5 + 1e-3) * delta * (m - 1) / (0.5 + delta)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5, atol=1e-8)
    # posterior_as_prior: δ' = h + δ (same λ) or λ(h + δ)/λ'.
    prior = ivon_jax.posterior_as_prior(params, state)
    np.testing.assert_allclose(prior["precision"]["w"], 0.5 + delta, rtol=1e-6)
    prior = ivon_jax.posterior_as_prior(params, state, ess=25.0)
    np.testing.assert_allclose(prior["precision"]["w"], 2 * (0.5 + delta), rtol=1e-6)


def test_zero_precision_elements_keep_h_above_the_floor():
    """δ = 0 in some elements: adversarial ĥ cannot make h + δ reach 0."""
    params = {"w": jnp.zeros(3)}
    opt = ivon_jax.ivon(0.1, ess=10.0, b2=0.5)
    state = ivon_jax.set_prior(opt.init(params), precision={"w": jnp.asarray([0.0, 1e-3, 1.0])})
    for _ in range(50):
        _, state = opt.update(params, state, params, hess={"w": jnp.full(3, -1e3)})
    st = ivon_jax.find_ivon_states(state)[0]
    total = np.asarray(st.hess["w"]) + np.array([0.0, 1e-3, 1.0], np.float32)
    assert np.all(total > 0) and np.all(np.isfinite(ivon_jax.posterior_std(state)["w"]))
    # The floor is per element: h at each element's bound counts as clamped (with the scalar
    # weight_decay's bound, the δ = 1 element would not).
    from ivon_jax._src.state import hess_lower_bound

    floor = hess_lower_bound(jnp.asarray([0.0, 1e-3, 1.0]), jnp.float32)
    at_floor = ivon_jax.set_prior(state, precision={"w": jnp.asarray([0.0, 1e-3, 1.0])})
    inner = ivon_jax.find_ivon_states(at_floor)[0]._replace(hess={"w": floor})
    assert float(ivon_jax.state_summary(inner)["frac_h_at_floor"]) == 1.0
    assert float(ivon_jax.state_summary(inner._replace(prior_precision=None))[
        "frac_h_at_floor"]) < 1.0


def test_works_in_masked_chain_jit_and_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(2), "frozen": jnp.ones(2)}
    mask = {"w": True, "b": True, "frozen": False}
    opt = optax.masked(
        optax.chain(optax.clip_by_global_norm(1.0),
                    ivon_jax.ivon(0.1, ess=10.0, prior_mean="init")),
        mask, mask_compatible_extra_args=True,
    )
    state = opt.init(params)
    state = ivon_jax.set_prior(
        state, precision=jax.tree.map(lambda p: jnp.full(p.shape, 2.0), params)
    )

    @jax.jit
    def step(params, state, key):
        _, grads, hess = ivon_jax.value_and_grad(
            lambda p: jnp.sum(jnp.square(p["w"].astype(jnp.float32))) + jnp.sum(p["b"])
        )(key, params, state)
        updates, state = opt.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("standard"):  # clip_by_global_norm mixes bf16 and f32
        for i in range(3):
            params, state = step(params, state, jax.random.key(i))
    assert params["frozen"].tolist() == [1.0, 1.0]
    assert step._cache_size() == 1
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    st = ivon_jax.find_ivon_states(restored)[0]
    assert st.prior_mean["w"].dtype == jnp.bfloat16


def test_sharded_like_the_parameters():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ("d",))
    sharding = NamedSharding(mesh, P("d", None))
    params = {"w": jax.device_put(jnp.ones((16, 4)), sharding)}
    opt = ivon_jax.ivon(0.1, ess=10.0, prior_mean="init")
    st = ivon_jax.find_ivon_states(opt.init(params))[0]
    assert st.prior_mean["w"].sharding.is_equivalent_to(sharding, 2)
    state = ivon_jax.set_prior(opt.init(params),
                               **ivon_jax.posterior_as_prior(params, opt.init(params)))
    st = ivon_jax.find_ivon_states(state)[0]
    assert st.prior_precision["w"].sharding.is_equivalent_to(sharding, 2)
    assert st.prior_mean["w"].sharding.is_equivalent_to(sharding, 2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prior_mean"):
        ivon_jax.ivon(0.1, ess=10.0, prior_mean="pretrained")
    params = {"w": jnp.zeros(3)}
    state = ivon_jax.ivon(0.1, ess=10.0).init(params)
    with pytest.raises(ValueError, match=">= 0"):
        ivon_jax.set_prior(state, precision=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        ivon_jax.set_prior(state, precision={"w": jnp.asarray([1.0, jnp.nan, 1.0])})
    with pytest.raises(ValueError, match="shape"):
        ivon_jax.set_prior(state, mean={"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="lacks"):
        ivon_jax.set_prior(state, mean={"v": jnp.zeros(3)})
    with pytest.raises(ValueError, match="no IVON state"):
        ivon_jax.set_prior(optax.adam(0.1).init(params), precision=1.0)


def test_set_prior_on_an_nnx_optimizer_state():
    """set_prior and posterior_as_prior work on `nnx.Optimizer.opt_state` (NNX Variables in
    the state): σ reads the new per-element precision, and a step with no gradient moves the
    weights towards the new prior mean."""
    from flax import nnx

    import ivon_jax.flax.nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=10.0, hess_init=1.0,
                                                   prior_mean="init"), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    prior = ivon_jax.posterior_as_prior(params, optimizer.opt_state)
    shifted = jax.tree.map(lambda a: a + 1.0, prior["mean"])
    optimizer.opt_state = ivon_jax.set_prior(optimizer.opt_state, mean=shifted, precision=0.5)
    sigma = ivon_jax.posterior_std(optimizer.opt_state, params)
    for s in jax.tree.leaves(sigma):  # 1/√(λ(h₀ + 0.5)), h₀ = 1, λ = 10
        np.testing.assert_allclose(np.asarray(s), 1 / np.sqrt(10.0 * 1.5), rtol=1e-6)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    zeros = jax.tree.map(jnp.zeros_like, params)
    optimizer.update(model, zeros, hess=zeros)
    after = nnx.state(model, nnx.Param)
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.all(np.asarray(a) > b)  # towards the mean, which is 1 above every weight
