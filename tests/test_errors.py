"""Errors: bad hyper-parameters, bad trees and bad states fail early, naming the problem."""

import jax
import jax.numpy as jnp
import optax
import pytest

import ivon_jax


def _params():
    return {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}


def _setup():
    params = _params()
    opt = ivon_jax.ivon(0.1, ess=10.0)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    hess = jax.tree.map(jnp.ones_like, params)
    return opt, state, params, grads, hess


# ------------------------------------------------------------------------ hyper-parameters


@pytest.mark.parametrize("factory", ["ivon", "scale_by_ivon"])
@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("ess", 0.0, r"`ess` must be > 0.*0\.0"),
        ("ess", -5.0, r"`ess` must be > 0.*-5\.0"),
        ("hess_init", 0.0, r"`hess_init` must be > 0"),
        ("hess_init", -1.0, r"`hess_init` must be > 0"),
        ("b1", -0.1, r"`b1` must be in \[0, 1\).*-0\.1"),
        ("b1", 1.0, r"`b1` must be in \[0, 1\).*1\.0"),
        ("b2", -0.1, r"`b2` must be in \[0, 1\)"),
        ("b2", 1.0, r"`b2` must be in \[0, 1\).*1\.0"),
        ("weight_decay", -1e-4, r"`weight_decay` must be >= 0"),
    ],
)
def test_bad_common_hyperparameters(factory, name, value, pattern):
    kwargs = {"ess": 10.0, name: value}
    with pytest.raises(ValueError, match=pattern):
        if factory == "ivon":
            ivon_jax.ivon(0.1, **kwargs)
        else:
            ivon_jax.scale_by_ivon(**kwargs)


def test_boundary_values_are_accepted():
    # b1 = 0, b2 = 0 and weight_decay = 0 are allowed; clip_radius None means "no clip".
    ivon_jax.ivon(0.0, ess=1.0, b1=0.0, b2=0.0, weight_decay=0.0, clip_radius=None)


@pytest.mark.parametrize("lr", [-0.1, -1e-8])
def test_negative_learning_rate(lr):
    with pytest.raises(ValueError, match=r"`learning_rate` must be >= 0"):
        ivon_jax.ivon(lr, ess=10.0)


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_nonpositive_clip_radius(clip):
    with pytest.raises(ValueError, match=r"`clip_radius` must be > 0"):
        ivon_jax.ivon(0.1, ess=10.0, clip_radius=clip)


def test_concrete_array_hyperparameter_is_checked():
    with pytest.raises(ValueError, match=r"`ess` must be > 0"):
        ivon_jax.ivon(0.1, ess=jnp.asarray(-3.0))


# ------------------------------------------------------------------------------- estimators


def test_unknown_method_estimate_hessian():
    _opt, state, params, grads, _ = _setup()
    _, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    with pytest.raises(ValueError, match=r"unknown Hessian estimator method 'bogus'"):
        ivon_jax.estimate_hessian(grads, noise, state, method="bogus")


def test_unknown_method_value_and_grad():
    with pytest.raises(ValueError, match=r"unknown Hessian estimator method 'gradsquared'"):
        ivon_jax.value_and_grad(lambda p: jnp.sum(p["w"]), method="gradsquared")


def test_price_estimator_needs_noise():
    _opt, state, _params, grads, _ = _setup()
    with pytest.raises(ValueError, match=r"'price' estimator needs the `noise`"):
        ivon_jax.estimate_hessian(grads, None, state)
    # gradsq does not need it.
    ivon_jax.estimate_hessian(grads, None, state, method="gradsq")


@pytest.mark.parametrize("n", [0, -1, 1.5, 2.0, True, "2"])
def test_bad_num_samples(n):
    with pytest.raises(ValueError, match=r"`num_samples` must be an int >= 1"):
        ivon_jax.value_and_grad(lambda p: jnp.sum(p["w"]), num_samples=n)


