"""The optax battery: IVON as a well-behaved optax transform.

Algorithm 1 by hand (numpy, float64), jit without recompilation, dtypes, a state whose
structure never changes (lax.scan / lax.cond), chains, inject_hyperparams, schedules, NNX, extra
keyword arguments and the state's size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ivon_jax


def _loss(p, x, y):
    pred = jnp.tanh(x @ p["w"]) @ p["v"] + p["c"]
    return jnp.mean((pred - y) ** 2)


def _problem(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
    params = {
        "w": (0.5 * jax.random.normal(k1, (3, 4))).astype(dtype),
        "v": (0.5 * jax.random.normal(k2, (4,))).astype(dtype),
        "c": jnp.zeros((), dtype),
    }
    x = jax.random.normal(k3, (16, 3)).astype(dtype)
    y = jnp.sin(x[:, 0])
    return params, x, y


def _make_step(opt):
    vg = ivon_jax.value_and_grad(_loss)

    def step(params, state, key, x, y):
        loss, grads, hess = vg(key, params, state, x, y)
        updates, state = opt.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, loss

    return step


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(x.shape, x.dtype, getattr(x, "weak_type", False)) for x in leaves]


def _allclose_trees(a, b, rtol=1e-6, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


# ------------------------------------------------------------------ Algorithm 1 by hand


def _algorithm1_numpy(m, steps, lr, h0, b1, b2, wd, clip, rescale_lr, debias):
    """Algorithm 1 of ALGORITHM.md in float64, given (ĝ, ĥ) for each step."""
    m = np.asarray(m, np.float64)
    g, h = np.zeros_like(m), np.full_like(m, h0)
    alpha = lr * (h0 + wd) if rescale_lr else lr
    unclipped = []
    for t, (g_hat, h_hat) in enumerate(steps, start=1):
        g = b1 * g + (1 - b1) * g_hat
        h = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (h + wd)
        g_bar = g / (1 - b1**t) if debias else g
        u = (g_bar + wd * m) / (h + wd)
        unclipped.append(u)
        if clip is not None:
            u = np.clip(u, -clip, clip)
        m = m - alpha * u
    return m, g, h, unclipped


@pytest.mark.parametrize("clip", [None, 0.1])
@pytest.mark.parametrize("rescale_lr", [True, False])
@pytest.mark.parametrize("debias", [True, False])
def test_two_steps_match_algorithm1_by_hand(clip, rescale_lr, debias):
    lr, h0, b1, b2, wd = 0.1, 0.5, 0.9, 0.99, 0.01
    m0 = np.array([0.5, -1.0, 2.0, 0.0, 3.0])
    steps = [
        (np.array([0.3, -2.0, 0.05, 1.0, -0.4]), np.array([2.0, -3.0, 0.5, 10.0, 0.0])),
        (np.array([-0.1, 0.7, 0.2, -3.0, 0.0]), np.array([-50.0, 1.0, 0.4, 2.0, 7.0])),
    ]
    want_m, want_g, want_h, unclipped = _algorithm1_numpy(
        m0, steps, lr, h0, b1, b2, wd, clip, rescale_lr, debias
    )
    if clip is not None:  # the example really exercises the clip, both ways
        assert np.any(np.concatenate(unclipped) > clip)
        assert np.any(np.concatenate(unclipped) < -clip)
    opt = ivon_jax.ivon(
        lr,
        ess=100.0,
        hess_init=h0,
        b1=b1,
        b2=b2,
        weight_decay=wd,
        clip_radius=clip,
        rescale_lr=rescale_lr,
        debias=debias,
    )
    params = {"m": jnp.asarray(m0, jnp.float32)}
    state = opt.init(params)
    for g_hat, h_hat in steps:
        updates, state = opt.update(
            {"m": jnp.asarray(g_hat, jnp.float32)},
            state,
            params,
            hess={"m": jnp.asarray(h_hat, jnp.float32)},
        )
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["m"]), want_m, rtol=1e-5, atol=1e-6)
    (ist,) = ivon_jax.find_ivon_states(state)
    np.testing.assert_allclose(np.asarray(ist.momentum["m"]), want_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(ist.hess["m"]), want_h, rtol=1e-5)
    assert int(ist.count) == 2


def test_first_step_closed_form_numbers():
    # One element, by hand: g = 0.1·2 = 0.2, ḡ = 2, h = 0.5·1 + 0.5·3 + 0.125·4/1.5 = 2.3333,
    # u = (2 + 0.5·4)/(2.3333 + 0.5) = 1.411765, α = 0.1·1.5, m = 4 − 0.15·1.411765.
    opt = ivon_jax.ivon(0.1, ess=1.0, hess_init=1.0, b1=0.9, b2=0.5, weight_decay=0.5)
    params = {"m": jnp.array([4.0])}
    updates, _ = opt.update(
        {"m": jnp.array([2.0])}, opt.init(params), params, hess={"m": jnp.array([3.0])}
    )
    np.testing.assert_allclose(np.asarray(updates["m"]), [-0.15 * 4.0 / 2.8333333], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["m"]), [-0.2117647], rtol=1e-6)


def test_h_stays_positive_under_adversarial_hess():
    wd = 0.0
    opt = ivon_jax.ivon(0.1, ess=10.0, hess_init=1.0, b2=0.9, weight_decay=wd)
    params = {"m": jnp.zeros(3)}
    state = opt.init(params)
    for _ in range(50):
        _, state = opt.update(
            {"m": jnp.zeros(3)}, state, params, hess={"m": jnp.array([-1e3, -10.0, -1e6])}
        )
        h = np.asarray(ivon_jax.find_ivon_states(state)[0].hess["m"])
        assert np.all(h + wd > 0.0), h
        assert np.all(np.isfinite(np.asarray(ivon_jax.posterior_std(state)["m"])))


# --------------------------------------------------------------------------- jit & dtypes


@pytest.mark.parametrize("variant", ["plain", "chain", "inject", "bf16"])
def test_jit_does_not_recompile(variant):
    params, x, y = _problem(jnp.bfloat16 if variant == "bf16" else jnp.float32)
    opt = {
        "plain": ivon_jax.ivon(0.05, ess=100.0),
        "bf16": ivon_jax.ivon(0.05, ess=100.0, b2=0.999),
        "chain": optax.chain(optax.clip_by_global_norm(1.0), ivon_jax.ivon(0.05, ess=100.0)),
        "inject": optax.inject_hyperparams(ivon_jax.ivon)(learning_rate=0.05, ess=100.0),
    }[variant]
    state = opt.init(params)
    jitted = jax.jit(_make_step(opt))
    p1, s1, _ = jitted(params, state, jax.random.key(0), x, y)
    p2, s2, _ = jitted(p1, s1, jax.random.key(1), x, y)
    assert jitted._cache_size() == 1
    assert _signature(s2) == _signature(state)
    assert _signature(p2) == _signature(params)
    assert not np.array_equal(np.asarray(p2["w"], np.float32), np.asarray(p1["w"], np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_param_dtype_kept_and_stats_dtype(dtype):
    params, x, y = _problem(dtype)
    opt = ivon_jax.ivon(0.05, ess=100.0)
    state = opt.init(params)
    new_params, new_state, _ = jax.jit(_make_step(opt))(params, state, jax.random.key(0), x, y)
    for k in params:
        assert new_params[k].dtype == dtype
    (ist,) = ivon_jax.find_ivon_states(new_state)
    for tree in (ist.momentum, ist.hess):
        for leaf in jax.tree.leaves(tree):
            assert leaf.dtype == jnp.float32
    assert _signature(new_state) == _signature(state)


def test_float64_under_x64():
    with jax.enable_x64(True):
        params, x, y = _problem(jnp.float64)
        y = y.astype(jnp.float64)
        opt = ivon_jax.ivon(0.05, ess=100.0)
        state = opt.init(params)
        new_params, new_state, loss = jax.jit(_make_step(opt))(
            params, state, jax.random.key(0), x, y
        )
        assert loss.dtype == jnp.float64
        for k in params:
            assert new_params[k].dtype == jnp.float64
        (ist,) = ivon_jax.find_ivon_states(new_state)
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((ist.momentum, ist.hess)))
        assert _signature(new_state) == _signature(state)


def test_bfloat16_hess_moves_with_b2_close_to_one():
    # With b2 = 0.99999 one step moves h by ~1e-5·(ĥ − h): invisible in bfloat16.
    params = {"w": jnp.ones(8, jnp.bfloat16)}
    opt = ivon_jax.ivon(0.01, ess=100.0, b2=0.99999)
    state = opt.init(params)
    _, state = opt.update(
        {"w": jnp.zeros(8, jnp.bfloat16)}, state, params, hess={"w": jnp.full(8, 3.0, jnp.float32)}
    )
    h = np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"], np.float64)
    np.testing.assert_allclose(h, 1.0 + 1e-5 * 2.0, rtol=1e-6)


# --------------------------------------------------------------------- lax.scan / lax.cond


def test_scan_matches_python_loop():
    params, x, y = _problem()
    opt = ivon_jax.ivon(0.05, ess=100.0, b2=0.999)
    state = opt.init(params)
    step = _make_step(opt)
    keys = jax.random.split(jax.random.key(3), 20)

    def body(carry, key):
        p, s = carry
        p, s, loss = step(p, s, key, x, y)
        return (p, s), loss

    (p_scan, s_scan), losses = jax.jit(lambda c: jax.lax.scan(body, c, keys))((params, state))
    jstep = jax.jit(step)
    p_loop, s_loop = params, state
    loop_losses = []
    for k in keys:
        p_loop, s_loop, loss = jstep(p_loop, s_loop, k, x, y)
        loop_losses.append(loss)
    _allclose_trees(p_scan, p_loop, rtol=1e-5, atol=1e-6)
    _allclose_trees(s_scan, s_loop, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(loop_losses), rtol=1e-5)
    assert int(ivon_jax.find_ivon_states(s_scan)[0].count) == 20
    assert float(losses[-1]) < float(losses[0])  # it trains


@pytest.mark.parametrize("do_update", [True, False])
def test_cond_between_update_and_no_update(do_update):
    params, x, y = _problem()
    opt = ivon_jax.ivon(0.05, ess=100.0)
    state = opt.init(params)
    _, grads, hess = ivon_jax.value_and_grad(_loss)(jax.random.key(0), params, state, x, y)

    @jax.jit
    def maybe(pred, grads, state, params, hess):
        return jax.lax.cond(
            pred,
            lambda: opt.update(grads, state, params, hess=hess),
            lambda: (jax.tree.map(jnp.zeros_like, grads), state),
        )

    updates, new_state = maybe(jnp.asarray(do_update), grads, state, params, hess)
    want_updates, want_state = opt.update(grads, state, params, hess=hess)
    if do_update:
        _allclose_trees(updates, want_updates, rtol=1e-6)
        _allclose_trees(new_state, want_state, rtol=1e-6)
    else:
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        _allclose_trees(new_state, state, rtol=0.0)


# ----------------------------------------------------------------- chain / inject / schedule


def test_chain_with_global_norm_clipping():
    params = {"a": jnp.array([0.5, -0.5]), "b": jnp.array([[1.0, 2.0]])}
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0, 12.0]])}  # ‖g‖ = 13
    hess = {"a": jnp.array([2.0, 0.5]), "b": jnp.array([[1.0, 3.0]])}
    inner = ivon_jax.ivon(0.1, ess=10.0, hess_init=1.0, b2=0.9, weight_decay=0.0)
    tx = optax.chain(optax.clip_by_global_norm(1.0), inner)
    u_chain, _ = tx.update(grads, tx.init(params), params, hess=hess)
    clipped = jax.tree.map(lambda g: g / 13.0, grads)
    u_manual, _ = inner.update(clipped, inner.init(params), params, hess=hess)
    _allclose_trees(u_chain, u_manual, rtol=1e-6)
    # First step with wd = 0 and debiasing: u = −α (h0 + δ) ĝ/(h1 + δ), h1 = 0.9 + 0.1 ĥ + …
    h1 = {k: 0.9 + 0.1 * np.asarray(v) + 0.005 * (1 - np.asarray(v)) ** 2 for k, v in hess.items()}
    for k in grads:
        want = -0.1 * np.asarray(grads[k]) / 13.0 / h1[k]
        np.testing.assert_allclose(np.asarray(u_chain[k]), want, rtol=1e-5)
    u_plain, _ = inner.update(grads, inner.init(params), params, hess=hess)
    assert np.abs(np.asarray(u_plain["b"]) - np.asarray(u_chain["b"])).max() > 0.5


def test_inject_hyperparams_learning_rate():
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([0.3, 0.1, -0.4])}
    hess = {"w": jnp.array([2.0, 1.0, 0.5])}
    tx = optax.inject_hyperparams(ivon_jax.ivon)(learning_rate=0.1, ess=10.0, b2=0.9)
    s0 = tx.init(params)
    update = jax.jit(lambda g, s, p, h: tx.update(g, s, p, hess=h))
    u1, s1 = update(grads, s0, params, hess)

    # lr = 0: no change of the parameters, but g and h still update.
    s0_zero = s0._replace(hyperparams={**s0.hyperparams, "learning_rate": jnp.asarray(0.0)})
    u0, s0_after = update(grads, s0_zero, params, hess)
    assert np.all(np.asarray(u0["w"]) == 0.0)
    for a, b in zip(
        jax.tree.leaves(ivon_jax.find_ivon_states(s0_after)[0]),
        jax.tree.leaves(ivon_jax.find_ivon_states(s1)[0]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(ivon_jax.find_ivon_states(s0_after)[0].momentum["w"]).any()

    # Doubling lr doubles the first step.
    s0_double = s0._replace(hyperparams={**s0.hyperparams, "learning_rate": jnp.asarray(0.2)})
    u2, _ = update(grads, s0_double, params, hess)
    np.testing.assert_allclose(np.asarray(u2["w"]), 2.0 * np.asarray(u1["w"]), rtol=1e-6)

    # Changing lr between steps: step 2 with lr 0.05 equals a plain ivon(0.05) step 2
    # taken from the same g, h, count.
    p1 = optax.apply_updates(params, u1)
    s1 = s1._replace(hyperparams={**s1.hyperparams, "learning_rate": jnp.asarray(0.05)})
    u_inj, _ = update(grads, s1, p1, hess)
    plain = ivon_jax.ivon(0.05, ess=10.0, b2=0.9, skip_nonfinite=False)
    plain_state = (ivon_jax.find_ivon_states(s1)[0], *plain.init(p1)[1:])
    u_plain, _ = plain.update(grads, plain_state, p1, hess=hess)
    np.testing.assert_allclose(np.asarray(u_inj["w"]), np.asarray(u_plain["w"]), rtol=1e-6)
    assert u_inj["w"][0] != u1["w"][0]


def test_inject_hyperparams_bfloat16_params():
    # optax injects hyper-parameters in the parameters' dtype by default: b2 = 0.99999 would
    # round to 1.0 in bfloat16 (rejected at init). With float32 hyper-parameters it works,
    # and h, in float32, moves by the b2 = 0.99999 increment.
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    msg = r"`b2` must be in \[0, 1\).*hyperparam_dtype.*got 1\.0"
    # (b2 given: its default None is held as a static argument, not injected.)
    with pytest.raises(ValueError, match=msg):
        optax.inject_hyperparams(ivon_jax.ivon)(learning_rate=0.1, ess=10.0,
                                                b2=0.99999).init(params)
    tx = optax.inject_hyperparams(ivon_jax.ivon, hyperparam_dtype=jnp.float32)(
        learning_rate=0.1, ess=10.0, b2=0.99999
    )
    state = tx.init(params)
    # The float32 learning rate must not promote the bfloat16 updates (strict promotion on).
    updates, state = jax.jit(
        lambda s: tx.update(
            {"w": jnp.ones(4, jnp.bfloat16)}, s, params, hess={"w": jnp.full(4, 3.0)}
        )
    )(state)
    assert updates["w"].dtype == jnp.bfloat16
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.bfloat16
    h = np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"], np.float64)
    np.testing.assert_allclose(h, 1.0 + 2e-5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["w"], np.float64), 1.0 - 0.1, atol=4e-3)


def test_learning_rate_schedule():
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.3, -0.4])}
    hess = {"w": jnp.array([2.0, 1.0])}
    # optax's schedules are not clean under strict dtype promotion.
    with jax.numpy_dtype_promotion("standard"):
        schedule = optax.piecewise_constant_schedule(0.1, {1: 0.5, 2: 10.0})  # 0.1, 0.05, 0.5
        opt = ivon_jax.ivon(schedule, ess=10.0, hess_init=2.0, weight_decay=0.0)
        const = ivon_jax.ivon(0.1, ess=10.0, hess_init=2.0, weight_decay=0.0)
        state, cstate = opt.init(params), const.init(params)
        step = jax.jit(lambda s, p: opt.update(grads, s, p, hess=hess))
        us = []
        for _ in range(3):
            u, state = step(state, params)
            uc, cstate = const.update(grads, cstate, params, hess=hess)
            us.append((u["w"], uc["w"]))
    # step 1: lr 0.1 (same as the constant); step 2: lr 0.05; step 3: lr 0.5 = 5× constant.
    np.testing.assert_allclose(np.asarray(us[0][0]), np.asarray(us[0][1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(us[1][0]), 0.5 * np.asarray(us[1][1]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(us[2][0]), 5.0 * np.asarray(us[2][1]), rtol=1e-6)
    # rescale_lr applies to schedules too: first step size α (h0 + δ) ĝ/(h1 + δ).
    h1 = (
        0.99999 * 2.0
        + 1e-5 * np.array([2.0, 1.0])
        + 0.5e-10 * (2.0 - np.array([2.0, 1.0])) ** 2 / 2
    )
    np.testing.assert_allclose(
        np.asarray(us[0][0]), -0.1 * 2.0 * np.array([0.3, -0.4]) / h1, rtol=1e-5
    )


# ------------------------------------------------------------------------ NNX & kwargs


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


def test_nnx_optimizer_update_matches_pure_optax():
    model = _Net(nnx.Rngs(1))
    tx = ivon_jax.ivon(0.1, ess=50.0, b2=0.9)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    pure_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pure_state = tx.init(pure_params)
    x = jnp.arange(12.0).reshape(4, 3) / 10.0
    loss = lambda m: jnp.mean(m(x) ** 2)
    grads = nnx.grad(loss)(model)
    pure_grads = nnx.to_pure_dict(grads)
    pure_hess = jax.tree.map(lambda g: 3.0 * jnp.abs(g) + 0.5, pure_grads)
    hess = jax.tree.map(lambda g: 3.0 * jnp.abs(g) + 0.5, grads)
    optimizer.update(model, grads, hess=hess)
    updates, pure_state = tx.update(pure_grads, pure_state, pure_params, hess=pure_hess)
    want = optax.apply_updates(pure_params, updates)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _allclose_trees(got, want, rtol=1e-6)
    assert not np.allclose(
        np.asarray(got["lin"]["kernel"]), np.asarray(pure_params["lin"]["kernel"])
    )
    # The optimizer state inside NNX equals the pure state, and σ is readable from it.
    sigma_nnx = ivon_jax.posterior_std(optimizer.opt_state, nnx.state(model, nnx.Param))
    _allclose_trees(
        nnx.to_pure_dict(sigma_nnx), ivon_jax.posterior_std(pure_state, pure_params), rtol=1e-6
    )


def test_unknown_extra_kwargs_ignored():
    params, x, y = _problem()
    opt = optax.chain(optax.clip_by_global_norm(1.0), ivon_jax.ivon(0.05, ess=100.0))
    state = opt.init(params)
    _, grads, hess = ivon_jax.value_and_grad(_loss)(jax.random.key(0), params, state, x, y)
    u1, s1 = opt.update(grads, state, params, hess=hess)
    u2, s2 = opt.update(
        grads,
        state,
        params,
        hess=hess,
        value=jnp.asarray(1.0),
        grad=grads,
        something_else="ignored",
    )
    _allclose_trees(u1, u2, rtol=0.0)
    _allclose_trees(s1, s2, rtol=0.0)


def test_state_size_is_adams_plus_scalars():
    params, _, _ = _problem()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    size = lambda tree: sum(np.size(x) for x in jax.tree.leaves(tree))
    ivon_size = size(ivon_jax.ivon(0.1, ess=10.0).init(params))
    adam_size = size(optax.adam(1e-3).init(params))
    assert adam_size == 2 * n_params + 1
    # Beyond Adam's: λ, δ, β₂, the guard's skip count and one h₀ per parameter leaf.
    n_leaves = len(jax.tree.leaves(params))
    assert 2 * n_params <= ivon_size <= adam_size + 4 + n_leaves
    # ... and it stays that size after sampling and an update (no noise stored).
    opt = ivon_jax.ivon(0.1, ess=10.0)
    _, x, y = _problem()
    _, state, _ = _make_step(opt)(params, opt.init(params), jax.random.key(0), x, y)
    assert size(state) == ivon_size


def _masked_wrappers(inner, frozen):
    """optax's ways of keeping IVON off some parameters; none is told to mask `hess`."""
    train = jax.tree.map(lambda f: not f, frozen)
    labels = jax.tree.map(lambda f: "freeze" if f else "train", frozen)
    return {
        "masked": optax.masked(inner, train),
        "selective_transform": optax.transforms.selective_transform(inner, freeze_mask=frozen),
        "partition": optax.partition(
            {"train": inner, "freeze": optax.set_to_zero()}, labels
        ),
    }


