"""`value_and_grad`: Monte-Carlo value, gradient and Hessian estimate under the posterior.

Checked against the explicit path (sample_params → jax.grad → estimate_hessian) averaged by
hand over the same noises, across modes, with aux, with the squared-gradient estimator, on 4
simulated devices with `axis_name`, and against closed-form expectations for a quadratic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax

S = 3


def _loss(p, x, y):
    pred = jnp.tanh(x @ p["w"]) + p["b"]
    return jnp.mean((pred - y) ** 2)


def _loss_aux(p, x, y):
    pred = jnp.tanh(x @ p["w"]) + p["b"]
    return jnp.mean((pred - y) ** 2), {"pred_mean": jnp.mean(pred), "w0": p["w"][0]}


def _setup():
    """Params, data and a state whose h is not uniform (one update with a varied ĥ)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}
    x = jax.random.normal(k1, (8, 3))
    y = jax.random.normal(k2, (8,))
    opt = ivon_jax.ivon(0.05, ess=50.0, b2=0.5, weight_decay=1e-3)
    state = opt.init(params)
    _, state = opt.update(
        jax.tree.map(jnp.zeros_like, params),
        state,
        params,
        hess={"w": jnp.array([4.0, 0.5, 2.0]), "b": jnp.array(9.0)},
    )
    return params, x, y, state


def _explicit(key, params, state, fun, args, num_samples, method="price", has_aux=False):
    """The explicit path for each of the same S noises, averaged by hand in float64."""
    keys = jax.random.split(key, num_samples)
    values, grads, hesses = [], [], []
    for s in range(num_samples):
        sampled, noise = ivon_jax.sample_params(keys[s], params, state)
        value, g = jax.value_and_grad(fun, has_aux=has_aux)(sampled, *args)
        h = ivon_jax.estimate_hessian(g, noise, state, method=method)
        values.append(value)
        grads.append(g)
        hesses.append(h)
    mean = lambda trees: jax.tree.map(
        lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0), *trees
    )
    return mean(values), mean(grads), mean(hesses), grads


def _close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


@pytest.mark.parametrize("mode", ["vmap", "scan"])
def test_matches_explicit_path(mode):
    params, x, y, state = _setup()
    key = jax.random.key(1)
    value, grads, hess = jax.jit(ivon_jax.value_and_grad(_loss, num_samples=S, mode=mode))(
        key, params, state, x, y
    )
    want_v, want_g, want_h, per_sample = _explicit(key, params, state, _loss, (x, y), S)
    _close(value, want_v)
    _close(grads, want_g)
    _close(hess, want_h, atol=1e-4)
    # The S samples really differ (the average is not of one repeated draw).
    assert not np.allclose(np.asarray(per_sample[0]["w"]), np.asarray(per_sample[1]["w"]))
    assert grads["w"].dtype == params["w"].dtype and hess["w"].dtype == jnp.float32


def test_vmap_and_scan_agree():
    params, x, y, state = _setup()
    key = jax.random.key(2)
    outs = [
        jax.jit(ivon_jax.value_and_grad(_loss_aux, num_samples=5, has_aux=True, mode=m))(
            key, params, state, x, y
        )
        for m in ("vmap", "scan")
    ]
    _close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_has_aux_is_averaged():
    params, x, y, state = _setup()
    key = jax.random.key(3)
    (loss, aux), grads, hess = ivon_jax.value_and_grad(_loss_aux, num_samples=S, has_aux=True)(
        key, params, state, x, y
    )
    (want_loss, want_aux), want_g, want_h, _ = _explicit(
        key, params, state, _loss_aux, (x, y), S, has_aux=True
    )
    _close(loss, want_loss)
    _close(aux, want_aux)
    _close(grads, want_g)
    _close(hess, want_h, atol=1e-4)
    # aux["w0"] is the mean sampled w[0]: it must differ from the mean m by the noise.
    assert float(aux["w0"]) != pytest.approx(0.3, abs=1e-6)
    # Without aux the loss and gradients are the same.
    loss2, grads2, _ = ivon_jax.value_and_grad(_loss, num_samples=S)(key, params, state, x, y)
    _close(loss2, loss, rtol=1e-6)
    _close(grads2, grads, rtol=1e-6)


