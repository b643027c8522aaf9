"""Monte-Carlo value and gradient at posterior samples, with the matching Hessian estimate.

One estimate (ĝ, ĥ) averages over samples s, micro-batches j and devices d with weights
w_j = B_j / Σ B (ALGORITHM.md, "Many devices, accumulation steps and samples"); every (d, j, s)
draws its own noise from ``split(fold_in(fold_in(key, d), j), S)[s]``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import estimators
from ivon_jax._src import noise
from ivon_jax._src import posterior
from ivon_jax._src.state import stats_dtype

MODES = ("vmap", "scan")


def _accum_dtype(x: Any) -> jnp.dtype:
    # Sums in float32 or wider; integer leaves (aux) are summed as they are.
    dt = jnp.result_type(x)
    return stats_dtype(dt) if jnp.issubdtype(dt, jnp.floating) else dt


def _check_options(num_samples: int, mode: str, method: str, generator: str) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"ivon_jax: `num_samples` must be an int >= 1, got {num_samples!r}")
    if mode not in MODES:
        raise ValueError(f"ivon_jax: `mode` must be one of {MODES}, got {mode!r}")
    estimators.check_method(method)
    noise.check_generator(generator)


def _device_key(key: jax.Array, axis_name: Hashable | None) -> jax.Array:
    if axis_name is None:
        return key
    return jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def _device_mean(
    value: Any, grads: Any, hess: Any, has_aux: bool, axis_name: Hashable | None
) -> tuple[Any, Any, Any]:
    """Averages the loss (not ``aux``), grads and hess over ``axis_name``, if one is given."""
    if axis_name is None:
        return value, grads, hess
    loss = value[0] if has_aux else value
    loss, grads, hess = jax.lax.pmean((loss, grads, hess), axis_name)
    return ((loss, value[1]) if has_aux else loss), grads, hess


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _mean_state(x: jax.Array) -> jax.Array:
    # Rule for non-parameter state returned by S samples stacked on axis 0: floating-point
    # leaves (batch statistics) are averaged, others (RNG counters) taken from sample 0.
    if _is_float(x):
        return jnp.mean(x.astype(_accum_dtype(x)), axis=0).astype(x.dtype)
    return x[0]


def _add_state(a: jax.Array, b: jax.Array) -> jax.Array:
    # The same rule as a running sum inside lax.scan (divided by S afterwards).
    return a + b if _is_float(a) else a


def _sample_mean(
    fun: Callable[..., Any],
    has_aux: bool,
    num_samples: int,
    method: str,
    mode: str,
    generator: noise.Generator,
    stateful: bool = False,
) -> Callable[..., Any]:
    """(key, params, opt_state, state, args, kwargs) -> ((value, grads, hess), new_state):
    the mean over S samples of (value, grads, hess), summed in float32 or wider and returned
    in the dtypes of one sample.

    With ``stateful``, ``fun(params, state, index, *args, **kwargs)`` returns ``(value,
    new_state)`` (``index``: the sample number s, uint32) and ``new_state`` is combined over
    the samples by the rule of :func:`stateful_value_and_grad`; otherwise ``fun(params, *args,
    **kwargs)`` returns ``value`` and ``new_state`` is None."""

    def split_value(p, index, state, args, kwargs):
        if stateful:
            value, new_state = fun(p, state, index, *args, **kwargs)
        else:
            value, new_state = fun(p, *args, **kwargs), None
        loss, aux = value if has_aux else (value, None)
        return loss, (aux, new_state)

    grad_fn = jax.value_and_grad(split_value, has_aux=True)

    def one_sample(key, index, params, opt_state, state, args, kwargs):
        sampled, _ = posterior.sample_params(key, params, opt_state, generator=generator)
        (loss, (aux, new_state)), grads = grad_fn(sampled, index, state, args, kwargs)
        value = (loss, aux) if has_aux else loss
        # sample_params' noise is exactly sampled - params; recomputing it here, after the
        # backward pass, lets XLA fuse it into the estimator instead of keeping a second
        # parameter-sized buffer alive through the backward pass.
        perturbation = jax.tree.map(jnp.subtract, sampled, params)
        hess = estimators.estimate_hessian(grads, perturbation, opt_state, method)
        return (value, grads, hess), new_state

    def run(key, params, opt_state, state, args, kwargs):
        keys = jax.random.split(key, num_samples)
        indices = jnp.arange(num_samples, dtype=jnp.uint32)
        if num_samples == 1:
            return one_sample(keys[0], indices[0], params, opt_state, state, args, kwargs)
        if mode == "vmap":
            outs, new_state = jax.vmap(one_sample, in_axes=(0, 0, None, None, None, None, None))(
                keys, indices, params, opt_state, state, args, kwargs
            )
            outs = jax.tree.map(
                lambda x: jnp.mean(x.astype(_accum_dtype(x)), axis=0).astype(x.dtype), outs
            )
            return outs, jax.tree.map(_mean_state, new_state)

        def term(inp):
            k, i = inp
            (k, i), p_, s_ = _tied_to_loop((k, i), params, opt_state)
            out, new_state = one_sample(k, i, p_, s_, state, args, kwargs)
            cast = lambda x: x.astype(_accum_dtype(x)) if _is_float(x) else x
            return jax.tree.map(lambda x: x.astype(_accum_dtype(x)), out), jax.tree.map(
                cast, new_state
            )

        def add(a, b):
            return jax.tree.map(jnp.add, a[0], b[0]), jax.tree.map(_add_state, a[1], b[1])

        total, state_total = _scan_sum(term, (keys, indices), add)
        like, state_like = jax.eval_shape(
            one_sample, keys[0], indices[0], params, opt_state, state, args, kwargs
        )
        mean = lambda t, s: (t / num_samples).astype(s.dtype)
        return jax.tree.map(mean, total, like), jax.tree.map(
            lambda t, s: mean(t, s) if _is_float(s) else t, state_total, state_like
        )

    return run


def _tied_to_loop(index: Any, params: Any, opt_state: Any) -> tuple[Any, Any, Any]:
    """``(index, params, opt_state)`` unchanged, but tied to the loop ``index`` (a key or a
    counter) by an optimization barrier. Inside a ``lax.scan`` body this stops XLA from
    hoisting what depends on the parameters and state alone (σ, λ(h + δ)) out of the loop,
    where each would stay alive as one more parameter-sized buffer for the whole loop."""
    return jax.lax.optimization_barrier((index, params, opt_state))


def _scan_sum(
    term: Callable[[Any], Any], xs: Any, add: Callable[[Any, Any], Any] | None = None
) -> Any:
    """Σ_i term(xs[i]) with ``lax.scan``; memory does not grow with the number of terms.

    ``add(acc, term)`` combines two terms (default: leaf-wise ``+``).

    The carry starts from the first term rather than from zeros, so it has the same
    device-variance type as the terms under ``shard_map``.
    """
    combine = add if add is not None else (lambda a, b: jax.tree.map(jnp.add, a, b))
    n = jax.tree.leaves(xs)[0].shape[0]
    first = term(jax.tree.map(lambda x: x[0], xs))
    if n == 1:
        return first

    def body(acc, i):
        # Index inside the loop: slicing xs[1:] up front would copy the inputs.
        return combine(acc, term(jax.tree.map(lambda x: x[i], xs))), None

    total, _ = jax.lax.scan(body, first, jnp.arange(1, n))
    return total


def value_and_grad(
    fun: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
    generator: noise.Generator = "fast",
) -> Callable[..., tuple[Any, optax.Updates, optax.Updates]]:
    r"""Monte-Carlo ``value_and_grad`` of ``fun`` under IVON's posterior, with ĥ.

    For ``s = 1..S`` it draws :math:`\theta_s = m + \sigma\odot\epsilon_s` (sample ``s`` uses
    ``jax.random.split(key, num_samples)[s]`` with :func:`sample_params`), evaluates
    ``fun(θ_s, *args, **kwargs)`` and its gradient, estimates ĥ_s with
    :func:`estimate_hessian`, and returns the averages over the samples.

    Args:
      fun: the loss, ``fun(params, *args, **kwargs) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux``); it must be the *mean* over the minibatch.
      num_samples: S ≥ 1, the number of weight samples.
      has_aux: whether ``fun`` returns ``(value, aux)``. ``aux`` is averaged over the samples
        (its leaves must be numeric) but not over devices.
      axis_name: inside ``pmap``/``shard_map``, the mapped axis: each device folds its index
        into the key first (so every device draws its own noise) and ``value``, ``grads`` and
        ``hess`` are averaged over the axis (``lax.pmean``; every device must hold a batch
        of the same size — otherwise use :func:`accumulated_value_and_grad`, which weights
        by batch size).
      method: Hessian estimator, ``"price"`` (default) or ``"gradsq"``.
      mode: ``"vmap"`` (default) evaluates the samples in parallel; ``"scan"`` evaluates them
        one after another, so memory does not grow with S.
      generator: the noise generator of :func:`sample_params` (``"fast"`` or
        ``"threefry"``).

    Returns:
      A function ``(key, params, opt_state, *args, **kwargs) -> (value, grads, hess)``;
      ``value`` is ``(loss, aux)`` when ``has_aux``. ``grads`` keep the parameters' dtypes,
      ``hess`` is in the statistics' dtype.

    Example:
      >>> import jax, jax.numpy as jnp, optax, ivon_jax
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> state = opt.init(params)
      >>> loss_fn = lambda p, x: jnp.mean((x @ p["w"] - 1.0) ** 2)
      >>> vg = ivon_jax.value_and_grad(loss_fn, num_samples=4)
      >>> loss, grads, hess = vg(jax.random.key(0), params, state, jnp.ones((5, 3)))
      >>> updates, state = opt.update(grads, state, params, hess=hess)
    """
    _check_options(num_samples, mode, method, generator)
    mean_fn = _sample_mean(fun, has_aux, num_samples, method, mode, generator)

    def wrapped(
        key: jax.Array, params: optax.Params, opt_state: optax.OptState, *args: Any, **kwargs: Any
    ) -> tuple[Any, optax.Updates, optax.Updates]:
        key = _device_key(key, axis_name)
        (value, grads, hess), _ = mean_fn(key, params, opt_state, None, args, kwargs)
        return _device_mean(value, grads, hess, has_aux, axis_name)

    return wrapped


def sample_key(
    key: jax.Array, index: jax.Array, num_samples: int, axis_name: Hashable | None = None
) -> jax.Array:
    """The key a weight sample uses for a stream of its own randomness (dropout).

    With one sample on one device the key is returned as it is, so that a model draws exactly
    what it would draw without IVON; with S > 1, sample s uses ``fold_in(key, s)`` (for a key
    array of any shape, each key folded), so the samples draw independent masks. With
    ``axis_name`` the device index is folded in first, so devices draw their own masks too.
    """
    fold = lambda k, i: jax.random.fold_in(k, i)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim:
        fold = lambda k, i: jax.vmap(jax.random.fold_in, in_axes=(0, None))(
            k.reshape(-1), i
        ).reshape(k.shape)
    if axis_name is not None:
        key = fold(key, jax.lax.axis_index(axis_name))
    return key if num_samples == 1 else fold(key, index)


def stateful_value_and_grad(
    fun: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
    generator: noise.Generator = "fast",
) -> Callable[..., tuple[Any, optax.Updates, optax.Updates, Any]]:
    r""":func:`value_and_grad` for a loss that also updates non-parameter state.

    ``fun(θ_s, state, s, *args, **kwargs) -> (value, new_state)`` is evaluated at the S
    samples of :func:`value_and_grad` (same keys, same averages of value, grads and hess);
    ``s`` is the sample number (uint32), for per-sample randomness with :func:`sample_key`.
    The S new states are combined leaf by leaf:

    * floating-point leaves (batch statistics) are *averaged* over the samples (summed in
      float32 or wider) and, with ``axis_name``, over devices (``lax.pmean``), so every device
      holds the same state;
    * other leaves (integer RNG counters, keys) are taken from sample 0 — they are the same for
      every sample, since the samples run the same program.

    With S = 1 the new state is the sample's own, exactly.

    Returns:
      ``(key, params, opt_state, state, *args, **kwargs) -> (value, grads, hess, new_state)``.
    """
    _check_options(num_samples, mode, method, generator)
    mean_fn = _sample_mean(fun, has_aux, num_samples, method, mode, generator, stateful=True)

    def wrapped(
        key: jax.Array,
        params: optax.Params,
        opt_state: optax.OptState,
        state: Any,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, optax.Updates, optax.Updates, Any]:
        key = _device_key(key, axis_name)
        (value, grads, hess), new_state = mean_fn(key, params, opt_state, state, args, kwargs)
        value, grads, hess = _device_mean(value, grads, hess, has_aux, axis_name)
        if axis_name is not None:
            new_state = jax.tree.map(
                lambda x: jax.lax.pmean(x, axis_name) if _is_float(x) else x, new_state
            )
        return value, grads, hess, new_state

    return wrapped


def accumulated_value_and_grad(
    fun: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
    micro_mode: Literal["scan", "vmap"] = "scan",
    generator: noise.Generator = "fast",
) -> Callable[..., tuple[Any, optax.Updates, optax.Updates]]:
    r"""IVON's estimate accumulated over micro-batches (and devices), weighted by batch size.

    Micro-batch j (of K, stacked along a leading axis) gets its own noise, from
    ``fold_in(key, j)`` (after the device fold-in when ``axis_name`` is set), and S samples
    as in :func:`value_and_grad`. The results are combined as

    .. math:: \hat g = \sum_j w_j \hat g_j, \quad \hat h = \sum_j w_j \hat h_j, \quad
              w_j = B_j / \textstyle\sum_{j'} B_{j'}

    with j running over micro-batches *and* devices. By default the micro-batches are
    visited with ``lax.scan``, so memory does not grow with K. ``optax.MultiSteps`` is no
    substitute: it would pass IVON only the last micro-batch's ``hess``.

    Args:
      fun: ``fun(params, microbatch, *args, **kwargs) -> loss`` (or ``(loss, aux)``), the
        *mean* loss over the valid examples of one micro-batch.
      num_samples, has_aux, method, mode, generator: as in :func:`value_and_grad`.
      axis_name: inside ``pmap``/``shard_map``, the device axis to combine over (weighted by
        each device's total batch size).
      micro_mode: ``"scan"`` (default) visits micro-batches one after another (gradient
        accumulation, memory flat in K); ``"vmap"`` evaluates them in parallel. Under plain
        ``jax.jit`` with the micro-batch axis sharded over a ``data`` mesh axis, ``"vmap"``
        is data parallelism: each device evaluates its own groups with its own noise.

    Returns:
      A function ``(key, params, opt_state, microbatches, batch_sizes, *args, **kwargs) ->
      (value, grads, hess)``. ``microbatches`` is a pytree of arrays with a leading axis K;
      ``batch_sizes`` is None (equal weights) or an array of shape (K,) with B_j (for
      micro-batches padded to a common shape, the number of valid examples; zero-size
      micro-batches get weight 0). ``value`` (and ``aux``) are the weighted means over this
      device's micro-batches; ``value``, ``grads`` and ``hess`` are combined over devices.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> state = opt.init(params)
      >>> loss_fn = lambda p, xb: jnp.mean((xb @ p["w"] - 1.0) ** 2)
      >>> acc = ivon_jax.accumulated_value_and_grad(loss_fn)
      >>> xs = jnp.ones((4, 8, 3))  # 4 micro-batches of 8 examples
      >>> loss, grads, hess = acc(jax.random.key(0), params, state, xs, None)
    """
    _check_options(num_samples, mode, method, generator)
    if micro_mode not in ("scan", "vmap"):
        raise ValueError(f"ivon_jax: `micro_mode` must be 'scan' or 'vmap', got {micro_mode!r}")
    mean_fn = _sample_mean(fun, has_aux, num_samples, method, mode, generator)

    def wrapped(
        key: jax.Array,
        params: optax.Params,
        opt_state: optax.OptState,
        microbatches: Any,
        batch_sizes: jax.Array | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, optax.Updates, optax.Updates]:
        leading = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(microbatches)}
        if len(leading) != 1 or None in leading:
            raise ValueError(
                "ivon_jax: `microbatches` must be a pytree of arrays sharing a leading "
                f"micro-batch axis; got leading sizes {sorted(map(str, leading))}."
            )
        (num_micro,) = leading
        if batch_sizes is None:
            sizes = jnp.ones((num_micro,), jnp.float32)
        else:
            if jnp.shape(batch_sizes) != (num_micro,):
                raise ValueError(
                    f"ivon_jax: `batch_sizes` must have shape ({num_micro},), one size per "
                    f"micro-batch; got {jnp.shape(batch_sizes)}."
                )
            sizes = jnp.asarray(batch_sizes).astype(jnp.float32)
        key = _device_key(key, axis_name)
        dtypes: list[Any] = []  # the dtypes of one micro-batch's result, seen while tracing

        def weighted(j, mb, b, tie=False):
            j, p_, s_ = _tied_to_loop(j, params, opt_state) if tie else (j, params, opt_state)
            out, _ = mean_fn(jax.random.fold_in(key, j), p_, s_, None, (mb, *args), kwargs)
            dtypes[:] = [jax.tree.map(lambda x: x.dtype, out)]
            return jax.tree.map(lambda x: b.astype(_accum_dtype(x)) * x.astype(_accum_dtype(x)),
                                out)

        inputs = (jnp.arange(num_micro, dtype=jnp.uint32), microbatches, sizes)
        if micro_mode == "vmap":
            total = jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(weighted)(*inputs))
        else:
            total = _scan_sum(lambda inp: weighted(*inp, tie=True), inputs)
        local = jnp.sum(sizes)
        value, grads, hess = total
        aux = None
        if has_aux:
            value, aux = value
            aux = jax.tree.map(lambda a: a / local.astype(a.dtype), aux)
        if axis_name is not None:
            value, grads, hess, weight = jax.lax.psum((value, grads, hess, local), axis_name)
        else:
            weight = local
        value, grads, hess = jax.tree.map(
            lambda t: t / weight.astype(t.dtype), (value, grads, hess)
        )
        value = (value, aux) if has_aux else value
        value_dtypes, grads_dtypes, _ = dtypes[0]
        cast = lambda tree, dts: jax.tree.map(lambda x, dt: x.astype(dt), tree, dts)
        return cast(value, value_dtypes), cast(grads, grads_dtypes), hess

    return wrapped