@pytest.mark.parametrize("mode", ["map", "pmap", "", None])
def test_bad_mode(mode):
    with pytest.raises(ValueError, match=r"`mode` must be one of \('vmap', 'scan'\)"):
        ivon_jax.value_and_grad(lambda p: jnp.sum(p["w"]), mode=mode)


# --------------------------------------------------------------------------------- update


def test_update_without_hess():
    opt, state, params, grads, _ = _setup()
    with pytest.raises(ValueError, match=r"needs the Hessian estimate.*hess=hess"):
        opt.update(grads, state, params)


def test_update_without_params():
    opt, state, _params, grads, hess = _setup()
    with pytest.raises(ValueError, match=r"needs `params`"):
        opt.update(grads, state, hess=hess)


def test_update_without_hess_inside_chain():
    params = _params()
    tx = optax.chain(optax.clip_by_global_norm(1.0), ivon_jax.ivon(0.1, ess=10.0))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"needs the Hessian estimate"):
        tx.update(jax.tree.map(jnp.ones_like, params), state, params)


def test_hess_missing_key():
    opt, state, params, grads, hess = _setup()
    del hess["b"]
    with pytest.raises(
        ValueError,
        match=r"`hess` and `params` must have the same tree "
        r"structure; params has leaves that hess lacks: \['b'\]",
    ):
        opt.update(grads, state, params, hess=hess)


def test_hess_extra_key():
    opt, state, params, grads, hess = _setup()
    hess["extra"] = jnp.ones(2)
    with pytest.raises(ValueError, match=r"hess has leaves that params lacks: \['extra'\]"):
        opt.update(grads, state, params, hess=hess)


def test_hess_wrong_shape_names_leaf():
    opt, state, params, grads, hess = _setup()
    hess["w"] = jnp.ones((3, 2))
    with pytest.raises(
        ValueError,
        match=r"`hess\['w'\]` has shape \(3, 2\) but "
        r"`params\['w'\]` has shape \(2, 3\)",
    ):
        opt.update(grads, state, params, hess=hess)


def test_grads_wrong_shape_names_leaf():
    opt, state, params, grads, hess = _setup()
    grads["b"] = jnp.ones(4)
    with pytest.raises(
        ValueError,
        match=r"`grads\['b'\]` has shape \(4,\) but "
        r"`params\['b'\]` has shape \(3,\)",
    ):
        opt.update(grads, state, params, hess=hess)


def test_grads_missing_key():
    opt, state, params, grads, hess = _setup()
    del grads["w"]
    with pytest.raises(ValueError, match=r"params has leaves that grads lacks: \['w'\]"):
        opt.update(grads, state, params, hess=hess)


def test_params_unlike_init():
    opt, state, _params, _grads, _hess = _setup()
    other = {"w": jnp.ones((2, 3)), "c": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"opt_state\.hess.*Was the optimizer initialised"):
        opt.update(
            jax.tree.map(jnp.ones_like, other),
            state,
            other,
            hess=jax.tree.map(jnp.ones_like, other),
        )


def test_estimate_hessian_noise_mismatch_names_leaf():
    _opt, state, _params, grads, _ = _setup()
    noise = {"w": jnp.ones((2, 3)), "b": jnp.ones(5)}
    with pytest.raises(ValueError, match=r"`noise\['b'\]` has shape \(5,\)"):
        ivon_jax.estimate_hessian(grads, noise, state)


def test_sample_params_wrong_shape_names_leaf():
    _opt, state, params, _, _ = _setup()
    params["w"] = jnp.ones((4,))
    with pytest.raises(
        ValueError,
        match=r"`params\['w'\]` has shape \(4,\) but the IVON "
        r"state holds shape \(2, 3\)",
    ):
        ivon_jax.sample_params(jax.random.key(0), params, state)


def test_sample_params_missing_leaf():
    _opt, state, params, _, _ = _setup()
    del params["b"]
    with pytest.raises(
        ValueError,
        match=r"the IVON state has leaves that `params` lacks: "
        r"\['b'\]",
    ):
        ivon_jax.sample_params(jax.random.key(0), params, state)


# ---------------------------------------------------------------------------------- states