@pytest.mark.parametrize("mode", ["vmap", "scan"])
def test_gradsq_is_ess_times_mean_squared_gradient(mode):
    params, x, y, state = _setup()
    key = jax.random.key(4)
    _, grads, hess = ivon_jax.value_and_grad(_loss, num_samples=S, method="gradsq", mode=mode)(
        key, params, state, x, y
    )
    _, want_g, _, per_sample = _explicit(key, params, state, _loss, (x, y), S)
    ess = 50.0
    want_h = jax.tree.map(
        lambda *gs: ess * np.mean([np.asarray(g, np.float64) ** 2 for g in gs], axis=0),
        *per_sample,
    )
    _close(grads, want_g)
    _close(hess, want_h)
    # mean of squares, not square of the mean
    sq_of_mean = ess * np.asarray(want_g["w"]) ** 2
    assert not np.allclose(np.asarray(hess["w"]), sq_of_mean, rtol=1e-3)


def test_same_key_same_result_different_key_different():
    params, x, y, state = _setup()
    vg = jax.jit(ivon_jax.value_and_grad(_loss, num_samples=2))
    a = vg(jax.random.key(5), params, state, x, y)
    b = vg(jax.random.key(5), params, state, x, y)
    c = vg(jax.random.key(6), params, state, x, y)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.allclose(np.asarray(a[1]["w"]), np.asarray(c[1]["w"]))
    assert not np.allclose(np.asarray(a[2]["w"]), np.asarray(c[2]["w"]))


def test_num_samples_one_is_the_explicit_step():
    # S = 1 uses split(key, 1)[0], exactly like the explicit path with that key.
    params, x, y, state = _setup()
    key = jax.random.key(7)
    value, grads, hess = ivon_jax.value_and_grad(_loss)(key, params, state, x, y)
    sampled, noise = ivon_jax.sample_params(jax.random.split(key, 1)[0], params, state)
    v, g = jax.value_and_grad(_loss)(sampled, x, y)
    h = ivon_jax.estimate_hessian(g, noise, state)
    _close((value, grads, hess), (v, g, h), rtol=1e-6, atol=1e-6)


def test_price_estimator_is_unbiased_for_a_quadratic():
    # f(θ) = ½ Σ a θ² + c·θ: E[∇f] = a m + c and E[ĥ] = a exactly. Per sample
    # Var[ĥ] = (a m + c)²/σ² + 2a² and Var[∇f] = a² σ²; tolerance 5 standard errors.
    a = jnp.array([1.0, 4.0, 0.5, 10.0])
    c = jnp.array([0.2, -1.0, 0.0, 0.3])
    fun = lambda p: 0.5 * jnp.sum(a * p["t"] ** 2) + jnp.sum(c * p["t"])
    params = {"t": jnp.array([0.5, -0.3, 1.0, 0.0])}
    ess, wd = 10.0, 0.0
    state = ivon_jax.ivon(0.1, ess=ess, weight_decay=wd).init(params)
    n = 4000
    _, grads, hess = jax.jit(ivon_jax.value_and_grad(fun, num_samples=n))(
        jax.random.key(8), params, state
    )
    a64, c64, m = (np.asarray(v, np.float64) for v in (a, c, params["t"]))
    sigma = 1.0 / np.sqrt(ess * (1.0 + wd))
    se_h = np.sqrt(((a64 * m + c64) ** 2 / sigma**2 + 2 * a64**2) / n)
    se_g = np.sqrt(a64**2 * sigma**2 / n)
    assert np.all(np.abs(np.asarray(hess["t"]) - a64) < 5 * se_h), (hess["t"], se_h)
    assert np.all(np.abs(np.asarray(grads["t"]) - (a64 * m + c64)) < 5 * se_g)


