"""ivon_jax.sensitivity: prediction variance, sensitivities and the leave-one-out estimate.

Independent references: the full Jacobian from ``jax.jacobian`` contracted in numpy (float64),
and exact leave-one-out refits of Bayesian linear regression in closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax
from ivon_jax import sensitivity

# ------------------------------------------------------------------------ a tiny classifier

N, D_IN, HIDDEN, C = 5, 3, 4, 3


def _mlp():
    rng = np.random.default_rng(0)
    params = {
        "l1": {"w": jnp.asarray(rng.normal(size=(D_IN, HIDDEN)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=HIDDEN) * 0.1, jnp.float32)},
        "l2": {"w": jnp.asarray(rng.normal(size=(HIDDEN, C)), jnp.float32),
               "b": jnp.asarray(rng.normal(size=C) * 0.1, jnp.float32)},
    }
    sigma = jax.tree.map(
        lambda p: jnp.asarray(rng.uniform(0.05, 0.5, size=p.shape), jnp.float32), params
    )
    x = jnp.asarray(rng.normal(size=(N, D_IN)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, size=N), jnp.int32)
    return params, sigma, x, y


def _apply(params, x):
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"][None, :])
    return h @ params["l2"]["w"] + params["l2"]["b"][None, :]


def _explicit(params, sigma, x, y):
    """J Σ Jᵀ from the full (N, C, P) Jacobian, residuals and LOO in numpy float64."""
    jac = jax.jit(jax.jacobian(_apply))(params, x)  # leaves of shape (N, C, *param_shape)
    j = np.concatenate([np.asarray(a, np.float64).reshape(N, C, -1)
                        for a in jax.tree.leaves(jac)], axis=-1)
    s2 = np.concatenate([np.square(np.asarray(s, np.float64)).ravel()
                         for s in jax.tree.leaves(sigma)])
    v = np.einsum("nap,p,nbp->nab", j, s2, j)
    f = np.asarray(_apply(params, x), np.float64)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = p - np.eye(C)[np.asarray(y)]
    shift = np.einsum("nab,nb->na", v, e)

    def ce(logits):
        z = logits - logits.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(N), np.asarray(y)])

    return v, e, shift, ce(f), ce(f + shift)


@pytest.mark.parametrize("batch_size", [None, 2, 8])  # 2: with a remainder; 8: more than N
def test_prediction_variance_matches_explicit_jacobian(batch_size):
    params, sigma, x, y = _mlp()
    v_ref, *_ = _explicit(params, sigma, x, y)
    v = jax.jit(lambda p, s, xs: sensitivity.prediction_variance(
        _apply, p, s, xs, batch_size=batch_size))(params, sigma, x)
    assert v.shape == (N, C, C)
    np.testing.assert_allclose(np.asarray(v, np.float64), v_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_sensitivity_matches_explicit_computation(batch_size):
    params, sigma, x, y = _mlp()
    _, e_ref, shift_ref, loss_ref, loo_ref = _explicit(params, sigma, x, y)
    res = jax.jit(lambda p, s, xs, ys: sensitivity.sensitivity(
        _apply, p, s, xs, ys, batch_size=batch_size))(params, sigma, x, y)
    np.testing.assert_allclose(np.asarray(res.residuals), e_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(res.shifts), shift_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(res.scores), np.linalg.norm(shift_ref, axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(float(res.loss), loss_ref, rtol=1e-5)
    np.testing.assert_allclose(float(res.loo), loo_ref, rtol=1e-5)
    assert loo_ref > loss_ref + 1e-3  # the shift is not negligible: the check has teeth


def test_loo_estimator_reads_sigma_from_the_ivon_state_and_jits():
    params, _, x, y = _mlp()
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      ivon_jax.ivon(0.1, ess=float(N), hess_init=0.3, weight_decay=0.01))
    state = opt.init(params)
    sigma = jax.tree.map(lambda p: jnp.full(p.shape, 1 / np.sqrt(N * (0.3 + 0.01)), jnp.float32),
                         params)
    *_, shift_ref, _, loo_ref = _explicit(params, sigma, x, y)
    loo_fn = jax.jit(sensitivity.loo_estimator(_apply, batch_size=2))
    loo, scores = loo_fn(params, state, (x, y))
    np.testing.assert_allclose(float(loo), loo_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), np.linalg.norm(shift_ref, axis=1), rtol=1e-5)


# ------------------------------------------------------------------------ linear regression

NR, DR, DELTA = 200, 3, 0.05


def _regression():
    """Orthogonal design: XᵀX is diagonal, so the exact Gaussian posterior of
    Σ_i ½ (y_i − x_iᵀθ)² + ½ N δ ‖θ‖² has diagonal precision P = XᵀX + NδI (mean field is
    exact and σ² = 1/diag(P))."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(NR, DR)))
    x = q * np.array([6.0, 3.0, 1.5])  # orthogonal columns, unequal norms
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=NR)
    precision = x.T @ x + NR * DELTA * np.eye(DR)
    assert np.allclose(precision, np.diag(np.diag(precision)))
    mean = np.linalg.solve(precision, x.T @ y)
    return x, y, precision, mean


