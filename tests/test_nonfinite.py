"""Non-finite gradients and Hessian estimates: the skip policy, and why it is needed.

Policy: ``ivon(..., skip_nonfinite=True)`` (the same as ``ivon_jax.skip_nonfinite(ivon(...))``)
turns a step whose gradients *or* Hessian estimate hold a NaN or an infinity into a no-op:
zero updates, the wrapped state (m-independent g and h, IVON's count, the schedule's count)
returned bit for bit, and ``skipped`` incremented. A run with a bad batch is therefore exactly
the run in which that batch (and its key) was never there.

Without the option a single NaN batch makes h NaN, hence σ NaN, for the rest of training (NaN
is absorbing in β₂h + ...). ``optax.apply_if_finite`` forwards ``hess`` to IVON but checks only
the gradients, so a NaN that appears only in ĥ passes through it, and after
``max_consecutive_errors`` bad steps it applies the bad update anyway.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

K_BATCHES = 10
BATCH = 16


def _data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(K_BATCHES, BATCH, 3)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5], np.float32)
    y = (x @ w + 0.3 + 0.1 * rng.normal(size=(K_BATCHES, BATCH))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def _loss(p, x, y):
    return jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))


PARAMS0 = {"w": jnp.zeros(3, jnp.float32), "b": jnp.zeros([], jnp.float32)}


def _ivon(**kw):
    schedule = optax.cosine_decay_schedule(0.1, 2 * K_BATCHES)
    return ivon_jax.ivon(schedule, ess=160.0, hess_init=0.5, b2=0.99, **kw)


def _make(kind):
    if kind == "option":
        return _ivon(skip_nonfinite=True)
    if kind == "wrapper":
        return ivon_jax.skip_nonfinite(_ivon())
    if kind == "chain":  # the wrapper around a longer chain, with hyper-parameters injected
        return ivon_jax.skip_nonfinite(
            optax.chain(
                optax.clip_by_global_norm(100.0),
                optax.inject_hyperparams(ivon_jax.ivon)(
                    learning_rate=optax.cosine_decay_schedule(0.1, 2 * K_BATCHES),
                    ess=160.0, hess_init=0.5, b2=0.99,
                ),
            )
        )
    if kind == "plain":
        return _ivon()
    if kind == "apply_if_finite":
        return optax.apply_if_finite(_ivon(), max_consecutive_errors=2)
    raise ValueError(kind)


def _init(opt):
    with jax.numpy_dtype_promotion("standard"):  # inject_hyperparams evaluates schedules
        return opt.init(PARAMS0)


@functools.cache
def _opt_and_step(kind):
    """One optimizer and one compiled step per kind, shared by the tests."""
    opt = _make(kind)
    return opt, _stepper(opt)


def _stepper(opt):
    """One explicit IVON step; ``corrupt`` = (where, value) puts ``value`` into ``w[1]`` of
    the gradients or of the Hessian estimate (where ∈ {"none", "grads", "hess"})."""

    def step(params, state, key, x, y, corrupt_grads, corrupt_hess):
        with jax.numpy_dtype_promotion("standard"):  # optax schedules are not strict-clean
            sampled, noise = ivon_jax.sample_params(key, params, state)
            grads = jax.grad(_loss)(sampled, x, y)
            hess = ivon_jax.estimate_hessian(grads, noise, state)
            grads = {"w": grads["w"].at[1].add(corrupt_grads), "b": grads["b"]}
            hess = {"w": hess["w"].at[1].add(corrupt_hess), "b": hess["b"]}
            updates, state = opt.update(grads, state, params, hess=hess)
            return optax.apply_updates(params, updates), state, updates

    return jax.jit(step)


def _keys():
    return jax.random.split(jax.random.key(7), K_BATCHES)


def _inner(state):
    """Everything but the skip counter."""
    return state.inner_state if isinstance(state, ivon_jax.SkipNonFiniteState) else state


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _warm(kind, n=3):
    """State after n good steps, so that g ≠ 0 and h ≠ h₀ (a skip has something to keep)."""
    x, y = _data()
    opt, step = _opt_and_step(kind)
    params, state = PARAMS0, _init(opt)
    for i in range(n):
        params, state, _ = step(params, state, _keys()[i], x[i], y[i], 0.0, 0.0)
    return params, state, step


def _counts(state):
    """IVON's count and every other `count` field (schedules) in the state."""
    return [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state, "count")]


