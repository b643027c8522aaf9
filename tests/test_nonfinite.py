"""Non-finite gradients and Hessian estimates: the skip policy, and why it is needed.

Policy of ``ivon(...)``'s default guard (``skip_nonfinite=True``): a step whose gradients hold
a NaN or an infinity is a no-op: zero updates, the state (m-independent g and h, IVON's count,
the schedule's count) returned bit for bit, and ``skipped`` incremented. A run with a bad batch
is therefore exactly the run in which that batch (and its key) was never there. A NaN or an
infinity only in the Hessian estimate (which the library's estimators never give for finite
gradients) leaves those elements of h as they were, and the step goes on. The generic wrapper
``ivon_jax.skip_nonfinite(tx)`` skips the whole step on *any* non-finite value, in the
gradients, the Hessian estimate or the results.

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
    if kind == "option":  # the default
        return _ivon()
    if kind == "wrapper":
        return ivon_jax.skip_nonfinite(_ivon(skip_nonfinite=False))
    if kind == "chain":  # the wrapper around a longer chain, with hyper-parameters injected
        return ivon_jax.skip_nonfinite(
            optax.chain(
                optax.clip_by_global_norm(100.0),
                optax.inject_hyperparams(ivon_jax.ivon)(
                    learning_rate=optax.cosine_decay_schedule(0.1, 2 * K_BATCHES),
                    ess=160.0, hess_init=0.5, b2=0.99, skip_nonfinite=False,
                ),
            )
        )
    if kind == "plain":  # the guard switched off
        return _ivon(skip_nonfinite=False)
    if kind == "apply_if_finite":
        return optax.apply_if_finite(_ivon(skip_nonfinite=False), max_consecutive_errors=2)
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


@pytest.mark.parametrize(
    "kind,where",
    [("option", "data"), ("option", "grads")]
    + [(k, w) for k in ("wrapper", "chain") for w in ("data", "grads", "hess")],
)
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


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_default_guard_keeps_h_where_only_the_hessian_estimate_is_bad(value):
    """Finite gradients, a NaN/±inf only in ĥ[w][1]: the step goes on; h[w][1] keeps its old
    value, every other element moves exactly as without the guard, and nothing is counted.
    Expected values are worked out here with numpy from the update's formulas."""
    params, state, step = _warm("option")
    x, y = _data()
    key = _keys()[3]
    new_params, new_state, _ = step(params, state, key, x[3], y[3], np.float32(0.0),
                                    np.float32(value))
    assert int(new_state.skipped) == 0
    assert _counts(new_state) == [4] * len(_counts(new_state))
    # The same step without the guard and with a finite ĥ agrees everywhere but at h[w][1]
    # (to rounding: the two programs are compiled apart, and XLA may contract differently).
    _, plain_step = _opt_and_step("plain")
    plain_params, plain_state, _ = plain_step(params, state.inner_state, key, x[3], y[3],
                                              np.float32(0.0), np.float32(0.0))
    old = ivon_jax.find_ivon_states(state)[0]
    new = ivon_jax.find_ivon_states(new_state)[0]
    ref = ivon_jax.find_ivon_states(plain_state)[0]
    h_new, h_ref = np.asarray(new.hess["w"]), np.asarray(ref.hess["w"])
    assert h_new[1] == np.asarray(old.hess["w"])[1]
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6)
    close(h_new[[0, 2]], h_ref[[0, 2]])
    close(np.asarray(new.hess["b"]), np.asarray(ref.hess["b"]))
    jax.tree.map(close, new.momentum, ref.momentum)
    close(np.asarray(new_params["w"])[[0, 2]], np.asarray(plain_params["w"])[[0, 2]])
    # m[w][1] moves by -lr (h₀ + δ) (ḡ + δ m) / (h_old + δ), with the old h.
    wd, b1 = 1e-4, 0.9
    g_bar = np.asarray(new.momentum["w"])[1] / (1 - b1**4)
    m = float(params["w"][1])
    lr = float(optax.cosine_decay_schedule(0.1, 2 * K_BATCHES)(3)) * (0.5 + wd)
    expected = m - lr * (g_bar + wd * m) / (float(old.hess["w"][1]) + wd)
    np.testing.assert_allclose(float(new_params["w"][1]), expected, rtol=1e-5)
    assert all(np.all(np.isfinite(np.asarray(s))) for s in jax.tree.leaves(new_state))
    sigma = ivon_jax.posterior_std(new_state)
    assert all(np.all(np.isfinite(s)) and np.all(s > 0) for s in jax.tree.leaves(sigma))


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
    # Ours, on the very same input: the wrapper skips the step; the default keeps h finite.
    p2, s2, step2 = _warm("wrapper")
    p3, s3, _ = step2(p2, s2, _keys()[3], x[3], y[3], np.float32(0.0), np.float32(np.nan))
    assert int(s3.skipped) == 1
    _assert_trees_equal((p3, s3.inner_state), (p2, s2.inner_state))
    p2, s2, step2 = _warm("option")
    p3, s3, _ = step2(p2, s2, _keys()[3], x[3], y[3], np.float32(0.0), np.float32(np.nan))
    assert np.all(np.isfinite(np.asarray(ivon_jax.find_ivon_states(s3)[0].hess["w"])))


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
                learning_rate=optax.cosine_decay_schedule(0.1, 10), ess=10.0,
                skip_nonfinite=False,
            )
        )
        state = opt.init(PARAMS0)
        bad = {"w": jnp.full(3, jnp.nan), "b": jnp.zeros([], jnp.float32)}
        _, state = opt.update(bad, state, PARAMS0, hess=bad)
    assert int(state.skipped) == 1
    assert int(state.inner_state.count) == 0