def _exact_loo(x, y, precision):
    """Refit without example i (closed form), predict example i."""
    preds = np.empty(NR)
    for i in range(NR):
        xi = np.delete(x, i, axis=0)
        yi = np.delete(y, i)
        theta = np.linalg.solve(xi.T @ xi + NR * DELTA * np.eye(DR), xi.T @ yi)
        preds[i] = x[i] @ theta
    assert np.allclose(precision - np.outer(x[0], x[0]), np.delete(x, 0, 0).T
                       @ np.delete(x, 0, 0) + NR * DELTA * np.eye(DR))
    return preds


def _linear(params, x):
    return x @ params["theta"]


def test_loo_matches_exact_leave_one_out_refits_for_linear_regression():
    """Tolerance, derived: with v_i = x_iᵀ P⁻¹ x_i the exact LOO prediction is
    f_i + v_i e_i / (1 − v_i) (Sherman–Morrison) while the formula gives f_i + v_i e_i, so
    (a) the predicted shift times 1/(1 − v_i) equals the exact shift (to float64 rounding);
    (b) each LOO residual is (1 − v_i²) times the exact one, so the LOO loss estimate lies in
        [(1 − max v²)², 1] times the exact LOO loss: here within 0.4% (max leverage 0.043)."""
    with jax.enable_x64(True):
        x, y, precision, mean = _regression()
        params = {"theta": jnp.asarray(mean)}
        sigma = {"theta": jnp.asarray(1 / np.sqrt(np.diag(precision)))}
        run = jax.jit(lambda s: sensitivity.sensitivity(
            _linear, params, s, jnp.asarray(x), jnp.asarray(y), loss="squared", batch_size=16))
        res = run(sigma)
        # σ² off by a factor of two either way (for the teeth check below).
        wrong_loos = [float(run({"theta": sigma["theta"] * np.sqrt(f)}).loo) for f in (0.5, 2.0)]
        v = np.asarray(sensitivity.prediction_variance(_linear, params, sigma,
                                                       jnp.asarray(x)))[:, 0, 0]
    f_loo = _exact_loo(x, y, precision)
    f = x @ mean
    np.testing.assert_allclose(v, np.einsum("nd,de,ne->n", x, np.linalg.inv(precision), x),
                               rtol=1e-10)
    np.testing.assert_allclose(np.asarray(res.outputs)[:, 0], f, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(res.residuals)[:, 0], f - y, rtol=1e-10)
    # (a) exact up to the known 1/(1 − v) factor.
    np.testing.assert_allclose(np.asarray(res.shifts)[:, 0] / (1 - v), f_loo - f,
                               rtol=1e-9, atol=1e-12)
    # (b) the LOO loss.
    exact_loo_loss = np.mean(0.5 * np.square(y - f_loo))
    train_loss = np.mean(0.5 * np.square(y - f))
    ratio = float(res.loo) / exact_loo_loss
    vmax = float(v.max())
    assert (1 - vmax**2) ** 2 - 1e-12 <= ratio <= 1 + 1e-12, (ratio, vmax)
    # Small leverage (the usual regime) makes the tolerance tight, yet the check has teeth:
    # the LOO loss is above the training loss by more than the tolerance, and σ² off by a
    # factor of two in either direction falls outside the bound.
    assert 0.02 < vmax < 0.1
    assert exact_loo_loss > (1 + 3 * (1 - (1 - vmax**2) ** 2)) * train_loss
    for wrong_loo in wrong_loos:
        wrong_ratio = wrong_loo / exact_loo_loss
        assert not (1 - vmax**2) ** 2 <= wrong_ratio <= 1, wrong_ratio
    np.testing.assert_allclose(float(res.loss), train_loss, rtol=1e-10)


