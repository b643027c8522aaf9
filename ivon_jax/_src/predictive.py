r"""Monte-Carlo predictive distributions under IVON's posterior, for any model function.

Everything here is model-agnostic: a model is a function of the parameters (and inputs),
``apply_fn(params, *inputs)``. Weight samples come from :func:`ivon_jax.sample_params`, sample
``s`` of ``S`` using ``jax.random.split(key, S)[s]`` (as :func:`ivon_jax.value_and_grad`), and
are evaluated vectorised (``vmap``) in chunks of ``chunk_size`` samples, the chunks one after
another (``lax.scan``), so memory grows with ``chunk_size``, not with ``S``. Means and
variances are combined across chunks exactly (Chan et al.'s pairwise update), so the result does
not depend on ``chunk_size`` beyond floating-point rounding.

The Flax adapters (:mod:`ivon_jax.flax.nnx`, :mod:`ivon_jax.flax.linen`) are thin wrappers
around these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import posterior
from ivon_jax._src.state import stats_dtype

Member = tuple[optax.Params, optax.OptState]


# ---------------------------------------------------------------------------- argument checks


def check_num_samples(num_samples: Any) -> int:
    """``num_samples`` as an int ≥ 1, or a ``ValueError`` that says what is wrong."""
    if isinstance(num_samples, jax.core.Tracer):
        raise ValueError(
            "ivon_jax: `num_samples` must be a Python int, not a traced value; under `jax.jit` "
            "mark it static (`static_argnames`) or close over it."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"ivon_jax: `num_samples` must be an int >= 1, got {num_samples!r}")
    return num_samples


def check_chunk_size(chunk_size: Any, num_samples: int) -> int:
    """``chunk_size`` (``None`` = all samples at once) as an int in ``[1, num_samples]``."""
    if chunk_size is None:
        return num_samples
    if isinstance(chunk_size, jax.core.Tracer):
        raise ValueError(
            "ivon_jax: `chunk_size` must be a Python int or None, not a traced value; under "
            "`jax.jit` mark it static (`static_argnames`) or close over it."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ivon_jax: `chunk_size` must be None or an int >= 1, got {chunk_size!r}")
    return min(chunk_size, num_samples)


def check_members(members: Any, pair: str = "(params, opt_state)") -> list[tuple[Any, Any]]:
    """The components of a Multi-IVON mixture as a non-empty list of ``pair``s."""
    if isinstance(members, tuple) and len(members) == 2 and not isinstance(members[0], tuple):
        # A single (params, opt_state) pair passed where a list of pairs was expected.
        raise ValueError(
            f"ivon_jax: `members` must be a list of {pair} pairs, one per IVON run; for "
            f"one run pass `[{pair}]`."
        )
    try:
        members = list(members)
    except TypeError:
        raise ValueError(
            f"ivon_jax: `members` must be a list of {pair} pairs, got {type(members).__name__}."
        ) from None
    if not members:
        raise ValueError(
            "ivon_jax: Multi-IVON needs at least one member (K >= 1), got an empty list."
        )
    for i, m in enumerate(members):
        if not isinstance(m, (tuple, list)) or len(m) != 2:
            raise ValueError(
                f"ivon_jax: `members[{i}]` must be a {pair} pair, got {type(m).__name__}."
            )
    return [(m[0], m[1]) for m in members]


# ------------------------------------------------------------------- chunked sample moments


def _acc_dtype(x: Any) -> jnp.dtype:
    # Moments in float32 or wider; non-float outputs are averaged as float32.
    dt = jnp.result_type(x)
    return stats_dtype(dt) if jnp.issubdtype(dt, jnp.floating) else jnp.dtype(jnp.float32)


def _moments_of(outs: Any, want_var: bool) -> tuple[Any, Any]:
    """Mean and M2 = Σ (x - mean)² over axis 0 of each leaf (M2 is ``None`` if not wanted)."""
    mean = jax.tree.map(lambda o: jnp.mean(o.astype(_acc_dtype(o)), axis=0), outs)
    if not want_var:
        return mean, None
    m2 = jax.tree.map(
        lambda o, m: jnp.sum(jnp.square(o.astype(m.dtype) - jnp.expand_dims(m, 0)), axis=0),
        outs,
        mean,
    )
    return mean, m2


def _combine(
    n_a: jax.Array | float, a: tuple[Any, Any], n_b: jax.Array | float, b: tuple[Any, Any]
) -> tuple[Any, Any]:
    """Chan et al.'s exact pairwise combination of two groups' (mean, M2)."""
    mean_a, m2_a = a
    mean_b, m2_b = b

    def mean_fn(ma: jax.Array, mb: jax.Array) -> jax.Array:
        na, nb = jnp.asarray(n_a, ma.dtype), jnp.asarray(n_b, ma.dtype)
        return ma + (mb - ma) * (nb / (na + nb))

    mean = jax.tree.map(mean_fn, mean_a, mean_b)
    if m2_a is None:
        return mean, None

    def m2_fn(ma: jax.Array, mb: jax.Array, sa: jax.Array, sb: jax.Array) -> jax.Array:
        na, nb = jnp.asarray(n_a, ma.dtype), jnp.asarray(n_b, ma.dtype)
        return sa + sb + jnp.square(mb - ma) * (na * nb / (na + nb))

    return mean, jax.tree.map(m2_fn, mean_a, mean_b, m2_a, m2_b)


def _sample_moments(
    key: jax.Array,
    fn: Callable[[optax.Params], Any],
    params: optax.Params,
    opt_state: optax.OptState,
    num_samples: int,
    chunk_size: int | None,
    want_var: bool,
) -> tuple[Any, Any]:
    """Mean and (if ``want_var``) M2 of ``fn(θ_s)`` over ``S`` posterior samples, chunked."""
    num_samples = check_num_samples(num_samples)
    chunk = check_chunk_size(chunk_size, num_samples)
    keys = jax.random.split(key, num_samples)

    def draw(k: jax.Array) -> optax.Params:
        return posterior.sample_params(k, params, opt_state)[0]

    def chunk_moments(ks: jax.Array) -> tuple[Any, Any]:
        # The chunk's weights are drawn one after another and only the model is vmapped: as
        # fast or faster than vmapping the sampler too (measured on CPU, both generators; a
        # batched threefry also compiles several times slower), at the same memory, since the
        # chunk's weights are stacked either way.
        sampled = jax.lax.map(draw, ks)
        return _moments_of(jax.vmap(fn)(sampled), want_var)

    num_full, rem = divmod(num_samples, chunk)
    if num_full == 1:
        stats = chunk_moments(keys[:chunk])
    else:
        # Full chunks one after another; the running (mean, M2) is the scan carry.
        full_keys = keys[: num_full * chunk].reshape((num_full, chunk, *keys.shape[1:]))
        shapes = jax.eval_shape(chunk_moments, full_keys[0])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(carry: tuple[Any, Any], xs: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            i, ks = xs
            n_done = (i * chunk).astype(jnp.float32)
            return _combine(n_done, carry, float(chunk), chunk_moments(ks)), None

        stats, _ = jax.lax.scan(body, zeros, (jnp.arange(num_full, dtype=jnp.int32), full_keys))
    if rem:
        # The remainder (when chunk_size does not divide S) as one smaller vmap.
        tail = chunk_moments(keys[num_full * chunk :])
        stats = _combine(float(num_full * chunk), stats, float(rem), tail)
    return stats


def expectation(
    key: jax.Array,
    fn: Callable[[optax.Params], Any],
    params: optax.Params,
    opt_state: optax.OptState,
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> Any:
    r"""Monte-Carlo expectation of ``fn`` under the IVON posterior.

    .. math::
        \mathbb E_{q}[f(\theta)] \approx \frac1S \sum_{s=1}^S f(\theta_s), \qquad
        \theta_s = m + \sigma \odot \epsilon_s,

    with :math:`\theta_s` from :func:`ivon_jax.sample_params` and key
    ``jax.random.split(key, S)[s]``.

    Args:
      key: a JAX PRNG key.
      fn: a function of the parameters returning a pytree of arrays (e.g. a closure over the
        inputs that returns probabilities).
      params: the posterior mean m.
      opt_state: an optimizer state holding the IVON state(s).
      num_samples: S ≥ 1 (a Python int).
      chunk_size: how many samples to evaluate at once with ``vmap`` (``None``: all S);
        peak memory grows with it, not with S. It need not divide S.

    Returns:
      The average of ``fn``'s outputs, leaf by leaf, in float32 or wider.

    Raises:
      ValueError: if ``num_samples < 1`` or ``chunk_size < 1``.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax._src.predictive import expectation
      >>> params = {"w": jnp.zeros(3)}
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> ew2 = expectation(jax.random.key(0), lambda p: p["w"] ** 2, params, state,
      ...                   num_samples=8, chunk_size=4)  # ≈ σ² = 1 / (100 (1 + 1e-4))
    """
    mean, _ = _sample_moments(key, fn, params, opt_state, num_samples, chunk_size, False)
    return mean


def mean_and_variance(
    key: jax.Array,
    fn: Callable[[optax.Params], Any],
    params: optax.Params,
    opt_state: optax.OptState,
    *,
    num_samples: int,
    chunk_size: int | None = None,
) -> tuple[Any, Any]:
    r"""Monte-Carlo mean and variance of ``fn`` under the IVON posterior, elementwise.

    .. math::
        \bar f = \frac1S \sum_s f(\theta_s), \qquad
        \mathrm{Var} = \frac1S \sum_s \big(f(\theta_s) - \bar f\big)^2,

    the moments of the S-sample empirical distribution (divisor S, not S - 1: with S = 1 the
    variance is 0). Computed exactly across chunks, without the cancellation of
    :math:`\overline{f^2} - \bar f^2`.

    Args:
      key: a JAX PRNG key.
      fn: a function of the parameters returning a pytree of arrays.
      params: the posterior mean m.
      opt_state: an optimizer state holding the IVON state(s).
      num_samples: S ≥ 1.
      chunk_size: samples per ``vmap`` chunk (``None``: all S).

    Returns:
      ``(mean, variance)``, both like ``fn``'s output, in float32 or wider.

    Raises:
      ValueError: if ``num_samples < 1`` or ``chunk_size < 1``.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import predictive
      >>> params = {"w": jnp.ones(3)}
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> mean, var = predictive.mean_and_variance(jax.random.key(0), lambda p: p["w"] * 2.0,
      ...                                          params, opt_state, num_samples=16)
      >>> mean.shape, bool(jnp.all(var > 0))
      ((3,), True)
    """
    mean, m2 = _sample_moments(key, fn, params, opt_state, num_samples, chunk_size, True)
    var = jax.tree.map(lambda s: s / jnp.asarray(num_samples, s.dtype), m2)
    return mean, var


# ------------------------------------------------------------------------------- predictive


def _softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits.astype(_acc_dtype(logits)), axis=-1)


def _check_array_output(name: str, out: Any) -> None:
    if not isinstance(out, jax.Array):
        raise ValueError(
            f"ivon_jax: {name} expects `apply_fn` to return one array, got {type(out).__name__}."
        )


def predict_proba(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    params: optax.Params,
    opt_state: optax.OptState,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""The Bayesian model average for classification ("IVON" in the paper's tables).

    .. math::
        p(y \mid x) \approx \frac1S \sum_{s=1}^S \mathrm{softmax}\big(f(x; \theta_s)\big),
        \qquad \theta_s \sim q = N(m, \sigma^2),

    with the softmax over the last axis of ``apply_fn``'s logits. The paper uses S = 64 at
    test time; more samples help NLL most. (The prediction at the mean, ``IVON@mean``, is
    ``softmax(apply_fn(params, *inputs))``.)

    Args:
      key: a JAX PRNG key; sample s uses ``jax.random.split(key, num_samples)[s]``.
      apply_fn: ``apply_fn(params, *inputs) -> logits`` (classes on the last axis).
      params: the posterior mean m (the parameters IVON updates).
      opt_state: the optimizer state holding the IVON state(s); it defines σ.
      *inputs: passed to ``apply_fn`` after the parameters.
      num_samples: S ≥ 1 weight samples (keyword only; a Python int).
      chunk_size: samples per vectorised chunk (``None``: all S at once).

    Returns:
      Probabilities shaped like the logits, in float32 or wider; each row sums to one.

    Raises:
      ValueError: on ``num_samples < 1``, ``chunk_size < 1``, or an optimizer state without
        an IVON state.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax._src.predictive import predict_proba
      >>> params = {"w": jnp.zeros((4, 3))}
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> probs = predict_proba(jax.random.key(0), apply_fn, params, state, jnp.ones((2, 4)),
      ...                       num_samples=16, chunk_size=8)
      >>> probs.shape
      (2, 3)

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """

    def probs(p: optax.Params) -> jax.Array:
        out = apply_fn(p, *inputs)
        _check_array_output("predict_proba", out)
        return _softmax(out)

    return expectation(
        key, probs, params, opt_state, num_samples=num_samples, chunk_size=chunk_size
    )