def test_injected_skip_option_advances_the_injected_schedule():
    """Documented caveat: inject_hyperparams(ivon)(...) (the default guard) puts the skip
    *inside* inject_hyperparams, whose own count (the schedule's step) still advances on a
    skipped step. Wrap with ivon_jax.skip_nonfinite outermost instead (test above)."""
    with jax.numpy_dtype_promotion("standard"):
        opt = optax.inject_hyperparams(ivon_jax.ivon)(
            learning_rate=optax.cosine_decay_schedule(0.1, 10), ess=10.0
        )
        state = opt.init(PARAMS0)
        bad = {"w": jnp.full(3, jnp.nan), "b": jnp.zeros([], jnp.float32)}
        _, state = opt.update(bad, state, PARAMS0, hess=bad)
    assert int(state.inner_state.skipped) == 1
    assert int(state.inner_state.inner_state[0].count) == 0  # IVON's count is kept
    assert int(state.count) == 1  # but the injected schedule moved on


def test_default_guard_skips_a_step_with_one_bad_micro_batch():
    """accumulated_value_and_grad over 4 micro-batches, one of them with a NaN example: the
    accumulated gradient is NaN, so the whole step is skipped; the same step with the bad
    micro-batch made finite is applied."""
    opt = _make("option")
    vg = ivon_jax.accumulated_value_and_grad(lambda p, mb: _loss(p, mb[0], mb[1]))
    x, y = _data()
    xm, ym = x[:4], y[:4]  # 4 micro-batches of 16
    params, state, _ = _warm("option")

    @jax.jit
    def step(params, state, xm):
        with jax.numpy_dtype_promotion("standard"):
            _, grads, hess = vg(_keys()[5], params, state, (xm, ym), None)
            updates, state = opt.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state

    bad = xm.at[2, 5, 0].set(jnp.nan)  # one example of micro-batch 2
    p_bad, s_bad = step(params, state, bad)
    _assert_trees_equal((p_bad, s_bad.inner_state), (params, state.inner_state))
    assert int(s_bad.skipped) == 1
    p_good, s_good = step(params, state, xm)
    assert int(s_good.skipped) == 0
    assert float(jnp.max(jnp.abs(p_good["w"] - params["w"]))) > 0