@pytest.mark.parametrize("kind", ["option", "wrapper", "chain"])
@pytest.mark.parametrize("where", ["data", "grads", "hess"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_bad_step_leaves_params_and_state_untouched(kind, where, value):
    params, state, step = _warm(kind)
    x, y = _data()
    xb = x[3] * np.float32(value) if where == "data" else x[3]
    cg = np.float32(value) if where == "grads" else np.float32(0.0)
    ch = np.float32(value) if where == "hess" else np.float32(0.0)
    new_params, new_state, updates = step(params, state, _keys()[3], xb, y[3], cg, ch)
    _assert_trees_equal(new_params, params)
    _assert_trees_equal(_inner(new_state), _inner(state))  # g, h, λ, δ, all counts
    assert int(new_state.skipped) == int(state.skipped) + 1 == 1
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    # The counts are those of 3 applied steps (IVON's and the schedule's).
    assert _counts(new_state) == [3] * len(_counts(new_state))
    sigma = ivon_jax.posterior_std(new_state)
    assert all(np.all(np.isfinite(s)) and np.all(s > 0) for s in jax.tree.leaves(sigma))


@pytest.mark.parametrize("kind", ["option", "wrapper", "chain"])
def test_run_with_bad_batches_equals_run_without_them(kind):
    """Batches 3, 4 (consecutive) and 8 are NaN. Each batch comes with its own key; dropping
    the bad (batch, key) pairs must give exactly the same trajectory."""
    bad = {3, 4, 8}
    opt, step = _opt_and_step(kind)
    x, y = _data()
    keys = _keys()
    zero = np.float32(0.0)

    params_a, state_a = PARAMS0, _init(opt)
    traj_a = []
    for i in range(K_BATCHES):
        xb = x[i] * np.float32(np.nan) if i in bad else x[i]
        params_a, state_a, _ = step(params_a, state_a, keys[i], xb, y[i], zero, zero)
        if i not in bad:
            traj_a.append((params_a, _inner(state_a)))

    params_b, state_b = PARAMS0, _init(opt)
    traj_b = []
    for i in range(K_BATCHES):
        if i in bad:
            continue
        params_b, state_b, _ = step(params_b, state_b, keys[i], x[i], y[i], zero, zero)
        traj_b.append((params_b, _inner(state_b)))

    assert len(traj_a) == len(traj_b) == K_BATCHES - len(bad)
    for a, b in zip(traj_a, traj_b, strict=True):
        _assert_trees_equal(a, b)
    assert int(state_a.skipped) == len(bad) and int(state_b.skipped) == 0
    # The run did move, so the equality is not vacuous.
    assert float(jnp.max(jnp.abs(params_a["w"] - PARAMS0["w"]))) > 0.1


def test_many_consecutive_bad_steps_are_all_skipped():
    """Unlike apply_if_finite, a skip is never overridden, however many bad steps in a row."""
    params, state, step = _warm("option")
    x, y = _data()
    nan = np.float32(np.nan)
    start = (params, _inner(state))
    for i in range(6):
        params, state, _ = step(params, state, _keys()[i], x[i], y[i], nan, np.float32(0.0))
    _assert_trees_equal((params, _inner(state)), start)
    assert int(state.skipped) == 6


def test_without_the_option_one_nan_batch_poisons_h_and_sigma_for_good():
    params, state, step = _warm("plain")
    x, y = _data()
    zero = np.float32(0.0)
    params, state, _ = step(params, state, _keys()[3], x[3] * np.float32(np.nan), y[3], zero, zero)
    # NaN data → NaN gradients → NaN ĥ → NaN h (and m).
    st = ivon_jax.find_ivon_states(state)[0]
    assert np.all(np.isnan(np.asarray(st.hess["w"])))
    for i in range(4, K_BATCHES):  # good batches do not heal it: β₂·NaN = NaN
        params, state, _ = step(params, state, _keys()[i], x[i], y[i], zero, zero)
    sigma = ivon_jax.posterior_std(state)
    assert np.all(np.isnan(np.asarray(sigma["w"])))
    assert np.all(np.isnan(np.asarray(params["w"])))


def test_without_the_option_nan_only_in_hess_poisons_h_but_not_yet_m():
    """A NaN only in ĥ[w][1]: h[w][1] becomes NaN at once; m moves by u = (ḡ+δm)/(h+δ), so
    m[w][1] is NaN too, while the other entries stay finite (the maths is elementwise)."""
    params, state, step = _warm("plain")
    x, y = _data()
    params, state, _ = step(params, state, _keys()[3], x[3], y[3], np.float32(0.0),
                            np.float32(np.nan))
    h = np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"])
    assert np.isnan(h[1]) and np.all(np.isfinite(h[[0, 2]]))
    assert np.isnan(float(ivon_jax.posterior_std(state)["w"][1]))


def test_apply_if_finite_lets_a_nan_in_hess_through():
    """optax.apply_if_finite forwards `hess` to IVON but checks only the gradients."""
    params, state, step = _warm("apply_if_finite")
    x, y = _data()
    params, state, _ = step(params, state, _keys()[3], x[3], y[3], np.float32(0.0),
                            np.float32(np.nan))
    assert int(state.total_notfinite) == 0  # it did not notice
    h = np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"])
    assert np.isnan(h[1])
    assert np.isnan(float(ivon_jax.posterior_std(state)["w"][1]))
    # Ours, on the very same input, skips the step and keeps h finite.
    p2, s2, step2 = _warm("option")
    p3, s3, _ = step2(p2, s2, _keys()[3], x[3], y[3], np.float32(0.0), np.float32(np.nan))
    assert int(s3.skipped) == 1
    _assert_trees_equal((p3, s3.inner_state), (p2, s2.inner_state))


def test_apply_if_finite_catches_nan_grads_but_gives_up_after_max_errors():
    params, state, step = _warm("apply_if_finite")  # max_consecutive_errors=2
    x, y = _data()
    nan, zero = np.float32(np.nan), np.float32(0.0)
    h_before = np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"])
    for i in range(2):  # NaN data, hence NaN gradients: caught, state kept
        params, state, _ = step(params, state, _keys()[i], x[i] * nan, y[i], zero, zero)
    np.testing.assert_array_equal(
        np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"]), h_before
    )
    assert int(state.total_notfinite) == 2
    # The third bad step in a row exceeds max_consecutive_errors: the NaN goes in.
    params, state, _ = step(params, state, _keys()[2], x[2] * nan, y[2], zero, zero)
    assert np.all(np.isnan(np.asarray(ivon_jax.find_ivon_states(state)[0].hess["w"])))
    assert np.all(np.isnan(np.asarray(params["w"])))


def test_skip_inside_lax_scan_with_value_and_grad():
    """The whole loop in lax.scan: the state's structure is constant, ``skipped`` counts the
    NaN batches, σ stays finite and positive throughout."""
    opt = _make("option")
    vg = ivon_jax.value_and_grad(_loss, num_samples=2)
    x, y = _data()
    bad = jnp.asarray([i in {2, 5, 6} for i in range(K_BATCHES)])
    x = jnp.where(bad[:, None, None], jnp.float32(jnp.nan), x)

    def body(carry, inp):
        params, state = carry
        key, xb, yb = inp
        with jax.numpy_dtype_promotion("standard"):
            loss, grads, hess = vg(key, params, state, xb, yb)
            updates, state = opt.update(grads, state, params, hess=hess)
        params = optax.apply_updates(params, updates)
        sigma_min = jnp.min(ivon_jax.posterior_std(state)["w"])
        return (params, state), (loss, sigma_min)

    state0 = opt.init(PARAMS0)
    (params, state), (losses, sigma_min) = jax.lax.scan(
        body, (PARAMS0, state0), (_keys(), x, y)
    )
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert int(state.skipped) == 3
    assert int(state.inner_state[0].count) == K_BATCHES - 3
    losses = np.asarray(losses)
    assert np.all(np.isnan(losses[[2, 5, 6]]))
    assert np.all(np.isfinite(np.asarray(sigma_min))) and np.all(np.asarray(sigma_min) > 0)
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))


