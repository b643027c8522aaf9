"""`ivon_jax.state_summary`: the logged scalars against NumPy on hand-set Hessians.

Each truth is computed in float64 NumPy from the h values the test writes into the state and
the λ, δ it chose, not from ivon_jax's own σ code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

LEVELS = [0.0, 0.05, 0.5, 0.95, 1.0]
SUFFIXES = ("min", "p05", "p50", "p95", "max")
KEYS = {
    "step",
    "skipped",
    "frac_h_at_floor",
    "frac_h_negative",
    "frac_h_nonfinite",
    "frac_h_learned",
    "h_decay_share",
    "h0_weight",
    "sigma_prior_ratio_p50",
    *(f"{n}_{s}" for n in ("h", "sigma") for s in (*SUFFIXES, "mean")),
}
PARAMS = {"a": jnp.zeros((4, 5), jnp.float32), "b": jnp.zeros(7, jnp.float32)}


def _set_hess(state, make):
    """Replaces every IVON state's h by ``make(shape)`` (leaf by leaf, in tree order)."""
    is_ivon = lambda x: isinstance(x, ivon_jax.IVONState)

    def fill(st):
        if not is_ivon(st):
            return st
        return st._replace(hess=jax.tree.map(lambda h: jnp.asarray(make(h.shape)), st.hess))

    return jax.tree.map(fill, state, is_leaf=is_ivon)


def _uniform(rng, low, high):
    return lambda shape: rng.uniform(low, high, shape).astype(np.float32)


def _truth(groups):
    """NumPy summary of h and σ from ``[(h_leaves, ess, wd), ...]``."""
    h = np.concatenate([np.ravel(x) for hs, _, _ in groups for x in hs]).astype(np.float64)
    sigma = np.concatenate(
        [
            1 / np.sqrt(ess * (np.ravel(x).astype(np.float64) + wd))
            for hs, ess, wd in groups
            for x in hs
        ]
    )
    out = {}
    for name, v in (("h", h), ("sigma", sigma)):
        for s, q in zip(SUFFIXES, np.nanquantile(v, LEVELS), strict=True):
            out[f"{name}_{s}"] = q
        out[f"{name}_mean"] = np.nanmean(v)
    out["frac_h_negative"] = np.mean(h < 0)
    out["frac_h_nonfinite"] = np.mean(~np.isfinite(h))
    return out


def _check(summary, want, rtol=2e-6):
    assert set(summary) == KEYS
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(summary[k], np.float64), v, rtol=rtol, err_msg=k)


def _hess_leaves(state):
    return [
        [np.asarray(x) for x in jax.tree.leaves(st.hess)] for st in ivon_jax.find_ivon_states(state)
    ]


def test_plain_and_chained_match_numpy():
    rng = np.random.default_rng(0)
    ess, wd = 50.0, 0.5
    opt = ivon_jax.ivon(0.1, ess=ess, weight_decay=wd)
    # h in (-0.4, 3): some negative, all with h + δ > 0.
    state = _set_hess(opt.init(PARAMS), _uniform(rng, -0.4, 3.0))
    (hs,) = _hess_leaves(state)
    want = _truth([(hs, ess, wd)])
    assert 0 < want["frac_h_negative"] < 1
    summary = ivon_jax.state_summary(state)
    _check(summary, want)
    assert float(summary["frac_h_at_floor"]) == 0.0
    assert int(summary["step"]) == 0 and int(summary["skipped"]) == 0
    assert summary["h_p50"].dtype == jnp.float32 and summary["step"].dtype == jnp.int32

    # The same IVON state inside a chain, and checked against params: same summary.
    chained = (optax.clip_by_global_norm(1.0).init(PARAMS), state)
    _check(ivon_jax.state_summary(chained, PARAMS), want)


