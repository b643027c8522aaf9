"""ivon_jax.merging: Hessian-weighted merging, task arithmetic, Hessians from states and data.

Expected values come from independent computations: numpy linear solves of the summed
quadratics, hand-written per-example gradients, explicitly constructed IVON states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax
from ivon_jax import merging


def _tree(rng, scale=1.0, positive=False):
    """A nested pytree (dict with a list and a tuple) of float32 leaves."""
    def leaf(shape):
        x = rng.normal(size=shape) * scale
        return jnp.asarray(np.abs(x) + 0.1 if positive else x, jnp.float32)
    return {"dense": [leaf((3, 4)), leaf((4,))], "out": (leaf((4, 2)), leaf(()))}


def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _assert_tree_close(a, b, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_np(a), _np(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------ the merge formula


def test_single_model_unit_weight_zero_base_precision_returns_it():
    rng = np.random.default_rng(0)
    base, theta1, h1 = _tree(rng), _tree(rng), _tree(rng, positive=True)
    merged = merging.merge(base, [theta1], [h1], weights=[1.0], base_precision=0.0)
    # θ₀ + (h/h)(θ₁ − θ₀): exact up to the rounding of one subtraction and one addition.
    _assert_tree_close(merged, theta1, rtol=1e-6, atol=1e-6)
    # And a base precision pulls it back towards θ₀ by h/(h₀' + h).
    shrunk = merging.merge(base, [theta1], [h1], base_precision=2.0)
    for m, b, t, h in zip(_np(shrunk), _np(base), _np(theta1), _np(h1), strict=True):
        np.testing.assert_allclose(m, b + h / (2.0 + h) * (t - b), rtol=1e-5, atol=1e-6)


def test_equal_hessians_reduce_to_task_arithmetic_with_matching_weights():
    rng = np.random.default_rng(1)
    base = _tree(rng)
    tasks = [_tree(rng) for _ in range(3)]
    h = _tree(rng, positive=True)  # the same (non-constant) Hessian for every task
    alphas = np.array([0.5, 2.0, 1.0])
    merged = merging.merge(base, tasks, [h, h, h], weights=alphas)
    arith = merging.task_arithmetic(base, tasks, weights=alphas / alphas.sum())
    _assert_tree_close(merged, arith, rtol=1e-5, atol=1e-6)
    # Task arithmetic itself, by hand: θ₀ + Σ α_t/Σα (θ_t − θ₀).
    for i, b in enumerate(_np(base)):
        expected = b + sum(
            a / alphas.sum() * (_np(t)[i] - b) for a, t in zip(alphas, tasks, strict=True)
        )
        np.testing.assert_allclose(_np(arith)[i], expected, rtol=1e-5, atol=1e-6)


def test_task_arithmetic_default_is_the_average_and_weights_scale_task_vectors():
    rng = np.random.default_rng(2)
    base, tasks = _tree(rng), [_tree(rng) for _ in range(4)]
    avg = merging.task_arithmetic(base, tasks)
    for i in range(len(_np(base))):
        np.testing.assert_allclose(
            _np(avg)[i], np.mean([_np(t)[i] for t in tasks], axis=0), rtol=1e-5, atol=1e-6
        )
    scaled = merging.task_arithmetic(base, tasks[:1], weights=[0.3])
    for b, t, s in zip(_np(base), _np(tasks[0]), _np(scaled), strict=True):
        np.testing.assert_allclose(s, b + 0.3 * (t - b), rtol=1e-5, atol=1e-6)


def test_recovers_the_exact_minimiser_of_summed_quadratics():
    """Task t: L_t(θ) = ½ Σ_j A_tj (θ_j − c_tj)², minimised by the fine-tuned θ_t = c_t, with
    Hessian diag(A_t) from jax.hessian; base quadratic ½ Σ_j B_j (θ_j − θ0_j)². The minimiser
    of B-quadratic + Σ_t α_t L_t solves a linear system, solved here with numpy."""
    rng = np.random.default_rng(3)
    dim, alphas = 6, np.array([1.0, 0.7])
    theta0 = rng.normal(size=dim)
    b_prec = rng.uniform(0.1, 1.0, size=dim)
    a_diag = [rng.uniform(0.05, 5.0, size=dim) for _ in alphas]
    centres = [theta0 + rng.normal(size=dim) for _ in alphas]

    def task_loss(theta, a, c):
        return 0.5 * jnp.sum(a * jnp.square(theta - c))

    hess = [
        jnp.diag(jax.hessian(task_loss)(jnp.asarray(c, jnp.float32), jnp.asarray(a, jnp.float32),
                                        jnp.asarray(c, jnp.float32)))
        for a, c in zip(a_diag, centres, strict=True)
    ]
    lhs = np.diag(b_prec) + sum(al * np.diag(a) for al, a in zip(alphas, a_diag, strict=True))
    rhs = b_prec * theta0 + sum(al * a * c for al, a, c in zip(alphas, a_diag, centres,
                                                                strict=True))
    expected = np.linalg.solve(lhs, rhs)

    merged = merging.merge(
        {"theta": jnp.asarray(theta0, jnp.float32)},
        [{"theta": jnp.asarray(c, jnp.float32)} for c in centres],
        [{"theta": h} for h in hess],
        weights=alphas,
        base_precision={"theta": jnp.asarray(b_prec, jnp.float32)},
    )
    np.testing.assert_allclose(np.asarray(merged["theta"]), expected, rtol=1e-5, atol=1e-5)
    # It is really the minimiser: the gradient of the summed objective vanishes there, while
    # plain averaging is far from it.
    avg = merging.task_arithmetic({"theta": jnp.asarray(theta0)},
                                  [{"theta": jnp.asarray(c)} for c in centres])
    assert np.max(np.abs(np.asarray(avg["theta"]) - expected)) > 0.1


def test_zero_total_precision_keeps_the_base_value():
    base = {"w": jnp.array([1.0, 2.0])}
    tasks = [{"w": jnp.array([5.0, 7.0])}, {"w": jnp.array([-3.0, 0.0])}]
    hess = [{"w": jnp.array([0.0, 1.0])}, {"w": jnp.array([0.0, 3.0])}]
    merged = merging.merge(base, tasks, hess)
    np.testing.assert_allclose(np.asarray(merged["w"]), [1.0, 2.0 + (5.0 + 3 * -2.0) / 4.0])


def test_merge_under_jit_with_traced_weights_and_keeps_dtypes():
    rng = np.random.default_rng(4)
    base = {"a": jnp.asarray(rng.normal(size=5), jnp.bfloat16),
            "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    tasks = [jax.tree.map(lambda x, i=i: x + jnp.asarray(i + 1, x.dtype), base) for i in range(2)]
    hess = [jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), base) for _ in range(2)]
    f = jax.jit(lambda w: merging.merge(base, tasks, hess, weights=w))
    merged = f(jnp.array([1.0, 3.0]))
    assert merged["a"].dtype == jnp.bfloat16 and merged["b"].dtype == jnp.float32
    # Equal Hessians: weights 1/4, 3/4 → base + 1/4·1 + 3/4·2 = base + 1.75.
    np.testing.assert_allclose(np.asarray(merged["b"]), np.asarray(base["b"]) + 1.75, rtol=1e-6)


# ------------------------------------------------------------------------ Hessians from states


def _state_with_hess(params, hess, ess, wd):
    """An `ivon` chain state whose IVON part holds `hess` (placed deliberately second in a
    chain, so that a finder that takes `state[0]` would fail)."""
    opt = optax.chain(
        optax.identity(), ivon_jax.ivon(0.1, ess=ess, weight_decay=wd, skip_nonfinite=False)
    )
    state = opt.init(params)
    ivon_state = state[1][0]
    return (state[0], (ivon_state._replace(hess=hess), *state[1][1:]))


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        ("precision", lambda h, lam, wd: lam * (h + wd)),
        ("data", lambda h, lam, wd: lam * h),
        ("per_example", lambda h, lam, wd: h),
    ],
)
def test_hessian_from_state_units(units, expected):
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    hess = {"w": jnp.array([[0.5, 1.0, 2.0], [0.0, 3.0, -0.001]]), "b": jnp.array([1.0, 2, 3])}
    state = _state_with_hess(params, hess, ess=50.0, wd=0.01)
    for got in (merging.hessian_from_state(state, units=units),
                merging.hessian_from_state(state, params, units=units)):
        for k in params:
            np.testing.assert_allclose(
                np.asarray(got[k]), expected(np.asarray(hess[k]), 50.0, 0.01), rtol=1e-6
            )
    # The precision is exactly what posterior_std's σ encodes.
    sigma = ivon_jax.posterior_std(state, params)
    prec = merging.hessian_from_state(state, params)
    np.testing.assert_allclose(np.asarray(prec["w"]), 1 / np.square(np.asarray(sigma["w"])),
                               rtol=1e-5)


def test_hessian_from_state_masked_leaf_is_zero():
    params = {"w": jnp.zeros(3), "frozen": jnp.ones(2)}
    opt = optax.masked(ivon_jax.ivon(0.1, ess=10.0, hess_init=0.5, weight_decay=0.0),
                       {"w": True, "frozen": False})
    state = opt.init(params)
    got = merging.hessian_from_state(state, params)
    np.testing.assert_allclose(np.asarray(got["w"]), [5.0, 5.0, 5.0])
    np.testing.assert_allclose(np.asarray(got["frozen"]), [0.0, 0.0])


def test_merge_with_hessians_read_from_ivon_states():
    """Two 'fine-tuned runs' with different ess (task sizes): in precision units the merge is
    the minimiser of the summed quadratics whatever λ; in per-example units it is not."""
    params = {"w": jnp.zeros(2)}
    h1, h2 = jnp.array([1.0, 0.2]), jnp.array([0.2, 1.0])
    s1 = _state_with_hess(params, {"w": h1}, ess=100.0, wd=0.0)
    s2 = _state_with_hess(params, {"w": h2}, ess=300.0, wd=0.0)
    tasks = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([-1.0, -1.0])}]
    hess = [merging.hessian_from_state(s) for s in (s1, s2)]
    merged = merging.merge(params, tasks, hess)
    p1, p2 = 100.0 * np.asarray(h1), 300.0 * np.asarray(h2)
    np.testing.assert_allclose(np.asarray(merged["w"]), (p1 - p2) / (p1 + p2), rtol=1e-6)


# ------------------------------------------------------------------------ squared gradients


def test_squared_gradient_pass_equals_hand_computation():
    """Model f = w·x + b with loss ½(f − y)²: ∂ℓ_i/∂w = r_i x_i, ∂ℓ_i/∂b = r_i."""
    rng = np.random.default_rng(5)
    n, d = 7, 3
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    w, b = rng.normal(size=d), 0.3
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}

    def loss_fn(p, xb, yb):  # mean over the batch, as in training
        return jnp.mean(0.5 * jnp.square(xb @ p["w"] + p["b"] - yb))

    r = x @ w + b - y
    expected_w = np.mean(np.square(r[:, None] * x), axis=0)
    expected_b = np.mean(np.square(r))
    data = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    for batch_size in (None, 1, 3, 7, 100):  # 3 does not divide 7: a remainder chunk
        got = merging.squared_gradient_hessian(loss_fn, params, data, batch_size=batch_size)
        np.testing.assert_allclose(np.asarray(got["w"]), expected_w, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got["b"]), expected_b, rtol=1e-5)
    prec = merging.squared_gradient_hessian(loss_fn, params, data, 3, ess=7.0, weight_decay=0.1)
    np.testing.assert_allclose(np.asarray(prec["w"]), 7.0 * (expected_w + 0.1), rtol=1e-5)


def test_squared_gradient_pass_matches_a_loop_on_a_small_mlp():
    rng = np.random.default_rng(6)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=9), jnp.int32)

    def loss_fn(p, xb, yb):
        logits = jnp.tanh(xb @ p["w1"]) @ p["w2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grad_one = jax.jit(jax.grad(loss_fn))  # one example at a time, compiled once
    loop = [grad_one(params, x[i:i + 1], y[i:i + 1]) for i in range(9)]
    expected = {k: np.mean([np.square(np.asarray(g[k])) for g in loop], axis=0) for k in params}
    got = jax.jit(lambda p, xs, ys: merging.squared_gradient_hessian(
        loss_fn, p, (xs, ys), batch_size=4))(params, x, y)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ errors


def _simple():
    base = {"w": jnp.zeros(2), "b": jnp.zeros(1)}
    return base, [base, base], [base, base]


def test_error_no_models():
    base, _, _ = _simple()
    with pytest.raises(ValueError, match=r"at least one model"):
        merging.merge(base, [], [])
    with pytest.raises(ValueError, match=r"at least one model"):
        merging.task_arithmetic(base, [])


def test_error_mismatched_trees():
    base, tasks, hess = _simple()
    with pytest.raises(ValueError, match=r"finetuned\[1\].*same tree structure.*\['b'\]"):
        merging.merge(base, [base, {"w": jnp.zeros(2)}], hess)
    with pytest.raises(ValueError, match=r"hessians\[0\]\['w'\]` has shape \(3,\)"):
        merging.merge(base, tasks, [{"w": jnp.zeros(3), "b": jnp.zeros(1)}, base])
    with pytest.raises(ValueError, match=r"2 fine-tuned models but 1 Hessians"):
        merging.merge(base, tasks, hess[:1])
    with pytest.raises(ValueError, match=r"base_precision.*same tree structure"):
        merging.merge(base, tasks, hess, base_precision={"w": jnp.zeros(2)})


def test_error_bad_weights():
    base, tasks, hess = _simple()
    with pytest.raises(ValueError, match=r"nonnegative.*-0\.5"):
        merging.merge(base, tasks, hess, weights=[1.0, -0.5])
    with pytest.raises(ValueError, match=r"nonnegative"):
        merging.task_arithmetic(base, tasks, weights=[float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"one entry per task, shape \(2,\), got shape \(3,\)"):
        merging.task_arithmetic(base, tasks, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"`base_precision` must be finite and >= 0"):
        merging.merge(base, tasks, hess, base_precision=-1.0)


def test_error_not_a_sequence_or_not_float():
    base, _, hess = _simple()
    with pytest.raises(TypeError, match=r"sequence \(list or tuple\)"):
        merging.merge(base, base, hess)
    with pytest.raises(TypeError, match=r"only floating-point"):
        ints = {"w": jnp.zeros(2, jnp.int32)}
        merging.task_arithmetic(ints, [ints])


def test_error_hessian_helpers():
    params = {"w": jnp.zeros(2)}
    state = ivon_jax.ivon(0.1, ess=10.0).init(params)
    with pytest.raises(ValueError, match=r"`units` must be one of"):
        merging.hessian_from_state(state, units="fisher")
    with pytest.raises(ValueError, match=r"no IVON state found"):
        merging.hessian_from_state(optax.adam(0.1).init(params))
    loss_fn = lambda p, x: jnp.mean(x * p["w"][0])
    with pytest.raises(TypeError, match=r"`data` must be a tuple"):
        merging.squared_gradient_hessian(loss_fn, params, jnp.ones(3))
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1"):
        merging.squared_gradient_hessian(loss_fn, params, (jnp.ones(3),), batch_size=0)
    with pytest.raises(ValueError, match=r"same leading \(example\) axis"):
        merging.squared_gradient_hessian(loss_fn, params, (jnp.ones(3), jnp.ones(4)))
    with pytest.raises(ValueError, match=r"`ess` must be > 0"):
        merging.squared_gradient_hessian(loss_fn, params, (jnp.ones(3),), ess=0.0)
