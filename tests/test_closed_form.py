"""IVON on Bayesian linear regression reaches the closed-form mean-field posterior.

Model: y = Xθ + noise (unit variance), loss ℓ̄(θ) = (1/N) Σ ½ (yᵢ − xᵢᵀθ)², ess λ = N and
prior N(0, (λδ)⁻¹ I). The exact posterior has precision XᵀX + NδI and mean
μ = (XᵀX + NδI)⁻¹ Xᵀy; the mean-field (diagonal Gaussian) optimum has the same mean and
precision λ (diag(H) + δ) with H = XᵀX / N, i.e. h → diag(H). Price's estimator is unbiased
for diag(H) on a quadratic, so IVON's fixed point is exactly this optimum.
"""

import jax.numpy as jnp
import numpy as np
from regression_common import scan_regression

import ivon_jax

N, D, DELTA = 200, 3, 0.05
STEPS, AVERAGE_LAST, SAMPLES = 20000, 16000, 16
# Tolerances: with these settings the time-averaged errors seen are ≤ 0.2% of a posterior std
# for m and ≤ 0.7% for the precision (stochastic h with b2 = 0.999); the bounds below leave
# about 5x that margin while still rejecting, e.g., a factor-of-two error in ĥ or in λ.


def _problem():
    rng = np.random.default_rng(7)
    z = rng.normal(size=(N, D))
    x = z @ np.array([[2.0, 0.6, 0.0], [0.0, 0.5, -0.5], [0.0, 0.0, 1.5]])  # correlated
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=N)
    return x.astype(np.float32), y.astype(np.float32)


def _run(b2: float = 0.999):
    x, y = _problem()
    opt = ivon_jax.ivon(0.1, ess=float(N), hess_init=1.0, b2=b2, weight_decay=DELTA)
    params = {"theta": jnp.zeros(D, jnp.float32)}
    record = lambda p, s: (p["theta"], ivon_jax.find_ivon_states(s)[0].hess["theta"])
    _, (ms, hs) = scan_regression(opt, params, opt.init(params), x, y, steps=STEPS,
                                  samples=SAMPLES, seed=0, record=record)
    return x, y, np.asarray(ms), np.asarray(hs)


def test_mean_and_precision_reach_the_mean_field_optimum():
    x, y, ms, hs = _run()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    precision = x64.T @ x64 + N * DELTA * np.eye(D)
    mu = np.linalg.solve(precision, x64.T @ y64)
    post_std = np.sqrt(np.diag(np.linalg.inv(precision)))
    diag_h = np.diag(x64.T @ x64) / N

    m_avg = ms[-AVERAGE_LAST:].mean(axis=0)
    h_avg = hs[-AVERAGE_LAST:].mean(axis=0)
    # Mean: within 2% of a posterior standard deviation of the exact posterior mean.
    assert np.all(np.abs(m_avg - mu) < 0.02 * post_std), (m_avg, mu, post_std)
    # Precision: 1/σ² = λ(h + δ) within 3% of λ(diag(H) + δ).
    lam_h = N * (h_avg + DELTA)
    target = N * (diag_h + DELTA)
    np.testing.assert_allclose(lam_h, target, rtol=0.03)
    # And σ from the state agrees with the formula (last state).
    sigma_last = 1.0 / np.sqrt(N * (hs[-1] + DELTA))
    np.testing.assert_allclose(sigma_last, 1 / np.sqrt(target), rtol=0.1)


def test_started_far_from_the_answer():
    """The check above is not trivially met: h starts at 1 and diag(H) is far from it."""
    x, _ = _problem()
    diag_h = np.diag(x.T.astype(np.float64) @ x) / N
    assert np.all(np.abs(diag_h - 1.0) > 0.2)