def test_at_floor_counts_hand_set_and_clamped_elements():
    wd = 1e-3
    opt = ivon_jax.ivon(0.1, ess=10.0, weight_decay=wd)
    f32 = np.finfo(np.float32)
    h_min = np.float32(max(f32.tiny, 4 * f32.eps * np.float32(wd))) - np.float32(wd)
    h = np.full(20, 1.0, np.float32)
    h[[1, 5, 6]] = h_min
    h[9] = np.nextafter(h_min, np.float32(1))  # one ulp above: not at the floor
    state = _set_hess(opt.init({"w": jnp.zeros(20)}), lambda shape: h)
    np.testing.assert_allclose(ivon_jax.state_summary(state)["frac_h_at_floor"], 3 / 20)

    # A real update clamps: with δ = 0, h = tiny and ĥ = 0, h' = β₂ tiny < tiny → the floor.
    opt = ivon_jax.ivon(0.1, ess=10.0, weight_decay=0.0, b2=0.5)
    h = np.full(8, 1.0, np.float32)
    h[:3] = f32.tiny
    params = {"w": jnp.zeros(8)}
    state = _set_hess(opt.init(params), lambda shape: h)
    hess_hat = {"w": jnp.asarray(np.where(h == 1.0, 1.0, 0.0), jnp.float32)}
    _, state = opt.update({"w": jnp.ones(8)}, state, params, hess=hess_hat)
    (new_h,) = _hess_leaves(state)[0]
    np.testing.assert_array_equal(new_h[:3], f32.tiny)  # clamped, exactly at the bound
    summary = ivon_jax.state_summary(state)
    np.testing.assert_allclose(summary["frac_h_at_floor"], 3 / 8)
    assert int(summary["step"]) == 1


def test_skipped_steps_are_counted():
    opt = ivon_jax.ivon(0.1, ess=10.0, skip_nonfinite=True)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    good = {"w": jnp.ones(3)}
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    for grads in (bad, good, bad):
        _, state = opt.update(grads, state, params, hess=good)
    summary = ivon_jax.state_summary(state)
    assert int(summary["skipped"]) == 2
    assert int(summary["step"]) == 1
    assert float(summary["frac_h_nonfinite"]) == 0.0  # the NaN never reached h


def test_masked_leaves_are_excluded():
    rng = np.random.default_rng(1)
    ess, wd = 20.0, 0.1
    opt = optax.masked(
        ivon_jax.ivon(0.1, ess=ess, weight_decay=wd),
        {"a": True, "b": False},
        mask_compatible_extra_args=True,
    )
    state = _set_hess(opt.init(PARAMS), _uniform(rng, 0.0, 5.0))
    (hs,) = _hess_leaves(state)
    assert [x.shape for x in hs] == [(4, 5)]  # only "a" is managed
    want = _truth([(hs, ess, wd)])
    _check(ivon_jax.state_summary(state), want)
    _check(ivon_jax.state_summary(state, PARAMS), want)


def _two_groups():
    rng = np.random.default_rng(2)
    tx = optax.multi_transform(
        {
            "x": ivon_jax.ivon(0.1, ess=30.0, weight_decay=0.2),
            "y": ivon_jax.ivon(0.1, ess=400.0, weight_decay=0.01),
        },
        {"a": "x", "b": "y"},
    )
    return _set_hess(tx.init(PARAMS), _uniform(rng, 0.0, 4.0))


def test_multi_transform_respects_each_groups_ess_and_weight_decay():
    state = _two_groups()
    groups = _hess_leaves(state)
    ess_wd = [(float(s.ess), float(s.weight_decay)) for s in ivon_jax.find_ivon_states(state)]
    assert sorted(ess_wd) == [(30.0, pytest.approx(0.2)), (400.0, pytest.approx(0.01))]
    want = _truth([(hs, e, w) for hs, (e, w) in zip(groups, ess_wd, strict=True)])
    _check(ivon_jax.state_summary(state), want)
    _check(ivon_jax.state_summary(state, PARAMS), want)


def test_jit_matches_eager():
    state = _two_groups()
    eager = ivon_jax.state_summary(state)
    jitted = jax.jit(ivon_jax.state_summary)(state)
    assert set(jitted) == set(eager) == KEYS
    for k in KEYS:
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6, err_msg=k)
        assert jitted[k].dtype == eager[k].dtype and jitted[k].shape == ()


