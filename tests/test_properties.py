"""Property tests: h + δ stays positive for any sequence of Hessian estimates.

The h-update h' = β₂h + (1−β₂)ĥ + ½(1−β₂)²(h−ĥ)²/(h+δ) satisfies, with a = h + δ and
d = h − ĥ, h' + δ = a − (1−β₂)d + ½(1−β₂)²d²/a ≥ a/2 (the minimum over d, at
(1−β₂)d = a). So h + δ can at most halve per step, whatever ĥ is — including large negative
estimates, which Price's estimator produces.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import ivon_jax

SIZE = 4


@st.composite
def scenario(draw, max_abs):
    b2 = draw(st.floats(0.0, 0.99999))
    hess_init = draw(st.floats(1e-4, 1e2))
    wd = draw(st.one_of(st.just(0.0), st.floats(1e-8, 1.0)))
    n = draw(st.integers(1, 25))
    est = draw(
        st.lists(
            st.lists(st.floats(-max_abs, max_abs), min_size=SIZE, max_size=SIZE),
            min_size=n, max_size=n,
        )
    )
    return b2, hess_init, wd, np.asarray(est)


def _check(b2, hess_init, wd, est, dtype):
    tx = ivon_jax.scale_by_ivon(ess=10.0, hess_init=hess_init, b2=b2, weight_decay=wd)
    params = jnp.zeros(SIZE, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    prev = np.asarray(state.hess) + wd
    for h_hat in est:
        _, state = update(jnp.zeros(SIZE, dtype), state, params, hess=jnp.asarray(h_hat, dtype))
        h = np.asarray(state.hess)
        assert np.all(np.isfinite(h))
        assert np.all(h + wd > 0), (h, wd)
        # The per-step bound h' + δ ≥ (h + δ)/2, up to rounding.
        assert np.all(h + wd >= 0.5 * prev * (1 - 1e-5)), (h + wd, prev)
        prev = h + wd


@settings(max_examples=60, deadline=None)
@given(scenario(max_abs=1e4))
def test_h_plus_delta_stays_positive_float32(s):
    _check(*s, dtype=jnp.float32)


@settings(max_examples=60, deadline=None)
@given(scenario(max_abs=1e8))
def test_h_plus_delta_stays_positive_float64(s):
    with jax.enable_x64(True):
        _check(*s, dtype=jnp.float64)


def test_adversarial_negative_estimates_keep_h_positive():
    """A long run of huge negative ĥ: h shrinks geometrically but never reaches −δ."""
    tx = ivon_jax.scale_by_ivon(ess=1.0, hess_init=1.0, b2=0.9, weight_decay=0.0)
    params = jnp.zeros(SIZE, jnp.float32)
    state = tx.init(params)
    for _ in range(40):
        _, state = tx.update(
            jnp.zeros(SIZE, jnp.float32), state, params, hess=jnp.full(SIZE, -1e3, jnp.float32)
        )
        assert np.all(np.asarray(state.hess) > 0)
    # Without the correction term h would be 0.9h − 100 < 0 after the first step.
    assert np.all(np.asarray(state.hess) > 0)