@pytest.mark.parametrize(
    "fn",
    [
        "sample_params",
        "estimate_hessian",
        "posterior_std",
        "posterior_std_params",
        "value_and_grad",
    ],
)
def test_state_without_ivon(fn):
    params = _params()
    state = optax.adam(1e-3).init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    call = {
        "sample_params": lambda: ivon_jax.sample_params(jax.random.key(0), params, state),
        "estimate_hessian": lambda: ivon_jax.estimate_hessian(grads, grads, state),
        "posterior_std": lambda: ivon_jax.posterior_std(state),
        "posterior_std_params": lambda: ivon_jax.posterior_std(state, params),
        "value_and_grad": lambda: ivon_jax.value_and_grad(lambda p: jnp.sum(p["w"]))(
            jax.random.key(0), params, state
        ),
    }[fn]
    with pytest.raises(ValueError, match=r"no IVON state found in the optimizer state"):
        call()


def test_posterior_std_with_two_ivon_states_needs_params():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    tx = optax.multi_transform(
        {"A": ivon_jax.ivon(0.1, ess=1.0), "B": ivon_jax.ivon(0.1, ess=2.0)},
        {"a": "A", "b": "B"},
        mask_compatible_extra_args=True,
    )
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"several IVON states; pass `params=`"):
        ivon_jax.posterior_std(state)
    ivon_jax.posterior_std(state, params)  # fine with params


def test_parameter_managed_twice():
    params = {"a": jnp.zeros(2)}
    tx = optax.chain(ivon_jax.scale_by_ivon(ess=1.0), ivon_jax.scale_by_ivon(ess=2.0))
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['a'\] is managed by more than one IVON"):
        ivon_jax.sample_params(jax.random.key(0), params, state)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_leaf_at_init_is_type_error(dtype):
    params = {"w": jnp.ones(3), "nested": {"step": jnp.zeros(2, dtype)}}
    with pytest.raises(
        TypeError,
        match=r"floating-point parameters only.*"
        r"`params\['nested'\]\['step'\]`",
    ):
        ivon_jax.ivon(0.1, ess=10.0).init(params)


def test_masked_hess_of_other_parameters_names_leaf():
    # Under a mask IVON masks a full-structure `hess` itself; a `hess` of other parameters
    # (here one leaf too many) is still an error that names the leaf.
    params = {"w": jnp.ones(3), "frozen": jnp.ones(2)}
    tx = optax.masked(ivon_jax.ivon(0.1, ess=10.0), {"w": True, "frozen": False})
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    hess = {**jax.tree.map(jnp.ones_like, params), "extra": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"hess has leaves that params lacks: \['extra'\]"):
        tx.update(grads, state, params, hess=hess)


def test_missing_hess_message_names_every_framework():
    opt, state, params, grads, _ = _setup()
    with pytest.raises(ValueError) as info:
        opt.update(grads, state, params)
    msg = str(info.value)
    assert "tx.update(grads, state, params, hess=hess)" in msg
    assert "ivon_jax.flax.nnx.value_and_grad" in msg
    assert "optimizer.update(model, grads, hess=hess)" in msg
    assert "ivon_jax.flax.linen.TrainState" in msg
    assert "flax.training.train_state.TrainState" in msg  # the one that drops `hess`
    assert "ivon_jax.equinox.value_and_grad" in msg
    assert "eqx.filter(model, eqx.is_inexact_array)" in msg


def test_flax_train_state_reaches_the_missing_hess_message():
    # Flax's own TrainState calls tx.update(grads, opt_state, params): the message says which
    # TrainState to use instead.
    from flax.training import train_state

    params = _params()
    state = train_state.TrainState.create(
        apply_fn=None, params=params, tx=ivon_jax.ivon(0.1, ess=10.0)
    )
    with pytest.raises(ValueError, match=r"ivon_jax\.flax\.linen\.TrainState"):
        state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))


def test_non_array_leaf_at_init_names_leaf_and_type():
    params = {"w": jnp.ones(3), "act": jax.nn.relu}
    with pytest.raises(TypeError, match=r"must be arrays.*`params\['act'\]` is a custom_jvp"):
        ivon_jax.ivon(0.1, ess=10.0).init(params)


