"""Posterior sampling: `sample_params` and `posterior_std`.

The noise must be N(0, σ²) with σ = 1 / sqrt(ess (h + δ)) read from the IVON state wherever it
sits in the optimizer state, exactly zero for leaves IVON does not manage, reproducible from
the key, independent across leaves, and in each parameter's dtype.

Statistical checks use one fixed key and state their tolerance in standard errors: for n
i.i.d. draws z ~ N(0, 1), |mean(z)| < 5/√n and |std(z) − 1| < 5·√(1/(2n)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ivon_jax

N = 40_000  # elements per statistical leaf: SE(mean) = 0.005, SE(std) ≈ 0.0035


def _sigma(ess, h, wd):
    """Hand formula for the posterior std, in float64."""
    return 1.0 / np.sqrt(ess * (np.asarray(h, np.float64) + wd))


def _assert_standard_normal(z):
    """z (any shape) looks like i.i.d. N(0, 1) draws, to 5 standard errors."""
    z = np.asarray(z, np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5.0 / np.sqrt(n), z.mean()
    assert abs(z.std() / 1.0 - 1.0) < 5.0 * np.sqrt(1.0 / (2 * n)), z.std()


def _params():
    return {
        "a": jnp.linspace(-1.0, 1.0, N, dtype=jnp.float32),
        "b": jnp.full((200, 200), 0.5, jnp.float32),
    }


# --------------------------------------------------------------------------------- moments


def test_noise_mean_zero_std_sigma_at_init():
    ess, h0, wd = 250.0, 0.4, 0.1
    params = _params()
    state = ivon_jax.ivon(0.1, ess=ess, hess_init=h0, weight_decay=wd).init(params)
    want = _sigma(ess, h0, wd)  # 1 / sqrt(250 · 0.5) ≈ 0.0894
    sigma = ivon_jax.posterior_std(state)
    for leaf in ("a", "b"):
        np.testing.assert_allclose(np.asarray(sigma[leaf]), want, rtol=1e-6)
        assert sigma[leaf].shape == params[leaf].shape
    _sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    for leaf in ("a", "b"):
        _assert_standard_normal(noise[leaf] / want)


def test_sigma_after_updates_with_known_hess():
    ess, h0, wd, b2 = 200.0, 1.0, 0.1, 0.5
    params = {"a": jnp.zeros(N, jnp.float32), "b": jnp.zeros((3, 4), jnp.float32)}
    opt = ivon_jax.ivon(0.01, ess=ess, hess_init=h0, b2=b2, weight_decay=wd)
    state = opt.init(params)
    h_hat = {"a": 3.0, "b": -0.5}  # constant estimates; "b" is negative
    grads = jax.tree.map(jnp.zeros_like, params)
    hess = {k: jnp.full(params[k].shape, v, jnp.float32) for k, v in h_hat.items()}
    want_h = {}
    for k, c in h_hat.items():  # Algorithm 1's h-update, by hand in float64
        h = h0
        for _ in range(3):
            h = b2 * h + (1 - b2) * c + 0.5 * (1 - b2) ** 2 * (h - c) ** 2 / (h + wd)
        want_h[k] = h
    for _ in range(3):
        _, state = opt.update(grads, state, params, hess=hess)
    # Hand numbers: a: 1 → 2.4545 → 2.7418 → 2.8739 ; b: 1 → 0.5057 → 0.2116 → 0.0589.
    assert want_h["a"] == pytest.approx(2.8739, abs=1e-3)
    assert want_h["b"] == pytest.approx(0.0589, abs=1e-3)
    sigma = ivon_jax.posterior_std(state)
    for k in h_hat:
        np.testing.assert_allclose(np.asarray(sigma[k]), _sigma(ess, want_h[k], wd), rtol=1e-5)
    _, noise = ivon_jax.sample_params(jax.random.key(1), params, state)
    _assert_standard_normal(noise["a"] / _sigma(ess, want_h["a"], wd))
    # The two leaves now have different σ: b's is larger (smaller h).
    assert float(sigma["b"][0, 0]) > 1.5 * float(sigma["a"][0])


# ---------------------------------------------------------------------- exactness & keys


def _sample_wide(x64):
    dt = jnp.float64 if x64 else jnp.float32
    params = {"w": jnp.linspace(-3.0, 3.0, 1000, dtype=dt), "b": jnp.ones((2, 5), dt)}
    state = ivon_jax.ivon(0.1, ess=10.0).init(params)
    sampled, noise = ivon_jax.sample_params(jax.random.key(3), params, state)
    return dt, params, sampled, noise


@pytest.mark.parametrize("x64", [False, True])
def test_noise_is_sampled_minus_params_to_rounding(x64):
    with jax.enable_x64(x64):
        dt, params, sampled, noise = _sample_wide(x64)
        for k in params:
            assert sampled[k].dtype == dt and noise[k].dtype == dt
            diff = np.asarray(sampled[k] - params[k])
            # fl(fl(m + n) − m) differs from n by the two roundings: at most one ulp of the
            # larger of |m|, |m + n|.
            big = np.maximum(np.abs(np.asarray(sampled[k])), np.abs(np.asarray(params[k])))
            assert np.all(np.abs(diff - np.asarray(noise[k])) <= np.spacing(big))
            assert np.all(np.asarray(noise[k]) != 0.0)


@pytest.mark.parametrize("x64", [False, True])
def test_noise_equals_sampled_minus_params_exactly(x64):
    with jax.enable_x64(x64):
        _, params, sampled, noise = _sample_wide(x64)
        for k in params:
            np.testing.assert_array_equal(np.asarray(sampled[k] - params[k]), np.asarray(noise[k]))


def test_bfloat16_noise_is_the_applied_perturbation():
    # x in [1, 2): a bf16 sample near x differs from x by an exactly representable amount.
    x = jnp.linspace(1.0, 1.99, 5000, dtype=jnp.float32)
    ess, wd = 1e4, 0.0
    sig = float(_sigma(ess, 1.0, wd))  # 0.01, about one bf16 ulp (2^-7 ≈ 0.0078) at 1
    p16 = {"w": x.astype(jnp.bfloat16)}
    state = ivon_jax.ivon(0.1, ess=ess, weight_decay=wd).init(p16)
    assert ivon_jax.find_ivon_states(state)[0].hess["w"].dtype == jnp.float32
    sampled, noise = ivon_jax.sample_params(jax.random.key(4), p16, state)
    s, n, p = (np.asarray(t["w"].astype(jnp.float32), np.float64) for t in (sampled, noise, p16))
    assert sampled["w"].dtype == jnp.bfloat16 and noise["w"].dtype == jnp.bfloat16
    # The returned noise is what was actually added: exact in float64, and in bfloat16.
    np.testing.assert_array_equal(n, s - p)
    np.testing.assert_array_equal(np.asarray(p16["w"] + noise["w"]), np.asarray(sampled["w"]))
    # The bf16 sample is the bf16 rounding of m + σε for the float32 draw with the same key.
    p32 = {"w": p16["w"].astype(jnp.float32)}
    s32, _ = ivon_jax.sample_params(
        jax.random.key(4), p32, ivon_jax.ivon(0.1, ess=ess, weight_decay=wd).init(p32)
    )
    exact = np.asarray(s32["w"], np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 7)
    assert np.all(np.abs(s - exact) <= 0.5 * ulp + 1e-12)
    # Rounding really happened (the noise is quantised), yet its scale is still σ.
    assert np.mean(n == np.asarray(s32["w"], np.float64) - p) < 0.5
    assert abs(n.std() / sig - 1.0) < 0.1


def test_same_key_same_sample_different_key_different():
    params = _params()
    state = ivon_jax.ivon(0.1, ess=100.0).init(params)
    s1, n1 = ivon_jax.sample_params(jax.random.key(7), params, state)
    s2, n2 = ivon_jax.sample_params(jax.random.key(7), params, state)
    _s3, n3 = ivon_jax.sample_params(jax.random.key(8), params, state)
    for k in params:
        np.testing.assert_array_equal(np.asarray(s1[k]), np.asarray(s2[k]))
        np.testing.assert_array_equal(np.asarray(n1[k]), np.asarray(n2[k]))
        # Independent draws: equal only with probability zero; uncorrelated to 5 SE.
        a, b = np.asarray(n1[k]).ravel(), np.asarray(n3[k]).ravel()
        assert np.mean(a == b) < 1e-3
        assert abs(np.corrcoef(a, b)[0, 1]) < 5.0 / np.sqrt(a.size)


def test_leaves_get_independent_noise():
    # Four leaves of the same shape (dict, list and tuple containers): no shared stream.
    shape = (N,)
    params = {
        "x": jnp.zeros(shape),
        "y": [jnp.zeros(shape), jnp.zeros(shape)],
        "z": (jnp.zeros(shape),),
    }
    state = ivon_jax.ivon(0.1, ess=100.0).init(params)
    _, noise = ivon_jax.sample_params(jax.random.key(11), params, state)
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(noise)]
    assert len(leaves) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            r = np.corrcoef(leaves[i], leaves[j])[0, 1]
            assert abs(r) < 5.0 / np.sqrt(N), (i, j, r)


def test_sampling_is_jittable_and_matches_eager():
    params = _params()
    state = ivon_jax.ivon(0.1, ess=100.0).init(params)
    key = jax.random.key(5)
    eager = ivon_jax.sample_params(key, params, state)
    jitted = jax.jit(ivon_jax.sample_params)(key, params, state)
    # Fused (jit) and unfused (eager) transcendental functions may differ by an ulp, and
    # noise = sampled - params then differs by up to two ulps of params (|params| ≤ 1).
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=1e-6, atol=2.4e-7)


# ------------------------------------------------------------------------------- dtypes


def test_dtypes_kept_per_leaf_mixed_tree():
    params = {"f32": jnp.ones(64, jnp.float32), "bf16": jnp.ones(64, jnp.bfloat16)}
    state = ivon_jax.ivon(0.1, ess=100.0).init(params)
    sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    for k in params:
        assert sampled[k].dtype == params[k].dtype, k
        assert noise[k].dtype == params[k].dtype, k
    sigma = ivon_jax.posterior_std(state)
    assert sigma["bf16"].dtype == jnp.float32  # statistics are float32 for bf16 params


def test_float64_under_x64():
    with jax.enable_x64(True):
        params = {"w": jnp.zeros(N, jnp.float64)}
        ess, wd = 1e6, 1e-4
        state = ivon_jax.ivon(0.1, ess=ess, weight_decay=wd).init(params)
        assert ivon_jax.find_ivon_states(state)[0].hess["w"].dtype == jnp.float64
        sigma = ivon_jax.posterior_std(state)["w"]
        assert sigma.dtype == jnp.float64
        # Full float64 precision of σ, beyond float32's ~1e-7.
        np.testing.assert_allclose(np.asarray(sigma), _sigma(ess, 1.0, wd), rtol=1e-14)
        sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
        assert sampled["w"].dtype == jnp.float64
        _assert_standard_normal(noise["w"] / _sigma(ess, 1.0, wd))


# --------------------------------------------------------------------------------- masks


def _masked_setup():
    params = {"w": jnp.linspace(-1.0, 1.0, 500), "frozen": jnp.arange(6.0).reshape(2, 3)}
    mask = {"w": True, "frozen": False}
    return params, mask


def test_masked_leaves_get_no_noise_and_masked_node_std():
    params, mask = _masked_setup()
    ess, wd = 50.0, 1e-4
    tx = optax.masked(ivon_jax.ivon(0.1, ess=ess), mask, mask_compatible_extra_args=True)
    state = tx.init(params)
    sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    assert np.all(np.asarray(noise["frozen"]) == 0.0)
    np.testing.assert_array_equal(np.asarray(sampled["frozen"]), np.asarray(params["frozen"]))
    assert np.all(np.asarray(noise["w"]) != 0.0)
    sigma = ivon_jax.posterior_std(state)
    assert isinstance(sigma["frozen"], optax.MaskedNode)
    np.testing.assert_allclose(np.asarray(sigma["w"]), _sigma(ess, 1.0, wd), rtol=1e-6)
    sigma_p = ivon_jax.posterior_std(state, params)
    np.testing.assert_array_equal(np.asarray(sigma_p["frozen"]), np.zeros((2, 3)))
    np.testing.assert_allclose(np.asarray(sigma_p["w"]), _sigma(ess, 1.0, wd), rtol=1e-6)
    # ĥ is zero for the masked leaf, and the masked update goes through.
    grads = jax.tree.map(jnp.ones_like, params)
    hess = ivon_jax.estimate_hessian(grads, noise, state)
    assert np.all(np.asarray(hess["frozen"]) == 0.0)
    _, state2 = tx.update(grads, state, params, hess=hess)
    assert isinstance(ivon_jax.find_ivon_states(state2)[0].hess["frozen"], optax.MaskedNode)


def test_masked_frozen_group_keeps_exact_value_over_training():
    params, mask = _masked_setup()
    params["frozen"] = params["frozen"] + 0.123456789  # not a round number
    labels = {k: ("ivon" if v else "frozen") for k, v in mask.items()}
    tx = optax.multi_transform(
        {"ivon": ivon_jax.ivon(0.05, ess=100.0), "frozen": optax.set_to_zero()},
        labels,
        mask_compatible_extra_args=True,
    )
    state = tx.init(params)
    loss = lambda p: jnp.mean((p["w"] - 2.0) ** 2) + jnp.mean(p["frozen"] ** 2)
    vg = ivon_jax.value_and_grad(loss)
    p = params
    for i in range(4):
        _, grads, hess = vg(jax.random.key(i), p, state)
        assert np.all(np.asarray(grads["frozen"]) != 0.0)  # it does get a gradient...
        assert np.all(np.asarray(hess["frozen"]) == 0.0)
        updates, state = tx.update(grads, state, p, hess=hess)
        p = optax.apply_updates(p, updates)
        _, noise = ivon_jax.sample_params(jax.random.key(100 + i), p, state)
        assert np.all(np.asarray(noise["frozen"]) == 0.0)
    # ... but never moves, bit for bit, while the managed leaf does move.
    np.testing.assert_array_equal(np.asarray(p["frozen"]), np.asarray(params["frozen"]))
    assert float(jnp.max(jnp.abs(p["w"] - params["w"]))) > 1e-3
    np.testing.assert_array_equal(
        np.asarray(ivon_jax.posterior_std(state, p)["frozen"]), np.zeros((2, 3))
    )


def test_frozen_integer_leaf_is_left_alone():
    params = {"w": jnp.zeros(4), "step": jnp.array([3, 4], jnp.int32)}
    tx = optax.multi_transform(
        {"ivon": ivon_jax.ivon(0.1, ess=10.0), "frozen": optax.set_to_zero()},
        {"w": "ivon", "step": "frozen"},
        mask_compatible_extra_args=True,
    )
    state = tx.init(params)  # no TypeError: IVON never sees the integer leaf
    sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    assert sampled["step"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(sampled["step"]), [3, 4])
    np.testing.assert_array_equal(np.asarray(noise["step"]), [0, 0])


def test_two_ivon_groups_use_their_own_ess():
    params = {"a": jnp.zeros(N), "b": jnp.zeros(N)}
    ess_a, ess_b, wd = 100.0, 10_000.0, 1e-4
    tx = optax.multi_transform(
        {"A": ivon_jax.ivon(0.1, ess=ess_a), "B": ivon_jax.ivon(0.1, ess=ess_b)},
        {"a": "A", "b": "B"},
        mask_compatible_extra_args=True,
    )
    state = tx.init(params)
    assert len(ivon_jax.find_ivon_states(state)) == 2
    sigma = ivon_jax.posterior_std(state, params)
    np.testing.assert_allclose(np.asarray(sigma["a"]), _sigma(ess_a, 1.0, wd), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sigma["b"]), _sigma(ess_b, 1.0, wd), rtol=1e-6)
    _, noise = ivon_jax.sample_params(jax.random.key(2), params, state)
    _assert_standard_normal(noise["a"] / _sigma(ess_a, 1.0, wd))
    _assert_standard_normal(noise["b"] / _sigma(ess_b, 1.0, wd))
    # ĥ uses each group's own λ: with noise ε σ_k and gradient 1, ĥ = ε/σ_k = noise λ_k (h+δ).
    grads = jax.tree.map(jnp.ones_like, params)
    hess = ivon_jax.estimate_hessian(grads, noise, state)
    for k, ess in (("a", ess_a), ("b", ess_b)):
        want = np.asarray(noise[k], np.float64) * ess * (1.0 + wd)
        np.testing.assert_allclose(np.asarray(hess[k]), want, rtol=1e-5, atol=1e-6)
    # One step: both groups' states advance.
    _, state = tx.update(grads, state, params, hess=hess)
    assert [int(s.count) for s in ivon_jax.find_ivon_states(state)] == [1, 1]


# ---------------------------------------------------------------- state found anywhere


def test_ivon_not_first_in_chain():
    params = {"w": jnp.zeros(N)}
    ess, wd, b2 = 400.0, 0.0, 0.9
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), ivon_jax.ivon(0.1, ess=ess, b2=b2, weight_decay=wd)
    )
    state = tx.init(params)
    np.testing.assert_allclose(
        np.asarray(ivon_jax.posterior_std(state)["w"]), _sigma(ess, 1.0, wd), rtol=1e-6
    )
    _, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    _assert_standard_normal(noise["w"] / _sigma(ess, 1.0, wd))
    # After one update with ĥ = 5: h = 0.9 + 0.5 + 0.5·0.01·16/1 = 1.48.
    _, state = tx.update(
        jax.tree.map(jnp.zeros_like, params), state, params, hess={"w": jnp.full(N, 5.0)}
    )
    np.testing.assert_allclose(
        np.asarray(ivon_jax.posterior_std(state)["w"]), _sigma(ess, 1.48, wd), rtol=1e-5
    )


def test_inside_inject_hyperparams():
    params = {"w": jnp.zeros(N)}
    ess, wd = 50.0, 1e-4
    tx = optax.inject_hyperparams(ivon_jax.ivon)(learning_rate=0.1, ess=ess)
    state = tx.init(params)
    np.testing.assert_allclose(
        np.asarray(ivon_jax.posterior_std(state)["w"]), _sigma(ess, 1.0, wd), rtol=1e-6
    )
    _sampled, noise = jax.jit(ivon_jax.sample_params)(jax.random.key(0), params, state)
    _assert_standard_normal(noise["w"] / _sigma(ess, 1.0, wd))
    # Changing the injected ess changes σ once the state has been updated with it.
    state.hyperparams["ess"] = jnp.asarray(200.0, jnp.float32)
    _, state = tx.update({"w": jnp.zeros(N)}, state, params, hess={"w": jnp.ones(N)})
    np.testing.assert_allclose(
        np.asarray(ivon_jax.posterior_std(state)["w"]), _sigma(200.0, 1.0, wd), rtol=1e-6
    )


# ------------------------------------------------------------------------------- NNX


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_flax_nnx_optimizer_state():
    model = _MLP(nnx.Rngs(0))
    ess, wd = 30.0, 1e-4
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=ess), wrt=nnx.Param)
    params = nnx.state(model, nnx.Param)
    key = jax.random.key(9)
    sampled, noise = ivon_jax.sample_params(key, params, optimizer.opt_state)
    assert type(sampled) is type(params)
    assert jax.tree.structure(sampled) == jax.tree.structure(params)
    sigma = ivon_jax.posterior_std(optimizer.opt_state, params)
    p_leaves, s_leaves, n_leaves, sig_leaves = (
        jax.tree.leaves(t) for t in (params, sampled, noise, sigma)
    )
    assert len(p_leaves) == 4
    for p, s, n, sg in zip(p_leaves, s_leaves, n_leaves, sig_leaves, strict=True):
        big = np.maximum(np.abs(np.asarray(s)), np.abs(np.asarray(p)))
        assert np.all(np.abs(np.asarray(s - p) - np.asarray(n)) <= np.spacing(big))
        np.testing.assert_allclose(np.asarray(sg), _sigma(ess, 1.0, wd), rtol=1e-6)
        assert sg.shape == p.shape
    # Same noise as for the same arrays in a plain dict with the same leaf order.
    plain = jax.tree.map(lambda v: v, nnx.to_pure_dict(params))
    plain_state = ivon_jax.ivon(0.1, ess=ess).init(plain)
    _, plain_noise = ivon_jax.sample_params(key, plain, plain_state)
    for a, b in zip(n_leaves, jax.tree.leaves(plain_noise), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The samples can be loaded into a model copy and evaluated.
    sampled_model = nnx.clone(model)
    nnx.update(sampled_model, sampled)
    np.testing.assert_array_equal(
        np.asarray(sampled_model.l1.kernel[...]), np.asarray(sampled["l1"]["kernel"][...])
    )


class _BNNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)
        self.bn = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.lin(x))


def test_flax_nnx_full_state_non_params_untouched():
    # Sampling the *whole* model state: batch statistics are not managed, so they get
    # exactly zero noise and keep their values, while every Param is perturbed.
    model = _BNNet(nnx.Rngs(0))
    model(jnp.arange(12.0).reshape(4, 3))  # move the batch statistics off their init values
    ess = 20.0
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=ess), wrt=nnx.Param)
    full = nnx.state(model)
    sampled, noise = ivon_jax.sample_params(jax.random.key(0), full, optimizer.opt_state)
    pure_full, pure_s, pure_n = (nnx.to_pure_dict(t) for t in (full, sampled, noise))
    for stat in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(pure_n["bn"][stat]), 0.0)
        np.testing.assert_array_equal(
            np.asarray(pure_s["bn"][stat]), np.asarray(pure_full["bn"][stat])
        )
        init_value = 1.0 if stat == "var" else 0.0
        assert np.any(np.asarray(pure_full["bn"][stat]) != init_value)
    for path in (("lin", "kernel"), ("lin", "bias"), ("bn", "scale"), ("bn", "bias")):
        n = np.asarray(pure_n[path[0]][path[1]])
        assert np.all(n != 0.0), path
        assert np.all(np.abs(n) < 6 * _sigma(ess, 1.0, 1e-4)), path


def test_frozendict_params():
    from flax.core import FrozenDict

    params = FrozenDict({"a": jnp.ones(N), "b": {"c": jnp.zeros(3)}})
    ess = 100.0
    state = ivon_jax.ivon(0.1, ess=ess).init(params)
    sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    assert isinstance(sampled, FrozenDict) and isinstance(noise, FrozenDict)
    _assert_standard_normal(noise["a"] / _sigma(ess, 1.0, 1e-4))
    # A plain dict with the same paths is aligned with the FrozenDict state.
    s2, n2 = ivon_jax.sample_params(jax.random.key(0), params.unfreeze(), state)
    assert type(s2) is dict
    np.testing.assert_array_equal(np.asarray(n2["b"]["c"]), np.asarray(noise["b"]["c"]))