def test_nonfinite_h_shows_and_does_not_hide_the_rest():
    opt = ivon_jax.ivon(0.1, ess=10.0, weight_decay=0.0)
    h = np.linspace(0.5, 2.0, 10).astype(np.float32)
    h[[2, 7]] = np.nan
    h[4] = np.inf
    state = _set_hess(opt.init({"w": jnp.zeros(10)}), lambda shape: h)
    summary = ivon_jax.state_summary(state)
    np.testing.assert_allclose(summary["frac_h_nonfinite"], 0.3)
    # NaNs are left out; the inf is the largest value (NumPy's linear interpolation gives NaN
    # for inf - inf there, so the top two levels are checked by hand).
    h64 = h.astype(np.float64)
    np.testing.assert_allclose(summary["h_p05"], np.nanquantile(h64, 0.05), rtol=1e-6)
    np.testing.assert_allclose(summary["h_p50"], np.nanquantile(h64, 0.5), rtol=1e-6)
    assert float(summary["h_p95"]) == float(summary["h_max"]) == np.inf
    assert float(summary["h_min"]) == 0.5 and float(summary["h_mean"]) == np.inf
    sigma = 1 / np.sqrt(10.0 * h64)  # 0 for the inf
    for s, q in zip(SUFFIXES, np.nanquantile(sigma, LEVELS), strict=True):
        np.testing.assert_allclose(summary[f"sigma_{s}"], q, rtol=1e-6, err_msg=s)
    np.testing.assert_allclose(summary["sigma_mean"], np.nanmean(sigma), rtol=1e-6)
    assert float(summary["sigma_min"]) == 0.0


def test_max_elements_takes_a_strided_subsample_for_quantiles_only():
    rng = np.random.default_rng(3)
    opt = ivon_jax.ivon(0.1, ess=10.0, weight_decay=0.0)
    state = _set_hess(opt.init(PARAMS), _uniform(rng, 0.0, 1.0))
    (hs,) = _hess_leaves(state)
    flat = np.concatenate([x.ravel() for x in hs]).astype(np.float64)  # 27 elements
    summary = ivon_jax.state_summary(state, max_elements=7)  # stride ceil(27 / 7) = 4
    sub = flat[::4]
    for s, q in zip(SUFFIXES, np.quantile(sub, LEVELS), strict=True):
        np.testing.assert_allclose(summary[f"h_{s}"], q, rtol=1e-6, err_msg=s)
    np.testing.assert_allclose(summary["h_mean"], flat.mean(), rtol=1e-6)  # all elements
    full = ivon_jax.state_summary(state, max_elements=27)
    np.testing.assert_allclose(full["h_p50"], np.median(flat), rtol=1e-6)


def test_nnx_optimizer_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    ess, wd = 25.0, 0.05
    optimizer = nnx.Optimizer(
        model, ivon_jax.ivon(0.1, ess=ess, weight_decay=wd, b2=0.5), wrt=nnx.Param
    )
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    rng = np.random.default_rng(4)
    hess = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0, 3, p.shape), jnp.float32), grads)
    optimizer.update(model, grads, hess=hess)
    (hs,) = _hess_leaves(optimizer.opt_state)
    want = _truth([(hs, ess, wd)])
    summary = ivon_jax.state_summary(optimizer.opt_state)
    _check(summary, want, rtol=1e-5)
    assert int(summary["step"]) == 1
    _check(ivon_jax.state_summary(optimizer.opt_state, nnx.state(model, nnx.Param)), want, 1e-5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no IVON state"):
        ivon_jax.state_summary(optax.adam(0.1).init(PARAMS))
    state = ivon_jax.ivon(0.1, ess=10.0).init(PARAMS)
    with pytest.raises(ValueError, match="max_elements"):
        ivon_jax.state_summary(state, max_elements=0)
    with pytest.raises(ValueError, match="shape"):
        ivon_jax.state_summary(state, {"a": jnp.zeros(3), "b": jnp.zeros(7)})
    all_masked = optax.masked(ivon_jax.ivon(0.1, ess=10.0), {"a": False, "b": False})
    with pytest.raises(ValueError, match="no parameter element"):
        ivon_jax.state_summary(all_masked.init(PARAMS))
