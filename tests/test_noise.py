"""Statistical tests of the noise generators, able to catch a bad one.

Each check states its tolerance. Keys are fixed, so every number here is deterministic;
the tolerances are set at ~5 standard errors so a correct generator passes with any key,
and a negative control shows the same checks reject a non-Gaussian generator with the right
mean and variance.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import ivon_jax
from ivon_jax._src import noise

N = 1_000_000


def _draw(key, shape=(N,), generator="fast"):
    (z,) = noise.standard_normal_leaves(key, [(shape, jnp.float32, None)], generator)
    return np.asarray(z, np.float64).ravel()


def _gaussian_checks(z):
    """Raises AssertionError if z does not look like i.i.d. N(0, 1) draws."""
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)  # excess kurtosis
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Tails: P(|z| > 3) = 0.0027 and P(|z| > 4) = 6.3e-5, within 5 binomial std errors.
    for t in (3.0, 4.0):
        p = 2 * stats.norm.sf(t)
        frac = np.mean(np.abs(z) > t)
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / n), (t, frac, p)
    # Serial independence: correlations of z and of z² (a dependence in magnitudes, as a weak
    # hash feeding Box–Muller's radius would leave) at short and long lags.
    for lag in (1, 2, 3, 1024):
        r = np.corrcoef(z[:-lag], z[lag:])[0, 1]
        assert abs(r) < 5 / np.sqrt(n), (lag, r)
        r2 = np.corrcoef(z[:-lag] ** 2, z[lag:] ** 2)[0, 1]
        assert abs(r2) < 5 / np.sqrt(n), (lag, r2)


@pytest.mark.parametrize("generator", ["fast", "threefry"])
def test_marginal_is_standard_normal(generator):
    _gaussian_checks(_draw(jax.random.key(0), generator=generator))


def test_multidimensional_leaf_is_standard_normal():
    _gaussian_checks(_draw(jax.random.key(1), shape=(1000, 10, 100)))


def test_negative_control_rejects_a_non_gaussian_with_right_moments():
    u = np.asarray(jax.random.uniform(jax.random.key(0), (N,)), np.float64)
    fake = np.sqrt(3.0) * (2 * u - 1)  # mean 0, variance 1, not Gaussian
    with pytest.raises(AssertionError):
        _gaussian_checks(fake)
    # ... and a Gaussian with serial correlation.
    z = _draw(jax.random.key(2))
    correlated = (z + 0.02 * np.roll(z, 1)) / np.sqrt(1 + 0.02**2)
    with pytest.raises(AssertionError):
        _gaussian_checks(correlated)


def _max_abs_corr(rows):
    c = np.corrcoef(np.stack(rows))
    return np.max(np.abs(c[~np.eye(len(rows), dtype=bool)]))


def test_no_correlation_across_leaves_steps_samples_and_devices():
    n = 200_000
    tol = 5 / np.sqrt(n)
    key = jax.random.key(3)
    params = {f"w{i}": jnp.zeros(n) for i in range(4)}
    state = ivon_jax.ivon(0.1, ess=1.0, hess_init=1.0, weight_decay=0.0).init(params)
    # σ = 1 here, so the noise is ε itself.
    leaves = ivon_jax.sample_params(key, params, state)[1]
    assert _max_abs_corr([np.asarray(v) for v in leaves.values()]) < tol
    steps = [ivon_jax.sample_params(jax.random.fold_in(key, t), params, state)[1]["w0"]
             for t in range(4)]
    assert _max_abs_corr([np.asarray(v) for v in steps]) < tol
    samples = [ivon_jax.sample_params(k, params, state)[1]["w0"]
               for k in jax.random.split(key, 4)]
    assert _max_abs_corr([np.asarray(v) for v in samples]) < tol
    devices = [ivon_jax.sample_params(jax.random.fold_in(jax.random.fold_in(key, 7), d),
                                      params, state)[1]["w0"] for d in range(4)]
    assert _max_abs_corr([np.asarray(v) for v in devices]) < tol
    # Adjacent elements of one leaf, seen as pairs: (z_{2i}, z_{2i+1}) uncorrelated.
    z = np.asarray(leaves["w0"])
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 / np.sqrt(n / 2)


def _raw_draw(words, n=200_000):
    return _draw(jnp.asarray(words, jnp.uint32), (n,))


def test_keys_one_bit_apart_give_independent_noise():
    """Raw keys whose words differ in one bit (e.g. ``PRNGKey(s)`` for consecutive seeds), or
    whose first word is shifted by half the draw length (the counter offsets of a leaf in
    another call), still give uncorrelated z and z², aligned and half a draw apart."""
    n = 200_000
    tol = 5 / np.sqrt(n / 2)
    base = (12345, 0xDEADBEEF)
    others = [(12345, 0xDEADBEEE), (12344, 0xDEADBEEF), (12345 + n // 2, 0xDEADBEEE), (0, 1)]
    pairs = [(base, o) for o in others] + [((0, 0), (0, 1)), ((0, 1), (0, 2))]
    for a, b in pairs:
        za, zb = _raw_draw(a, n), _raw_draw(b, n)
        for x, y in ((za, zb), (za[n // 2 :], zb[: n // 2])):
            assert abs(np.corrcoef(x, y)[0, 1]) < tol, (a, b)
            assert abs(np.corrcoef(x**2, y**2)[0, 1]) < tol, (a, b)


def test_many_small_leaves_share_one_draw_and_stay_independent():
    """Leaves up to SMALL_LEAF elements come from one flat draw, sliced per leaf:
    each looks standard normal, and neighbours in the flat draw are uncorrelated."""
    sizes = [noise.SMALL_LEAF] * 250 + [7, 1, 300]
    specs = [((s,), jnp.float32, None) for s in sizes]
    z = noise.standard_normal_leaves(jax.random.key(6), specs)
    flat = np.concatenate([np.asarray(x, np.float64) for x in z])
    _gaussian_checks(flat)
    first = np.stack([np.asarray(x, np.float64) for x in z[:250]])
    assert _max_abs_corr(list(first[:8])) < 5 / np.sqrt(noise.SMALL_LEAF)


def test_same_key_same_noise_and_generators_differ():
    key = jax.random.key(4)
    np.testing.assert_array_equal(_draw(key, (1000,)), _draw(key, (1000,)))
    a, b = _draw(key, (1000,)), _draw(key, (1000,), generator="threefry")
    assert not np.allclose(a, b)
    assert not np.allclose(_draw(jax.random.key(5), (1000,)), a)


def test_raw_uint32_keys_and_odd_shapes():
    raw = jax.random.PRNGKey(0)
    (z,) = noise.standard_normal_leaves(raw, [((3, 0, 2), jnp.float32, None)])
    assert z.shape == (3, 0, 2)
    (z,) = noise.standard_normal_leaves(raw, [((), jnp.bfloat16, None)])
    assert z.shape == () and z.dtype == jnp.bfloat16
    _gaussian_checks(_draw(raw, (N,)))


def test_unknown_generator_is_refused():
    with pytest.raises(ValueError, match="unknown noise generator"):
        ivon_jax.sample_params(jax.random.key(0), {"w": jnp.zeros(2)},
                               ivon_jax.ivon(0.1, ess=1.0).init({"w": jnp.zeros(2)}),
                               generator="mersenne")


def test_radius_matches_numpy_on_every_input():
    """-2 ln u₁ as the generator computes it, on all 2^21 values u₁ = (2k + 1) / 2^22 can
    take (k in the top 21 bits of the hashed word; the other bits must not matter): relative
    error < 3e-7 against float64 numpy."""
    k = np.arange(2**21, dtype=np.uint32)
    f = jax.jit(noise._radius_squared)
    want = -2 * np.log((2 * k.astype(np.float64) + 1) * 2.0**-22)
    for low_bits in (0, 0x7FF):
        got = np.asarray(f(jnp.asarray((k << 11) | low_bits)), np.float64)
        assert np.max(np.abs(got - want) / want) < 3e-7


def test_angle_covers_2048_equally_spaced_angles():
    """cos θ on all 2^11 values of the word's low 11 bits: the 2048 angles (i + 1/2) π / 1024
    of the circle, each once, to within 2.5e-7 (a few float32 roundings of the angle and
    polynomial); the top bits must not matter."""
    low = np.arange(2**11, dtype=np.uint32)
    f = jax.jit(noise._signed_cos)
    for high in (0, 0xFFFFF800):
        got = np.sort(np.asarray(f(jnp.asarray(low | np.uint32(high))), np.float64))
        want = np.sort(np.cos((np.arange(2048) + 0.5) * np.pi / 1024))
        assert np.max(np.abs(got - want)) < 2.5e-7


def test_scaled_draw_is_the_draw_divided_by_sqrt_precision():
    """With ``precisions`` every leaf is ε / sqrt(precision) for the same ε, to float32
    rounding: large leaves (scaled inside the generator, sqrt(-2 ln u₁ / precision) cos θ)
    and small ones (each scaling its block of the shared draw)."""
    few = [((5000,), jnp.float32, None), ((7,), jnp.float32, None), ((3, 4), jnp.float32, None),
           ((), jnp.float32, None), None, ((64, 70), jnp.float32, None)]
    many = [((i % 5 + 1, 3), jnp.float32, None) for i in range(20)]
    for specs in (few, few + many):
        _check_scaled(specs)


def _check_scaled(specs):
    keys = jax.random.split(jax.random.key(8), len(specs))
    precisions = [None if s is None else jnp.exp(jax.random.normal(k, s[0]))
                  for k, s in zip(keys, specs, strict=True)]
    key = jax.random.key(9)
    eps = noise.standard_normal_leaves(key, specs)
    scaled = noise.standard_normal_leaves(key, specs, precisions=precisions)
    for e, p, z in zip(eps, precisions, scaled, strict=True):
        if e is None:
            assert z is None
            continue
        # A few float32 roundings apart (one square root and division in a different order).
        np.testing.assert_allclose(np.asarray(z), np.asarray(e / np.sqrt(p)), rtol=5e-7)


def _distinct_kernels(compiled_text):
    """How many different fused computations the entry computation calls, up to names."""
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    bodies = {}
    for name, body in re.findall(r"\n(%[\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", compiled_text,
                                 re.S):
        body = re.sub(r", metadata=\{.*?\}", "", body)
        bodies[name] = re.sub(r"%[\w.\-]+", "%", body)
    called = set(re.findall(r"calls=(%[\w.\-]+)", entry))
    return len({bodies[c] for c in called if c in bodies})


def test_same_shape_leaves_share_one_compiled_kernel():
    """Leaves of one shape differ only in their counter offset and leaf constant, which reach
    the draw as data: the compiled step's distinct fused computations do not grow with the
    number of such leaves, so XLA compiles each kernel once (written in as constants, every
    leaf got its own kernels and 200 small leaves compiled four times slower)."""
    def distinct(n, shape):
        params = {f"w{i:03d}": jnp.zeros(shape) for i in range(n)}
        state = ivon_jax.ivon(0.1, ess=100.0).init(params)
        sample = jax.jit(lambda key, p, s: ivon_jax.sample_params(key, p, s))
        return _distinct_kernels(sample.lower(jax.random.key(0), params, state).compile()
                                 .as_text())
    for shape in ((80, 80), (16, 16)):  # above and below SMALL_LEAF
        assert distinct(30, shape) == distinct(6, shape), shape