def _add_noise_var(var: jax.Array, noise_var: float | jax.Array | None) -> jax.Array:
    if noise_var is None:
        return var
    nv = jnp.asarray(noise_var)
    try:
        nv = jnp.broadcast_to(nv.astype(var.dtype), var.shape)
    except ValueError:
        raise ValueError(
            f"ivon_jax: `noise_var` of shape {nv.shape} does not broadcast to the predictive "
            f"variance's shape {var.shape}."
        ) from None
    return var + nv


def predict_regression(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    params: optax.Params,
    opt_state: optax.OptState,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Predictive mean and variance for regression under the IVON posterior.

    With :math:`\mu_s = f(x; \theta_s)` the network's prediction at sample s and
    :math:`\sigma^2_{\mathrm{obs}}` an optional observation-noise variance,

    .. math::
        \bar\mu = \frac1S \sum_s \mu_s, \qquad
        \mathrm{Var}[y \mid x] \approx \frac1S \sum_s (\mu_s - \bar\mu)^2
            + \sigma^2_{\mathrm{obs}},

    the moments of the mixture :math:`\frac1S \sum_s N(\mu_s, \sigma^2_{\mathrm{obs}})`. The
    first term is the epistemic part (it grows away from the data: "in-between" uncertainty).

    Args:
      key: a JAX PRNG key; sample s uses ``jax.random.split(key, num_samples)[s]``.
      apply_fn: ``apply_fn(params, *inputs) -> predictions``.
      params: the posterior mean m.
      opt_state: the optimizer state holding the IVON state(s).
      *inputs: passed to ``apply_fn`` after the parameters.
      num_samples: S ≥ 1 weight samples.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance added to the result: a scalar, or an array that
        broadcasts to the predictions' shape; ``None`` adds nothing.

    Returns:
      ``(mean, variance)``, each shaped like the predictions, in float32 or wider.

    Raises:
      ValueError: on ``num_samples < 1``, ``chunk_size < 1``, or a ``noise_var`` whose shape
        does not broadcast.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax._src.predictive import predict_regression
      >>> params = {"w": jnp.zeros(3)}
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> mean, var = predict_regression(jax.random.key(0), lambda p, x: x @ p["w"], params,
      ...                                state, jnp.ones((5, 3)), num_samples=32,
      ...                                noise_var=0.01)
    """

    def pred(p: optax.Params) -> jax.Array:
        out = apply_fn(p, *inputs)
        _check_array_output("predict_regression", out)
        return out

    mean, var = mean_and_variance(
        key, pred, params, opt_state, num_samples=num_samples, chunk_size=chunk_size
    )
    return mean, _add_noise_var(var, noise_var)


def over_members(
    key: jax.Array,
    members: Any,
    num_samples: Any,
    member_fn: Callable[[jax.Array, Any, Any], Any],
    pair: str = "(params, opt_state)",
) -> list[Any]:
    """``[member_fn(key_k, a_k, b_k) for each Multi-IVON member k]`` after checking
    ``members`` (a non-empty list of ``pair``s) and ``num_samples``; member k uses
    ``jax.random.split(key, K)[k]``."""
    members = check_members(members, pair)
    check_num_samples(num_samples)
    keys = jax.random.split(key, len(members))
    return [member_fn(keys[k], a, b) for k, (a, b) in enumerate(members)]


def mixture_of_probs(probs: Sequence[jax.Array]) -> jax.Array:
    r"""The uniform mixture of K predictive distributions: :math:`\frac1K \sum_k p_k`.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import predictive
      >>> predictive.mixture_of_probs([jnp.array([[0.9, 0.1]]), jnp.array([[0.5, 0.5]])])
      Array([[0.7, 0.3]], dtype=float32)
    """
    return _average(probs)


def _average(xs: Sequence[jax.Array]) -> jax.Array:
    if not xs:
        raise ValueError("ivon_jax: a mixture needs at least one member (K >= 1).")
    total = sum(xs[1:], xs[0])
    return total / jnp.asarray(len(xs), total.dtype)


def mixture_of_moments(
    moments: Sequence[tuple[jax.Array, jax.Array]],
) -> tuple[jax.Array, jax.Array]:
    r"""Mean and variance of a uniform mixture from its K members' means and variances.

    .. math::
        \bar\mu = \frac1K \sum_k \bar\mu_k, \qquad
        v = \frac1K \sum_k v_k + \frac1K \sum_k (\bar\mu_k - \bar\mu)^2

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import predictive
      >>> mean, var = predictive.mixture_of_moments([(jnp.array([0.0]), jnp.array([1.0])),
      ...                                            (jnp.array([2.0]), jnp.array([1.0]))])
      >>> mean, var
      (Array([1.], dtype=float32), Array([2.], dtype=float32))
    """
    if not moments:
        raise ValueError("ivon_jax: a mixture needs at least one member (K >= 1).")
    mean = _average([m for m, _ in moments])
    return mean, _average([v + jnp.square(m - mean) for m, v in moments])


def mixture_predict_proba(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    members: Sequence[Member],
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Multi-IVON: the predictive of a uniform mixture of K IVON posteriors.

    K independent IVON runs give K Gaussians :math:`q_k = N(m_k, \sigma_k^2)`; their uniform
    mixture has predictive

    .. math::
        p(y \mid x) = \frac1K \sum_{k=1}^K \frac1S \sum_{s=1}^S
            \mathrm{softmax}\big(f(x; \theta_{ks})\big), \qquad \theta_{ks} \sim q_k,

    the average of each member's :func:`predict_proba`, member k with key
    ``jax.random.split(key, K)[k]``.

    Args:
      key: a JAX PRNG key.
      apply_fn: ``apply_fn(params, *inputs) -> logits``.
      members: K ≥ 1 ``(params, opt_state)`` pairs, one per IVON run (same architecture).
      *inputs: passed to ``apply_fn`` after the parameters.
      num_samples: S ≥ 1 weight samples per member.
      chunk_size: samples per vectorised chunk (``None``: all S at once).

    Returns:
      Probabilities shaped like the logits, in float32 or wider.

    Raises:
      ValueError: if ``members`` is empty (K = 0) or not a list of pairs, or on bad
        ``num_samples``/``chunk_size``.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax._src.predictive import mixture_predict_proba
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> runs = [({"w": w}, opt.init({"w": w})) for w in (jnp.zeros((4, 3)), jnp.ones((4, 3)))]
      >>> probs = mixture_predict_proba(jax.random.key(0), lambda p, x: x @ p["w"], runs,
      ...                               jnp.ones((2, 4)), num_samples=8)

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """
    probs = over_members(
        key, members, num_samples,
        lambda k, params, opt_state: predict_proba(
            k, apply_fn, params, opt_state, *inputs,
            num_samples=num_samples, chunk_size=chunk_size,
        ),
    )
    return mixture_of_probs(probs)


def mixture_predict_regression(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    members: Sequence[Member],
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Multi-IVON for regression: mean and variance of a uniform mixture of K posteriors.

    With member k's :func:`predict_regression` moments :math:`(\bar\mu_k, v_k)` (key
    ``jax.random.split(key, K)[k]``), the mixture's moments are (law of total variance)

    .. math::
        \bar\mu = \frac1K \sum_k \bar\mu_k, \qquad
        v = \frac1K \sum_k v_k + \frac1K \sum_k (\bar\mu_k - \bar\mu)^2.

    Args:
      key: a JAX PRNG key.
      apply_fn: ``apply_fn(params, *inputs) -> predictions``.
      members: K ≥ 1 ``(params, opt_state)`` pairs.
      *inputs: passed to ``apply_fn`` after the parameters.
      num_samples: S ≥ 1 weight samples per member.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance (as in :func:`predict_regression`).

    Returns:
      ``(mean, variance)`` shaped like the predictions.

    Raises:
      ValueError: if ``members`` is empty or malformed, or on bad arguments.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import predictive
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> members = [(p, opt.init(p)) for p in ({"w": jnp.zeros(3)}, {"w": jnp.ones(3)})]
      >>> mean, var = predictive.mixture_predict_regression(
      ...     jax.random.key(0), lambda p, x: x @ p["w"], members, jnp.ones((5, 3)), num_samples=8)
      >>> mean.shape, var.shape
      ((5,), (5,))
    """
    moments = over_members(
        key, members, num_samples,
        lambda k, params, opt_state: predict_regression(
            k, apply_fn, params, opt_state, *inputs,
            num_samples=num_samples, chunk_size=chunk_size, noise_var=noise_var,
        ),
    )
    return mixture_of_moments(moments)