# ------------------------------------------------------------- tracers are not validated


def test_inject_hyperparams_under_jit_no_spurious_error():
    params = _params()
    # b2 given: with its default None (β₂ from total_steps) inject_hyperparams would hold it
    # as a static argument, not as a hyper-parameter in the state.
    tx = optax.inject_hyperparams(ivon_jax.ivon)(learning_rate=0.1, ess=10.0, clip_radius=1.0,
                                                 b2=0.99999)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    hess = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def step(state):
        return tx.update(grads, state, params, hess=hess)

    u_jit, s_jit = step(state)
    u_eager, _ = tx.update(grads, state, params, hess=hess)
    for a, b in zip(jax.tree.leaves(u_jit), jax.tree.leaves(u_eager), strict=True):
        assert jnp.allclose(a, b, rtol=1e-6)
    step(s_jit)
    # Even hyper-parameters that would be rejected eagerly pass through a traced update
    # (they are tracers: not validated), while the same values fail when concrete.
    bad = state._replace(hyperparams={**state.hyperparams, "b2": jnp.asarray(1.0)})
    step(bad)
    with pytest.raises(ValueError, match=r"`b2` must be in \[0, 1\)"):
        tx.update(grads, bad, params, hess=hess)


def test_jit_of_sample_and_update_with_traced_ess():
    # ess passed as a traced argument: no concretisation error from the checks.
    params = _params()

    @jax.jit
    def f(ess):
        opt = ivon_jax.ivon(0.1, ess=ess)
        state = opt.init(params)
        _sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
        hess = ivon_jax.estimate_hessian(jax.tree.map(jnp.ones_like, params), noise, state)
        return opt.update(jax.tree.map(jnp.ones_like, params), state, params, hess=hess)

    f(jnp.asarray(10.0))


# ----------------------------------------------------------------------- Flax NNX keys


def _nnx_setup():
    from flax import nnx

    from ivon_jax.flax import nnx as ivon_nnx

    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=100.0), wrt=nnx.Param)
    vg = ivon_nnx.value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))
    return nnx, model, optimizer, vg, jnp.ones((4, 3))


@pytest.mark.parametrize("call", ["model_batch", "model_optimizer_batch", "batch_as_model"])
def test_nnx_value_and_grad_without_key_shows_the_call(call):
    nnx, model, optimizer, vg, x = _nnx_setup()
    args = {
        "model_batch": (model, x),
        "model_optimizer_batch": (model, optimizer, x),
        "batch_as_model": (jax.random.key(0), x, optimizer),
    }[call]
    got = "a ArrayImpl as the model" if call == "batch_as_model" else "a Linear as the key"
    with pytest.raises(
        TypeError,
        match=r"is called as `loss, grads, hess = vg\(key, model, optimizer, \*args\)`.*" + got,
    ):
        vg(*args)


def test_nnx_value_and_grad_takes_rngs_and_streams_as_the_key():
    nnx, model, optimizer, vg, x = _nnx_setup()
    want = vg(nnx.Rngs(5)(), model, optimizer, x)  # the key an nnx.Rngs(5) draws first
    for key in (nnx.Rngs(5), nnx.Rngs(default=5), nnx.Rngs(noise=5).noise):
        got = vg(key, model, optimizer, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert jnp.array_equal(a, b)
    # The Rngs advances as NNX layers advance it: two calls draw two different keys.
    rngs = nnx.Rngs(5)
    first, second = vg(rngs, model, optimizer, x), vg(rngs, model, optimizer, x)
    assert not jnp.array_equal(first[1]["kernel"][...], second[1]["kernel"][...])


def test_nnx_rngs_without_default_stream():
    nnx, model, optimizer, vg, x = _nnx_setup()
    with pytest.raises(TypeError, match=r"has no `default` stream.*vg\(key, model, optimizer"):
        vg(nnx.Rngs(dropout=1), model, optimizer, x)