def test_axis_name_pmap_devices_draw_different_noise():
    n_dev = 4
    devices = jax.devices()[:n_dev]
    assert len(devices) == n_dev
    params, x, y, state = _setup()
    xs, ys = x.reshape(n_dev, 2, 3), y.reshape(n_dev, 2)  # one shard per device
    key = jax.random.key(9)
    vg = ivon_jax.value_and_grad(_loss_aux, num_samples=2, has_aux=True, axis_name="d")
    (loss, aux), grads, hess = jax.pmap(
        vg, axis_name="d", in_axes=(None, None, None, 0, 0), devices=devices
    )(key, params, state, xs, ys)

    per_dev = [
        _explicit(
            jax.random.fold_in(key, i), params, state, _loss_aux, (xs[i], ys[i]), 2, has_aux=True
        )
        for i in range(n_dev)
    ]
    want_loss = np.mean([pd[0][0] for pd in per_dev])
    want_g = jax.tree.map(lambda *t: np.mean(t, axis=0), *[pd[1] for pd in per_dev])
    want_h = jax.tree.map(lambda *t: np.mean(t, axis=0), *[pd[2] for pd in per_dev])
    for i in range(n_dev):  # every device holds the same averaged result
        _close(loss[i], want_loss)
        _close(jax.tree.map(lambda t, i=i: t[i], grads), want_g)
        _close(jax.tree.map(lambda t, i=i: t[i], hess), want_h, atol=1e-4)
        # aux is per device (not averaged over the axis) and comes from that device's noise
        _close(jax.tree.map(lambda t, i=i: t[i], aux), per_dev[i][0][1])
    # Different noise on each device: the sampled w[0] differs pairwise.
    w0 = np.asarray(aux["w0"])
    assert len(set(np.round(w0, 7).tolist())) == n_dev, w0
    # ... and a forgotten fold-in (the same key on every device) would give another answer.
    same_noise = [
        _explicit(key, params, state, _loss_aux, (xs[i], ys[i]), 2, has_aux=True)
        for i in range(n_dev)
    ]
    wrong_h = np.mean([np.asarray(sn[2]["w"]) for sn in same_noise], axis=0)
    assert not np.allclose(np.asarray(hess["w"][0]), wrong_h, rtol=1e-3)


def test_update_with_value_and_grad_output_trains():
    # The returned (grads, hess) plug straight into update; the mean-field fit moves.
    params, x, y, state = _setup()
    opt = ivon_jax.ivon(0.05, ess=50.0, b2=0.5, weight_decay=1e-3)
    vg = jax.jit(ivon_jax.value_and_grad(_loss, num_samples=2))
    losses = []
    for i in range(30):
        loss, grads, hess = vg(jax.random.key(100 + i), params, state, x, y)
        updates, state = opt.update(grads, state, params, hess=hess)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_sequential_samples_add_only_the_two_running_sums():
    """mode="scan" keeps one sample's temporaries plus the running sums of ĝ and ĥ: S = 8
    needs at most two parameter-sized buffers more than S = 1 (XLA hoisting σ, λ(h + δ) or
    the noise counters out of the loop would add one each)."""
    params = {"w": jnp.zeros((512, 512), jnp.float32), "b": jnp.zeros((512,), jnp.float32)}
    state = ivon_jax.ivon(0.1, ess=100.0).init(params)
    x = jnp.ones((16, 512), jnp.float32)
    loss = lambda p, xb: jnp.mean(jnp.tanh(xb @ p["w"] + p["b"][None, :]) ** 2)
    param_bytes = 4 * (512 * 512 + 512)

    def temp_bytes(num_samples):
        vg = ivon_jax.value_and_grad(loss, num_samples=num_samples, mode="scan")
        compiled = jax.jit(vg).lower(jax.random.key(0), params, state, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one, eight = temp_bytes(1), temp_bytes(8)
    assert eight <= one + 2 * param_bytes + 64 * 1024, (one, eight, param_bytes)
