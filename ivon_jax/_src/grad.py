"""Monte-Carlo value and gradient at posterior samples, with the matching Hessian estimate."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import estimators
from ivon_jax._src import posterior
from ivon_jax._src.transform import stats_dtype

MODES = ("vmap", "scan")


def _accum_dtype(x: jax.Array) -> jnp.dtype:
    # Sums over samples in float32 or wider; integer leaves (aux) are summed as they are.
    dt = jnp.result_type(x)
    return stats_dtype(dt) if jnp.issubdtype(dt, jnp.floating) else dt


def value_and_grad(
    fun: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
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
        into the key (so every device draws its own noise) and ``value``, ``grads`` and
        ``hess`` are averaged over the axis (``lax.pmean``).
      method: Hessian estimator, ``"price"`` (default) or ``"gradsq"``.
      mode: ``"vmap"`` (default) evaluates the samples in parallel; ``"scan"`` evaluates them
        one after another, so memory does not grow with S.

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
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"ivon_jax: `num_samples` must be an int >= 1, got {num_samples!r}")
    if mode not in MODES:
        raise ValueError(f"ivon_jax: `mode` must be one of {MODES}, got {mode!r}")
    estimators.check_method(method)
    grad_fn = jax.value_and_grad(fun, has_aux=has_aux)

    def one_sample(
        key: jax.Array, params: optax.Params, opt_state: optax.OptState, args: Any, kwargs: Any
    ) -> tuple[Any, optax.Updates, optax.Updates]:
        sampled, noise = posterior.sample_params(key, params, opt_state)
        value, grads = grad_fn(sampled, *args, **kwargs)
        hess = estimators.estimate_hessian(grads, noise, opt_state, method)
        return value, grads, hess

    def wrapped(
        key: jax.Array, params: optax.Params, opt_state: optax.OptState, *args: Any, **kwargs: Any
    ) -> tuple[Any, optax.Updates, optax.Updates]:
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        keys = jax.random.split(key, num_samples)
        if mode == "vmap":
            outs = jax.vmap(one_sample, in_axes=(0, None, None, None, None))(
                keys, params, opt_state, args, kwargs
            )
            mean = jax.tree.map(
                lambda x: jnp.mean(x.astype(_accum_dtype(x)), axis=0).astype(x.dtype), outs
            )
        else:
            shapes = jax.eval_shape(one_sample, keys[0], params, opt_state, args, kwargs)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _accum_dtype(s)), shapes)

            def body(acc: Any, k: jax.Array) -> tuple[Any, None]:
                out = one_sample(k, params, opt_state, args, kwargs)
                return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, out), None

            total, _ = jax.lax.scan(body, zeros, keys)
            mean = jax.tree.map(
                lambda t, s: (t / num_samples).astype(s.dtype), total, shapes
            )
        value, grads, hess = mean
        if axis_name is not None:
            loss = value[0] if has_aux else value
            loss, grads, hess = jax.lax.pmean((loss, grads, hess), axis_name)
            value = (loss, value[1]) if has_aux else loss
        return value, grads, hess

    return wrapped