def test_loo_from_an_ivon_state_with_the_exact_hessian():
    """IVON's units: h = diag(XᵀX)/N with ess = N and weight decay δ gives σ² = 1/diag(P)."""
    x, y, precision, mean = _regression()
    params = {"theta": jnp.asarray(mean, jnp.float32)}
    state = ivon_jax.ivon(0.1, ess=float(NR), weight_decay=DELTA).init(params)
    ivon_state = ivon_jax.find_ivon_states(state)[0]._replace(
        hess={"theta": jnp.asarray(np.diag(x.T @ x) / NR, jnp.float32)}
    )
    state = state._replace(inner_state=(ivon_state, *state.inner_state[1:]))
    loo, scores = sensitivity.loo_estimator(_linear, loss="squared", batch_size=7)(
        params, state, (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    )
    v = np.einsum("nd,de,ne->n", x, np.linalg.inv(precision), x)
    f = x @ mean
    expected_loo = np.mean(0.5 * np.square(y - (f + v * (f - y))))
    np.testing.assert_allclose(float(loo), expected_loo, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(scores), v * np.abs(f - y), rtol=1e-3, atol=1e-6)


def test_scalar_output_shapes_accepted():
    x, y, precision, mean = _regression()
    params = {"theta": jnp.asarray(mean[:, None], jnp.float32)}  # outputs of shape (B, 1)
    sigma = {"theta": jnp.asarray(1 / np.sqrt(np.diag(precision))[:, None], jnp.float32)}
    res = sensitivity.sensitivity(_linear, params, sigma, jnp.asarray(x, jnp.float32),
                                  jnp.asarray(y, jnp.float32), loss="squared")
    assert res.shifts.shape == (NR, 1) and res.scores.shape == (NR,)


# ------------------------------------------------------------------------ errors


def test_errors():
    params, sigma, x, y = _mlp()
    with pytest.raises(ValueError, match=r"`loss` must be one of"):
        sensitivity.sensitivity(_apply, params, sigma, x, y, loss="hinge")
    with pytest.raises(ValueError, match=r"`labels` must have shape \(N,\) = \(5,\)"):
        sensitivity.sensitivity(_apply, params, sigma, x, y[:4])
    with pytest.raises(ValueError, match=r"integer class indices"):
        sensitivity.sensitivity(_apply, params, sigma, x, y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"`sigma` and `params` must have the same tree"):
        sensitivity.sensitivity(_apply, params, {"l1": sigma["l1"]}, x, y)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1"):
        sensitivity.prediction_variance(_apply, params, sigma, x, batch_size=0)
    with pytest.raises(ValueError, match=r"one scalar per example"):
        sensitivity.sensitivity(_apply, params, sigma, x, y.astype(jnp.float32), loss="squared")
    with pytest.raises(ValueError, match=r"logits of shape \(batch, C\)"):
        sensitivity.sensitivity(lambda p, xb: _apply(p, xb)[:, 0], params, sigma, x, y)
    with pytest.raises(ValueError, match=r"same leading \(example\) axis"):
        sensitivity.sensitivity(_apply, params, sigma, {"a": x, "b": x[:2]}, y)
    loo_fn = sensitivity.loo_estimator(_apply)
    with pytest.raises(TypeError, match=r"`data` must be a tuple `\(inputs, labels\)`"):
        loo_fn(params, ivon_jax.ivon(0.1, ess=5.0).init(params), x)
    with pytest.raises(ValueError, match=r"no IVON state found"):
        loo_fn(params, optax.adam(0.1).init(params), (x, y))
