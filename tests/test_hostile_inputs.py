"""Hostile and odd inputs: each gets a defined outcome (works, or a clear error).

Outcomes (docs/guide/nonfinite.md lists them):
- empty trees ({}, [], ()), None leaves, zero-size arrays, 0-d (scalar) leaves: work; empty
  and None leaves come back as they went in, and still count as a step;
- integer/bool/complex leaves: ``TypeError`` at ``init`` naming the leaf; excluded by
  ``optax.masked``/``multi_transform`` they are left exactly as they are (no noise, no step);
- ess ∈ [1e-8, 1e12], hess_init ∈ [1e-8, 1e8], δ ∈ {0, 1e-4}, float32 and bfloat16 params:
  σ = 1/sqrt(λ(h+δ)) ∈ [1e-10, 1e8], computed in float32, exact to rounding, never 0 or inf;
- huge gradients (1e30, float32): the mean step is finite (≈ -lr·1e30 without clipping,
  exactly lr·(h₀+δ)·ξ with ``clip_radius=ξ``); but Price's ĥ ≈ 1e31 makes the h-update's
  (h − ĥ)² overflow: the default guard keeps h as it was, element by element, and applies
  the finite step of m; the wrapper ``ivon_jax.skip_nonfinite`` detects it in the results and
  skips the step. With the squared-gradient estimator ĥ = λg² is itself infinite: the same.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

KEY = jax.random.key(0)


def _one_step(opt, params, grads_fn=None, key=KEY, jit=True):
    """sample → grads (default: gradient of Σ (θ-1)²/2 = θ-1) → Price ĥ → update → apply."""
    state = opt.init(params)
    sampled, noise = ivon_jax.sample_params(key, params, state)
    if grads_fn is None:
        grads = jax.tree.map(lambda s: s - jnp.ones_like(s), sampled)
    else:
        grads = grads_fn(sampled)
    hess = ivon_jax.estimate_hessian(grads, noise, state)
    update = jax.jit(opt.update) if jit else opt.update
    updates, new_state = update(grads, state, params, hess=hess)
    return optax.apply_updates(params, updates), new_state, (sampled, noise, hess)


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Empty trees, None leaves, zero-size arrays, scalars.


@pytest.mark.parametrize("empty", [{}, [], ()], ids=["dict", "list", "tuple"])
def test_empty_pytrees(empty):
    opt = ivon_jax.ivon(0.1, ess=10.0, skip_nonfinite=True)
    params, state, (sampled, noise, hess) = _one_step(opt, empty)
    assert params == empty and sampled == empty and noise == empty and hess == empty
    assert int(state.inner_state[0].count) == 1  # a step on nothing is still a step
    assert int(state.skipped) == 0
    assert ivon_jax.posterior_std(state) == empty
    vg = ivon_jax.value_and_grad(lambda p: jnp.float32(3.0), num_samples=2)
    value, grads, hess = vg(KEY, empty, state)
    assert float(value) == 3.0 and grads == empty and hess == empty


def test_none_leaves_are_empty_subtrees():
    opt = ivon_jax.ivon(0.1, ess=10.0, skip_nonfinite=True)
    params = {"a": jnp.zeros(2, jnp.float32), "b": None}
    new, state, (sampled, noise, hess) = _one_step(opt, params)
    assert new["b"] is None and sampled["b"] is None and noise["b"] is None
    assert hess["b"] is None and state.inner_state[0].hess["b"] is None
    assert ivon_jax.posterior_std(state)["b"] is None
    assert _finite(new) and _finite(state)


def test_params_none_is_missing_params():
    """``params=None`` is "no params": update raises the documented ValueError."""
    opt = ivon_jax.ivon(0.1, ess=10.0)
    state = opt.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update({"a": jnp.zeros(2)}, state, None, hess={"a": jnp.zeros(2)})


def test_zero_size_arrays():
    opt = ivon_jax.ivon(0.1, ess=10.0, skip_nonfinite=True)
    params = {
        "e1": jnp.zeros((0,), jnp.float32),
        "e2": jnp.zeros((3, 0), jnp.float32),
        "e3": jnp.zeros((0, 0, 2), jnp.bfloat16),
        "w": jnp.zeros((2,), jnp.float32),
    }
    new, state, (sampled, noise, hess) = _one_step(opt, params)
    for tree in (new, sampled, noise, hess, ivon_jax.posterior_std(state)):
        assert {k: jnp.shape(v) for k, v in tree.items()} == {
            k: p.shape for k, p in params.items()
        }
    assert new["e3"].dtype == jnp.bfloat16
    assert int(state.skipped) == 0 and _finite(new) and float(jnp.abs(new["w"]).min()) > 0
    # Empty leaves do not hide a NaN elsewhere from the skip check.
    bad = dict(jax.tree.map(jnp.zeros_like, params), w=jnp.array([jnp.nan, 0.0]))
    _, state2 = opt.update(bad, state, new, hess=jax.tree.map(jnp.zeros_like, bad))
    assert int(state2.skipped) == 1


def test_scalar_leaves_first_step_matches_hand_computation():
    """0-d leaves; one step against Algorithm 1 written out in float64."""
    lr, ess, h0, b1, b2, wd = 0.1, 10.0, 1.0, 0.9, 0.99999, 1e-4
    opt = ivon_jax.ivon(lr, ess=ess, hess_init=h0, b1=b1, b2=b2, weight_decay=wd)
    params = {"a": jnp.float32(0.5), "b": jnp.float32(-2.0)}
    state = opt.init(params)
    sigma = ivon_jax.posterior_std(state)
    assert sigma["a"].shape == ()
    np.testing.assert_allclose(float(sigma["a"]), 1 / np.sqrt(ess * (h0 + wd)), rtol=1e-6)
    g_hat = {"a": jnp.float32(0.3), "b": jnp.float32(-1.0)}
    h_hat = {"a": jnp.float32(2.0), "b": jnp.float32(-5.0)}
    updates, state = opt.update(g_hat, state, params, hess=h_hat)
    new = optax.apply_updates(params, updates)
    for k in params:
        m, g, h = float(params[k]), float(g_hat[k]), float(h_hat[k])
        h1 = b2 * h0 + (1 - b2) * h + 0.5 * (1 - b2) ** 2 * (h0 - h) ** 2 / (h0 + wd)
        g_bar = (1 - b1) * g / (1 - b1)
        m1 = m - lr * (h0 + wd) * (g_bar + wd * m) / (h1 + wd)
        assert new[k].shape == () and new[k].dtype == jnp.float32
        np.testing.assert_allclose(float(new[k]), m1, rtol=1e-6)
        h_state = ivon_jax.find_ivon_states(state)[0].hess[k]
        np.testing.assert_allclose(float(h_state), h1, rtol=1e-6)


def test_python_float_leaf_works_like_a_0d_array_or_is_rejected_clearly():
    opt = ivon_jax.ivon(0.1, ess=10.0)
    try:
        new, state, _ = _one_step(opt, {"a": 0.5})
    except (TypeError, ValueError) as e:  # a clear rejection naming the leaf is also fine
        assert "params['a']" in str(e)
        return
    ref, ref_state, _ = _one_step(opt, {"a": jnp.float32(0.5)})
    assert float(new["a"]) == float(ref["a"])
    h_a, ref_h_a = (ivon_jax.find_ivon_states(s)[0].hess["a"] for s in (state, ref_state))
    assert float(h_a) == float(ref_h_a)


def test_numpy_float64_leaf_without_x64_warns_nothing():
    opt = ivon_jax.ivon(0.1, ess=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = opt.init({"a": np.ones(3)})
    assert ivon_jax.find_ivon_states(state)[0].hess["a"].dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Integer leaves.


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_leaves_are_rejected_at_init_naming_the_leaf(dtype):
    params = {"layer": [jnp.zeros(3, jnp.float32), jnp.zeros(3, dtype)]}
    with pytest.raises(TypeError, match=r"params\['layer'\]\[1\]"):
        ivon_jax.ivon(0.1, ess=10.0).init(params)


def _masked_int_opts():
    mask = {"w": True, "n": False}
    return {
        "masked": optax.masked(
            ivon_jax.ivon(0.1, ess=10.0), mask, mask_compatible_extra_args=True
        ),
        "multi_transform": optax.multi_transform(
            {"ivon": ivon_jax.ivon(0.1, ess=10.0), "frozen": optax.set_to_zero()},
            {"w": "ivon", "n": "frozen"},
            mask_compatible_extra_args=True,
        ),
    }


@pytest.mark.parametrize("kind", ["masked", "multi_transform"])
def test_integer_leaves_excluded_by_a_mask_are_untouched(kind):
    opt = ivon_jax.skip_nonfinite(_masked_int_opts()[kind])
    params = {"w": jnp.array([0.5, -0.5], jnp.float32), "n": jnp.array([3, 1, 4], jnp.int32)}
    state = opt.init(params)
    sampled, noise = ivon_jax.sample_params(KEY, params, state)
    assert sampled["n"].dtype == jnp.int32 and noise["n"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sampled["n"]), [3, 1, 4])
    np.testing.assert_array_equal(np.asarray(noise["n"]), 0)
    assert float(jnp.min(jnp.abs(noise["w"]))) > 0  # the float leaf is perturbed
    grads = {"w": sampled["w"] - 1.0, "n": jnp.zeros(3, jnp.int32)}
    hess = ivon_jax.estimate_hessian(grads, noise, state)
    np.testing.assert_array_equal(np.asarray(hess["n"]), 0)
    updates, state = opt.update(grads, state, params, hess=hess)
    new = optax.apply_updates(params, updates)
    assert new["n"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(new["n"]), [3, 1, 4])
    assert int(state.skipped) == 0 and float(jnp.min(jnp.abs(new["w"] - params["w"]))) > 0


# --------------------------------------------------------------------------------------------
# Extreme hyper-parameters.

ESS_GRID = [1e-8, 1e-4, 1.0, 1e4, 1e8, 1e12]
HESS_INIT_GRID = [1e-8, 1e-4, 1.0, 1e4, 1e8]


@jax.jit
def _extreme_case(ess, h0, wd, params):
    """σ, a sample and one Price step; the hyper-parameters are traced, so the whole grid
    compiles once per dtype. (The parameters are an argument, not a constant inside the jit:
    XLA's constant folding would round m + σε differently from the compiled code.)"""
    opt = ivon_jax.ivon(0.1, ess=ess, hess_init=h0, weight_decay=wd)
    state = opt.init(params)
    sampled, noise = ivon_jax.sample_params(KEY, params, state)
    grads = jax.tree.map(lambda s: s - jnp.ones_like(s), sampled)
    hess = ivon_jax.estimate_hessian(grads, noise, state)
    updates, new_state = opt.update(grads, state, params, hess=hess)
    new = optax.apply_updates(params, updates)
    return (ivon_jax.posterior_std(state), sampled, noise, new, new_state,
            ivon_jax.posterior_std(new_state))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sigma_neither_overflows_nor_underflows_for_extreme_ess_and_hess_init(dtype):
    """σ = 1/sqrt(λ(h₀+δ)) spans 1e-10 … 1e8 over this grid: every value is a normal float32
    number, computed in float32 whatever the parameter dtype."""
    for ess in ESS_GRID:
        for h0 in HESS_INIT_GRID:
            for wd in (0.0, 1e-4):
                params = {"zero": jnp.zeros(64, dtype), "one": jnp.ones(64, dtype)}
                sigma, sampled, noise, new, new_state, new_sigma = _extreme_case(
                    jnp.float32(ess), jnp.float32(h0), jnp.float32(wd), params
                )
                assert sigma["zero"].dtype == jnp.float32
                expected = 1.0 / np.sqrt(ess * (h0 + wd))
                np.testing.assert_allclose(
                    np.asarray(sigma["zero"]), expected, rtol=2e-6, err_msg=f"{ess} {h0} {wd}"
                )
                assert sampled["zero"].dtype == dtype and _finite(sampled)
                # At m = 0 the perturbation σε is representable (bfloat16 has float32's
                # exponent range): it is not rounded to 0.
                assert float(jnp.min(jnp.abs(noise["zero"].astype(jnp.float32)))) > 0
                # The applied perturbation is exactly sampled - params (even where, at m = 1,
                # σ is below the dtype's resolution and it rounds to 0).
                np.testing.assert_array_equal(
                    np.asarray((sampled["one"] - params["one"]).astype(jnp.float32)),
                    np.asarray(noise["one"].astype(jnp.float32)),
                )
                # One step with Price's estimate keeps everything finite and σ > 0.
                assert _finite(new) and _finite(new_state)
                assert all(bool(jnp.all(x > 0)) for x in jax.tree.leaves(new_sigma))


@pytest.mark.parametrize("name", ["ess", "hess_init", "weight_decay", "learning_rate"])
def test_infinite_hyperparameters_are_rejected(name):
    kwargs = {"learning_rate": 0.1, "ess": 10.0, name: float("inf")}
    with pytest.raises(ValueError, match=name):
        ivon_jax.ivon(**kwargs)


# --------------------------------------------------------------------------------------------
# weight_decay = 0 with h near 0.


def test_tiny_h_with_zero_weight_decay_first_step_is_finite_and_exact():
    """h₀ = 1e-30, δ = 0: the division by h + δ = 1e-30 is fine, and the correction term
    ½(1−β₂)²(h−ĥ)²/h is huge but finite for an ordinary ĥ = 1 (b2 = 0.99: 5e25)."""
    h0, b2 = 1e-30, 0.99
    opt = ivon_jax.ivon(0.1, ess=10.0, hess_init=h0, b2=b2, weight_decay=0.0)
    params = {"w": jnp.zeros(3, jnp.float32)}
    state = opt.init(params)
    updates, state = opt.update(
        {"w": jnp.full(3, 0.5)}, state, params, hess={"w": jnp.ones(3, jnp.float32)}
    )
    h1 = b2 * h0 + (1 - b2) * 1.0 + 0.5 * (1 - b2) ** 2 * (h0 - 1.0) ** 2 / h0
    h_w = ivon_jax.find_ivon_states(state)[0].hess["w"]
    np.testing.assert_allclose(np.asarray(h_w), h1, rtol=1e-5)
    assert _finite(updates) and _finite(ivon_jax.posterior_std(state))


def _run_h_to_zero(b2, steps, adversarial, wd=0.0):
    """Starting at h₀ = 1. ``adversarial``: ĥ = h − (h+δ)/(1−β₂), the estimate that halves
    h + δ each step (the most the correction term allows, see test_properties.py); else a
    parameter that never gets a gradient (ĝ = ĥ = 0; with δ = 0, h shrinks by the factor
    β₂ + ½(1−β₂)² per step)."""
    opt = ivon_jax.ivon(0.1, ess=10.0, hess_init=1.0, b2=b2, weight_decay=wd)
    params = {"w": jnp.full(2, 0.5, jnp.float32)}
    state0 = opt.init(params)

    def body(carry, _):
        params, state = carry
        h = ivon_jax.find_ivon_states(state)[0].hess["w"]
        h_hat = h - (h + wd) / (1 - b2) if adversarial else jnp.zeros_like(h)
        updates, state = opt.update({"w": jnp.zeros(2, jnp.float32)}, state, params,
                                    hess={"w": h_hat})
        h_w0 = ivon_jax.find_ivon_states(state)[0].hess["w"][0]
        return (optax.apply_updates(params, updates), state), h_w0

    (params, state), hs = jax.lax.scan(body, (params, state0), None, length=steps)
    return params, state, np.asarray(hs)


@pytest.mark.parametrize(
    ("b2", "steps", "adversarial", "wd"),
    [(0.9, 1200, False, 0.0), (0.99, 200, True, 0.0), (0.99, 100, True, 1e-4)],
    ids=["dead-parameter", "adversarial", "adversarial-wd"],
)
def test_h_plus_delta_never_reaches_zero(b2, steps, adversarial, wd):
    params, state, hs = _run_h_to_zero(b2, steps, adversarial, wd)
    # It does get tiny (the scenario is real): h + δ ends far below its start, 1 + δ.
    assert np.nanmin(np.abs(hs + wd)) < 1e-10
    assert np.all(np.isfinite(hs)) and np.all(hs + wd > 0)
    sigma = ivon_jax.posterior_std(state)["w"]
    assert bool(jnp.all(jnp.isfinite(sigma))) and bool(jnp.all(sigma > 0))
    if wd == 0.0:  # ḡ = 0 and δm = 0: m must not move (with δ > 0, δm/(h+δ) is huge)
        np.testing.assert_array_equal(np.asarray(params["w"]), 0.5)


def test_zero_weight_decay_h_decays_as_predicted_before_underflow():
    """The dead-parameter decay factor β₂ + ½(1−β₂)² (independent of the fix above)."""
    b2 = 0.9
    _, _, hs = _run_h_to_zero(b2, 100, adversarial=False)
    factor = b2 + 0.5 * (1 - b2) ** 2
    np.testing.assert_allclose(hs, factor ** np.arange(1, 101), rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Huge gradients.


@pytest.mark.parametrize("clip_radius", [None, 1e-3])
def test_huge_gradient_mean_step(clip_radius):
    """ĝ = 1e30 with ĥ = h₀ (h unchanged): ḡ = 1e30, so without clipping m moves by
    -lr(h₀+δ)ḡ/(h₀+δ) = -1e29 (finite); with clip_radius ξ by exactly -lr(h₀+δ)ξ."""
    lr, h0, wd = 0.1, 1.0, 1e-4
    opt = ivon_jax.ivon(lr, ess=100.0, hess_init=h0, weight_decay=wd, clip_radius=clip_radius)
    params = {"w": jnp.ones(4, jnp.float32)}
    state = opt.init(params)
    updates, state = opt.update(
        {"w": jnp.full(4, 1e30, jnp.float32)}, state, params, hess={"w": jnp.full(4, h0)}
    )
    new = optax.apply_updates(params, updates)
    assert _finite(new) and _finite(state)
    expected = 1.0 - lr * 1e30 if clip_radius is None else 1.0 - lr * (h0 + wd) * clip_radius
    np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-5)


def _huge_then_good(opt, method="price"):
    """Step 1: gradient 1e30 everywhere; step 2: an ordinary gradient. Returns the states."""
    params = {"w": jnp.ones(4, jnp.float32)}
    state = opt.init(params)
    out = []
    for i, scale in enumerate((1e30, 1.0)):
        _, noise = ivon_jax.sample_params(jax.random.fold_in(KEY, i), params, state)
        grads = {"w": jnp.full(4, scale, jnp.float32)}
        hess = ivon_jax.estimate_hessian(grads, noise, state, method=method)
        updates, state = opt.update(grads, state, params, hess=hess)
        params = optax.apply_updates(params, updates)
        out.append((params, state, hess))
    return out


def test_huge_gradient_without_skip_overflows_h():
    """Price's ĥ = g·noise·λ(h+δ) ≈ 1e30·0.1ε·100 = 1e31·ε is finite, but (h−ĥ)² ≈ 1e62 >
    3.4e38 overflows: h = inf, σ = 0; the next ĥ is noise·g·inf = 0·inf = NaN."""
    (_, s1, hess1), (_, s2, _) = _huge_then_good(
        ivon_jax.ivon(0.1, ess=100.0, skip_nonfinite=False)
    )
    assert _finite(hess1)
    assert bool(jnp.all(jnp.isinf(ivon_jax.find_ivon_states(s1)[0].hess["w"])))
    np.testing.assert_array_equal(np.asarray(ivon_jax.posterior_std(s1)["w"]), 0.0)
    assert bool(jnp.all(jnp.isnan(ivon_jax.find_ivon_states(s2)[0].hess["w"])))


def test_huge_gradient_with_gradsq_estimate():
    """ĥ = λg² = 100·1e60 = inf. The wrapper sees it and skips the step (h stays h₀, m stays
    1); the default guard keeps h at h₀ element by element and applies the (finite) step."""
    wrapped = ivon_jax.skip_nonfinite(ivon_jax.ivon(0.1, ess=100.0, skip_nonfinite=False))
    (p1, s1, hess1), (p2, s2, _) = _huge_then_good(wrapped, method="gradsq")
    assert bool(jnp.all(jnp.isinf(hess1["w"])))
    assert int(s1.skipped) == 1 and int(s2.skipped) == 1
    np.testing.assert_array_equal(np.asarray(s1.inner_state[0].hess["w"]), 1.0)
    np.testing.assert_array_equal(np.asarray(p1["w"]), 1.0)
    assert int(s2.inner_state[0].count) == 1 and _finite(s2) and _finite(p2)

    (p1, s1, _), (p2, s2, _) = _huge_then_good(ivon_jax.ivon(0.1, ess=100.0), method="gradsq")
    assert int(s1.skipped) == 0 and int(ivon_jax.find_ivon_states(s1)[0].count) == 1
    np.testing.assert_array_equal(np.asarray(ivon_jax.find_ivon_states(s1)[0].hess["w"]), 1.0)
    # m moves by -lr (h₀ + δ) (ḡ + δ m) / (h₀ + δ) = -0.1 (1e30 + 1e-4) ≈ -1e29: finite.
    np.testing.assert_allclose(np.asarray(p1["w"]), 1.0 - 0.1 * (1e30 + 1e-4), rtol=1e-6)
    assert _finite(s2) and _finite(p2) and int(ivon_jax.find_ivon_states(s2)[0].count) == 2


@pytest.mark.parametrize("clip", ["none", "clip_radius", "clip_by_global_norm"])
def test_huge_gradient_with_the_wrapper_is_skipped(clip):
    inner = ivon_jax.ivon(
        0.1, ess=100.0, clip_radius=1e-3 if clip == "clip_radius" else None,
        skip_nonfinite=False,
    )
    if clip == "clip_by_global_norm":
        inner = optax.chain(optax.clip_by_global_norm(1.0), inner)
    (p1, s1, _), (_, s2, _) = _huge_then_good(ivon_jax.skip_nonfinite(inner))
    st1 = ivon_jax.find_ivon_states(s1)[0]
    # The overflowing step is skipped: h stays h₀, m stays 1.
    assert int(s1.skipped) == 1
    np.testing.assert_array_equal(np.asarray(st1.hess["w"]), 1.0)
    np.testing.assert_array_equal(np.asarray(p1["w"]), 1.0)
    # The next, ordinary, step is applied.
    assert int(s2.skipped) == 1 and int(ivon_jax.find_ivon_states(s2)[0].count) == 1
    sigma = ivon_jax.posterior_std(s2)["w"]
    assert bool(jnp.all(jnp.isfinite(sigma))) and bool(jnp.all(sigma > 0))


@pytest.mark.parametrize("clip_radius", [None, 1e-3])
def test_huge_gradient_under_the_default_guard_keeps_h_finite(clip_radius):
    """Price's ĥ ≈ 1e31 is finite, the h-update overflows: the default guard keeps h at h₀
    element by element (nothing is skipped), the step of m is finite, and the next ordinary
    step is applied with finite, positive σ."""
    opt = ivon_jax.ivon(0.1, ess=100.0, clip_radius=clip_radius)
    (p1, s1, _), (p2, s2, _) = _huge_then_good(opt)
    st1 = ivon_jax.find_ivon_states(s1)[0]
    assert int(s1.skipped) == 0 and int(st1.count) == 1
    np.testing.assert_array_equal(np.asarray(st1.hess["w"]), 1.0)
    if clip_radius is not None:  # the step is exactly lr (h₀ + δ) ξ
        np.testing.assert_allclose(np.asarray(p1["w"]), 1.0 - 0.1 * (1.0 + 1e-4) * 1e-3,
                                   rtol=1e-6)
    assert _finite(p1) and _finite(s2) and _finite(p2)
    assert int(s2.skipped) == 0 and int(ivon_jax.find_ivon_states(s2)[0].count) == 2
    sigma = ivon_jax.posterior_std(s2)["w"]
    assert bool(jnp.all(jnp.isfinite(sigma))) and bool(jnp.all(sigma > 0))