def test_injected_schedule_keeps_its_count_when_skip_is_outermost():
    """skip_nonfinite(inject_hyperparams(ivon)(learning_rate=schedule)): a skipped step leaves
    inject_hyperparams' count (which drives the schedule) unchanged."""
    with jax.numpy_dtype_promotion("standard"):
        opt = ivon_jax.skip_nonfinite(
            optax.inject_hyperparams(ivon_jax.ivon)(
                learning_rate=optax.cosine_decay_schedule(0.1, 10), ess=10.0
            )
        )
        state = opt.init(PARAMS0)
        bad = {"w": jnp.full(3, jnp.nan), "b": jnp.zeros([], jnp.float32)}
        _, state = opt.update(bad, state, PARAMS0, hess=bad)
    assert int(state.skipped) == 1
    assert int(state.inner_state.count) == 0


def test_injected_skip_option_advances_the_injected_schedule():
    """Documented caveat: inject_hyperparams(ivon)(..., skip_nonfinite=True) puts the skip
    *inside* inject_hyperparams, whose own count (the schedule's step) still advances on a
    skipped step. Wrap with ivon_jax.skip_nonfinite outermost instead (test above)."""
    with jax.numpy_dtype_promotion("standard"):
        opt = optax.inject_hyperparams(ivon_jax.ivon)(
            learning_rate=optax.cosine_decay_schedule(0.1, 10), ess=10.0, skip_nonfinite=True
        )
        state = opt.init(PARAMS0)
        bad = {"w": jnp.full(3, jnp.nan), "b": jnp.zeros([], jnp.float32)}
        _, state = opt.update(bad, state, PARAMS0, hess=bad)
    assert int(state.inner_state.skipped) == 1
    assert int(state.inner_state.inner_state[0].count) == 0  # IVON's count is kept
    assert int(state.count) == 1  # but the injected schedule moved on