@pytest.mark.parametrize("wrapper", ["masked", "selective_transform", "partition"])
def test_masks_around_ivon_mask_hess_too(wrapper):
    # grads and hess over all parameters, as value_and_grad returns them; the wrapper masks
    # grads and params, IVON masks hess the same way. Truth: IVON on the trained leaves alone.
    params, x, y = _problem()
    frozen = {"w": True, "v": False, "c": False}
    inner = ivon_jax.ivon(0.05, ess=100.0, hess_init=0.5, b2=0.999)
    tx = _masked_wrappers(inner, frozen)[wrapper]
    state = tx.init(params)
    sub = {k: params[k] for k in ("v", "c")}
    sub_state = inner.init(sub)
    vg = ivon_jax.value_and_grad(_loss)
    for step in range(3):
        key = jax.random.key(step)
        _, grads, hess = vg(key, params, state, x, y)
        assert jax.tree.structure(hess) == jax.tree.structure(params)
        updates, state = tx.update(grads, state, params, hess=hess)
        sub_updates, sub_state = inner.update(
            {k: grads[k] for k in sub}, sub_state, sub, hess={k: hess[k] for k in sub}
        )
        _allclose_trees({k: updates[k] for k in sub}, sub_updates, rtol=0.0)
        # Frozen leaves: masked passes the raw gradient on, the others give zero.
        want_w = grads["w"] if wrapper == "masked" else jnp.zeros_like(grads["w"])
        np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(want_w))
        if wrapper != "masked":
            params = optax.apply_updates(params, updates)
            sub = optax.apply_updates(sub, sub_updates)
    if wrapper != "masked":
        np.testing.assert_array_equal(np.asarray(params["w"]), np.asarray(_problem()[0]["w"]))
    # σ of a frozen leaf is zero: it is never sampled.
    sigma = ivon_jax.posterior_std(state, params)
    assert float(jnp.max(sigma["w"])) == 0.0 and float(jnp.min(sigma["v"])) > 0.0


def test_freeze_in_a_chain_does_not_stop_ivon():
    # optax.transforms.freeze zeroes the gradients, but IVON still manages the leaf: its
    # weight decay moves it and it is sampled. (The guide says to use selective_transform.)
    params, x, y = _problem()
    frozen = {"w": True, "v": False, "c": False}
    tx = optax.chain(optax.transforms.freeze(frozen), ivon_jax.ivon(0.05, ess=100.0))
    state = tx.init(params)
    _, grads, hess = ivon_jax.value_and_grad(_loss)(jax.random.key(0), params, state, x, y)
    updates, state = tx.update(grads, state, params, hess=hess)
    assert float(jnp.max(jnp.abs(updates["w"]))) > 0.0
    assert float(jnp.min(ivon_jax.posterior_std(state, params)["w"])) > 0.0