def test_default_guard_skips_on_every_device_together():
    """Data parallel on 8 devices with shard_map and value_and_grad(axis_name=...): a NaN
    example on one device makes the device-averaged gradient NaN everywhere, so every device
    skips the step and all replicas stay equal to the state before it."""
    devices = jax.devices()
    n = len(devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    P = jax.sharding.PartitionSpec
    opt = _make("option")
    vg = ivon_jax.value_and_grad(_loss, axis_name="data")
    x, y = _data()
    xb = jnp.tile(x[0], (n // 2, 1)) if n > 1 else x[0]  # 8 examples per device
    yb = jnp.tile(y[0], (n // 2,)) if n > 1 else y[0]
    params, state, _ = _warm("option")

    def local(params, state, xb, yb):
        with jax.numpy_dtype_promotion("standard"):
            _, grads, hess = vg(_keys()[6], params, state, xb, yb)
            updates, state = opt.update(grads, state, params, hess=hess)
        new = optax.apply_updates(params, updates)
        # One copy per device, so that the test sees every device's own result.
        return jax.tree.map(lambda a: a[None], (new, state))

    step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=P("data"), check_vma=False))
    per_device = xb.shape[0] // n
    bad = xb.at[3 * per_device + 1, 2].set(jnp.nan)  # one example on device 3
    new_params, new_state = step(params, state, bad, yb)
    for d in range(n):
        mine = jax.tree.map(lambda a, d=d: a[d], (new_params, new_state))
        _assert_trees_equal(mine[0], params)
        _assert_trees_equal(mine[1].inner_state, state.inner_state)
        assert int(mine[1].skipped) == 1
    good_params, good_state = step(params, state, xb, yb)
    assert np.all(np.asarray(good_state.skipped) == 0)
    w = np.asarray(good_params["w"])
    assert np.all(w == w[0]) and float(np.max(np.abs(w[0] - np.asarray(params["w"])))) > 0


def _compiled_step_text(opt, loss, params, x, donate=False):
    """The compiled text of one jitted IVON train step of ``loss(params, x)`` with ``opt``
    (parameters and state donated if ``donate``)."""
    vg = ivon_jax.value_and_grad(loss)

    def step(params, state, key, x):
        _, grads, hess = vg(key, params, state, x)
        updates, state = opt.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    lowered = jitted.lower(params, opt.init(params), jax.random.key(0), x)
    return lowered.compile().as_text()


def test_default_guard_adds_no_pass_over_the_parameters_in_the_compiled_step():
    """The guard's no-op is a select inside the update's kernels: the compiled train step
    has exactly as many operations producing a parameter-shaped array as without the guard
    (no extra pass, no copy); what it adds are the per-leaf sums, which produce scalars or
    small partial sums."""
    shape = (37, 29)  # a shape nothing else in the step has
    params = {"w": jnp.full(shape, 0.1, jnp.float32), "v": jnp.full((29, 3), 0.1, jnp.float32)}
    x = jnp.ones((8, 37), jnp.float32)

    def loss(p, x):
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w"]) @ p["v"]))

    def compiled(opt):
        text = _compiled_step_text(opt, loss, params, x, donate=True)
        entry = text[text.index("ENTRY"):]
        ops = [line.split("=", 1)[1] for line in entry.splitlines() if " = f32[37,29]" in line]
        return [op.split("(")[0].split()[-1] for op in ops]

    plain = compiled(ivon_jax.ivon(0.1, ess=100.0, skip_nonfinite=False))
    guarded = compiled(ivon_jax.ivon(0.1, ess=100.0))
    assert "copy" not in guarded
    assert sorted(guarded) == sorted(plain), (plain, guarded)
    # And the wrapper, for contrast, does add passes.
    wrapped = compiled(ivon_jax.skip_nonfinite(ivon_jax.ivon(0.1, ess=100.0,
                                                             skip_nonfinite=False)))
    assert len(wrapped) > len(plain)


def test_default_guard_decides_once_and_does_not_grow_each_kernel():
    """With many leaves, the verdict on all gradients is computed once: the compiled step's
    text (every kernel's body) stays about as long as without the guard. When XLA was left
    to fuse the test of all leaves into each update kernel, the text of a 200-leaf step grew
    14-fold (27,689 → 393,145 lines) and compiling took 7x longer."""
    leaves = 60
    params = {f"w{i:03d}": jnp.full((4, 4), 0.1, jnp.float32) for i in range(leaves)}
    x = jnp.ones((2, 4), jnp.float32)

    def loss(p, x):
        h = x
        for k in sorted(p):
            h = jnp.tanh(h @ p[k])
        return jnp.mean(jnp.square(h))

    def hlo_lines(opt):
        return len(_compiled_step_text(opt, loss, params, x).splitlines())

    plain = hlo_lines(ivon_jax.ivon(0.1, ess=100.0, skip_nonfinite=False))
    guarded = hlo_lines(ivon_jax.ivon(0.1, ess=100.0))
    assert guarded < 1.3 * plain, (plain, guarded)
