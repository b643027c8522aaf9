"""Property tests (hypothesis): the IVON state stays well-formed under random everything.

For random pytrees (dicts and lists of 0-, 1- and 2-d leaves, some of size 0), parameter dtypes
(float32, bfloat16; float64 under ``jax.enable_x64``), hyper-parameters anywhere in their
valid ranges and random sequences of gradients and Hessian estimates:

- the state's tree structure, leaf shapes, dtypes and weak types never change (so it can be
  carried by ``lax.scan`` and checkpointed), nor do the parameters';
- for finite inputs every state leaf stays finite, h + δ > 0 and σ is finite and > 0;
- with the default guard and NaN/±inf mixed into the inputs, the same holds, ``skipped``
  counts exactly the steps with a non-finite gradient and IVON's count the others (a NaN/±inf
  only in ĥ keeps those elements of h); with the wrapper ``ivon_jax.skip_nonfinite``,
  ``skipped`` counts every step with a non-finite input.

Input magnitudes: ĝ, ĥ ∈ {0, 1e-30, 1e-3, 1, 1e3} × N(0, 1) ("raw"), or Price's estimate for
a quadratic with random curvature c ∈ [−1, 1]·scale centred at m (ĝ = c ⊙ (θ − m), so
ĥ ≈ c ε², independent of λ and m); at most 8 steps; h₀ ≥ 1e-4. Why this stays in float32's
range: h + δ at most halves per step (test_properties.py), so h + δ ≥ 1e-4/2⁸ = 4e-7, and
one step's correction ½(1−β₂)²(h−ĥ)²/(h+δ) is then < 1e15; where h dominates it at most
triples h per step, so h < 1e19 and (h − ĥ)² < 3.4e38. Larger finite inputs (1e15, 1e30)
do overflow h without the guard; the default guard keeps the overflowing elements of h, the
wrapper skips such steps (the last property).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import ivon_jax

SCALES = (0.0, 1e-30, 1e-3, 1.0, 1e3)
SETTINGS = dict(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# A small vocabulary of shapes: eager JAX compiles each op once per shape, and the trees'
# structure (which the properties are about) varies freely anyway.
SHAPES = ((), (0,), (3,), (2, 3), (3, 0))


@st.composite
def leaf_specs(draw, dtypes):
    return draw(st.sampled_from(SHAPES)), draw(st.sampled_from(dtypes))


@st.composite
def tree_specs(draw, dtypes):
    """A dict of 1–3 entries, each a leaf or a list of 1–2 leaves."""
    n = draw(st.integers(1, 3))
    spec = {}
    for i in range(n):
        if draw(st.booleans()):
            spec[f"k{i}"] = draw(leaf_specs(dtypes))
        else:
            spec[f"k{i}"] = [draw(leaf_specs(dtypes)) for _ in range(draw(st.integers(1, 2)))]
    return spec


@st.composite
def hyperparams(draw):
    log_uniform = lambda lo, hi: 10.0 ** draw(st.floats(lo, hi))
    return dict(
        learning_rate=draw(st.floats(0.0, 1.0)),
        ess=log_uniform(-4, 10),
        hess_init=log_uniform(-4, 4),
        b1=draw(st.floats(0.0, 0.999)),
        b2=draw(st.floats(0.0, 0.99999)),
        weight_decay=draw(st.one_of(st.just(0.0), st.floats(1e-8, 1.0))),
        clip_radius=draw(st.one_of(st.none(), st.floats(1e-4, 10.0))),
        rescale_lr=draw(st.booleans()),
        debias=draw(st.booleans()),
    )


@st.composite
def step_plans(draw, nonfinite):
    """Per step: 'price' (ĝ = c ⊙ (θ − m) at a posterior sample θ, c ~ U[−1, 1]·g_scale, ĥ by
    Price's estimator) or 'raw' (independent random ĝ and ĥ of the given scales); optionally
    a non-finite value planted in the gradients or the estimate."""
    n = draw(st.integers(1, 8))
    plans = []
    for _ in range(n):
        kind = draw(st.sampled_from(["price", "raw"]))
        g_scale, h_scale = draw(st.sampled_from(SCALES)), draw(st.sampled_from(SCALES))
        bad = draw(st.sampled_from([None, "grads", "hess"])) if nonfinite else None
        bad_value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        plans.append((kind, g_scale, h_scale, bad, bad_value))
    return plans


def _build(spec):
    rng = np.random.default_rng(0)

    def make(leaf):
        shape, dtype = leaf
        return jnp.asarray(rng.normal(size=shape), dtype)

    return jax.tree.map(make, spec, is_leaf=lambda x: isinstance(x, tuple))


def _stats_dtype(p):
    return jnp.float64 if p.dtype == jnp.float64 else jnp.float32


def _quadratic_grad(rng, scale, noise):
    """ĝ = c ⊙ (θ − m) for a random curvature c ∈ [−1, 1]·scale, in the noise's dtype."""
    dt = _stats_dtype(noise)
    c = jnp.asarray(scale * rng.uniform(-1, 1, size=noise.shape), dt)
    return (c * noise.astype(dt)).astype(noise.dtype)


def _random_like(rng, scale, dtype, p):
    dt = _stats_dtype(p) if dtype == "stats" else p.dtype
    return jnp.asarray(scale * rng.normal(size=p.shape), dt)


def _avals(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)


def _plant(tree, value):
    """Puts ``value`` into the first element of the first non-empty leaf (if any)."""
    leaves, treedef = jax.tree.flatten(tree)
    for i, x in enumerate(leaves):
        if x.size:
            leaves[i] = x.reshape(-1).at[0].set(jnp.asarray(value, x.dtype)).reshape(x.shape)
            return jax.tree.unflatten(treedef, leaves), True
    return tree, False


def _run(spec, hp, plans, skip, sigma_positive=True, overflow_skips=False):
    """``skip``: False (no guard), True (the default guard) or "wrapper"."""
    params = _build(spec)
    if skip == "wrapper":
        opt = ivon_jax.skip_nonfinite(ivon_jax.ivon(**hp, skip_nonfinite=False))
    else:
        opt = ivon_jax.ivon(**hp, skip_nonfinite=skip)
    state = opt.init(params)
    state_avals, param_avals = _avals(state), _avals(params)
    rng = np.random.default_rng(1)
    wd = hp["weight_decay"]
    n_bad = 0  # steps the guard skips
    for t, (kind, g_scale, h_scale, bad, bad_value) in enumerate(plans):
        _, noise = ivon_jax.sample_params(jax.random.key(t), params, state)
        if kind == "price":
            grads = jax.tree.map(functools.partial(_quadratic_grad, rng, g_scale), noise)
            hess = ivon_jax.estimate_hessian(grads, noise, state)
        else:
            grads = jax.tree.map(functools.partial(_random_like, rng, g_scale, None), params)
            hess = jax.tree.map(functools.partial(_random_like, rng, h_scale, "stats"), params)
        planted = False
        if bad == "grads":
            grads, planted = _plant(grads, bad_value)
        elif bad == "hess":
            hess, planted = _plant(hess, bad_value)
        n_bad += planted and (bad == "grads" or skip == "wrapper")
        updates, state = opt.update(grads, state, params, hess=hess)
        params = optax.apply_updates(params, updates)

        assert _avals(state) == state_avals
        assert _avals(params) == param_avals
        ivon_state = ivon_jax.find_ivon_states(state)[0]
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert bool(jnp.all(jnp.isfinite(leaf))), (t, state)
        for h in jax.tree.leaves(ivon_state.hess):
            assert bool(jnp.all(h + jnp.asarray(wd, h.dtype) > 0)), (t, h)
        for s in jax.tree.leaves(ivon_jax.posterior_std(state)):
            assert bool(jnp.all(jnp.isfinite(s))), (t, s)
            assert bool(jnp.all(s > 0 if sigma_positive else s >= 0)), (t, s)
        for p in jax.tree.leaves(params):
            assert bool(jnp.all(jnp.isfinite(p.astype(jnp.float32)))), (t, p)
    count = int(ivon_jax.find_ivon_states(state)[0].count)
    if overflow_skips:
        if skip == "wrapper":  # steps whose result would overflow are skipped too
            assert int(state.skipped) + count == len(plans)
        else:  # the default guard keeps the overflowing elements of h and goes on
            assert int(state.skipped) == 0 and count == len(plans)
        return
    if skip:
        assert int(state.skipped) == n_bad
    assert count == len(plans) - n_bad


F32_BF16 = (jnp.float32, jnp.bfloat16)


@settings(max_examples=20, **SETTINGS)
@given(tree_specs(F32_BF16), hyperparams(), step_plans(nonfinite=False), st.booleans())
def test_finite_inputs_keep_the_state_well_formed(spec, hp, plans, skip):
    _run(spec, hp, plans, skip)


@settings(max_examples=15, **SETTINGS)
@given(tree_specs(F32_BF16), hyperparams(), step_plans(nonfinite=True),
       st.sampled_from([True, "wrapper"]))
def test_nonfinite_inputs_are_skipped_and_counted(spec, hp, plans, skip):
    _run(spec, hp, plans, skip=skip)


@settings(max_examples=5, **SETTINGS)
@given(
    tree_specs((jnp.float64, jnp.float32, jnp.bfloat16)), hyperparams(),
    step_plans(nonfinite=True),
)
def test_float64_under_x64(spec, hp, plans):
    with jax.enable_x64(True):
        _run(spec, hp, plans, skip=True)
        # float64 parameters keep float64 statistics.
        params = _build(spec)
        state = ivon_jax.ivon(**hp).init(params)
        hess = ivon_jax.find_ivon_states(state)[0].hess
        for p, h in zip(jax.tree.leaves(params), jax.tree.leaves(hess), strict=True):
            assert h.dtype == (jnp.float64 if p.dtype == jnp.float64 else jnp.float32)


@settings(max_examples=20, phases=[Phase.generate], **SETTINGS)
@given(
    tree_specs(F32_BF16),
    hyperparams().map(lambda hp: dict(hp, ess=min(hp["ess"], 1e4))),
    st.lists(
        st.tuples(
            st.sampled_from(["price", "raw"]), st.sampled_from((1.0, 1e15, 1e30)),
            st.sampled_from((1.0, 1e15, 1e30)), st.just(None), st.just(np.nan),
        ),
        min_size=1, max_size=8,
    ),
)
def test_with_skip_any_finite_input_keeps_the_state_finite(spec, hp, plans):
    # σ may legitimately round to 0 here: λ(h + δ) can exceed float32's range for h ~ 1e38.
    for skip in (True, "wrapper"):
        _run(spec, hp, plans, skip=skip, sigma_positive=False, overflow_skips=True)
