r"""IVON for Equinox: gradients, weight samples and MC predictions for an ``eqx.Module``.

An Equinox model is a pytree that holds its parameters next to everything else (activation
functions, integer buffers, hyper-parameters). IVON's parameters are the floating-point
arrays, ``eqx.filter(model, eqx.is_inexact_array)``; this module splits the model with
``eqx.partition``, hands the arrays to :func:`ivon_jax.value_and_grad` and the predictive of
:mod:`ivon_jax.predictive`, and recombines with ``eqx.combine``. ``grads`` and ``hess`` come
back filtered like the model, so the Equinox loop needs one change, ``hess=hess``:

Example::

    import equinox as eqx, jax, optax
    import ivon_jax
    from ivon_jax import equinox as ivon_eqx

    model = eqx.nn.MLP(64, 10, 128, 2, key=jax.random.key(0))
    opt = ivon_jax.ivon(1.0, ess=n_train, total_steps=num_steps)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model, x, y):                      # the MEAN loss over the batch
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    vg = ivon_eqx.value_and_grad(loss_fn)

    @eqx.filter_jit
    def train_step(key, model, opt_state, x, y):
        loss, grads, hess = vg(key, model, opt_state, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = opt.update(grads, opt_state, params, hess=hess)
        return eqx.apply_updates(model, updates), opt_state, loss

    probs = ivon_eqx.predict_proba(key, model, opt_state, x_test, num_samples=64)

Randomness inside the model (``eqx.nn.Dropout``) takes a ``key=`` keyword in the call of the
function :func:`value_and_grad` returns; it reaches the loss per weight sample (the same key
with one sample, ``fold_in(key, s)`` for sample s of several). Layers with state
(``eqx.nn.BatchNorm`` with ``eqx.nn.State``) train with ``has_state=True``.

References:
  Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import Literal

import equinox as eqx
import jax
import numpy as np
import optax

from ivon_jax._src import grad
from ivon_jax._src import noise
from ivon_jax._src import posterior
from ivon_jax._src import predictive

__all__ = [
    "predict_proba",
    "predict_regression",
    "sampled_model",
    "value_and_grad",
]

FilterSpec = Any  # a callable leaf -> bool, or a pytree of bools/callables like the model


def value_and_grad(
    fun: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    has_state: bool = False,
    filter_spec: FilterSpec = eqx.is_inexact_array,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
    generator: noise.Generator = "fast",
) -> Callable[..., Any]:
    r""":func:`ivon_jax.value_and_grad` for a loss of an Equinox model.

    The model is split with ``eqx.partition(model, filter_spec)``; the trained part (the
    floating-point arrays by default) is the posterior mean m, the rest is held fixed. The
    loss is evaluated at S copies of the model whose trained arrays are
    :math:`\theta_s = m + \sigma\odot\epsilon_s` (sample s with key
    ``jax.random.split(key, S)[s]``, exactly as :func:`ivon_jax.value_and_grad` on the
    filtered model), and the value, gradients and Hessian estimate are averaged over them.

    Randomness of the model: a ``key=`` keyword in the call (``vg(key, model, opt_state, x,
    key=dropout_key)``) is passed on to ``fun`` as ``key=``, per weight sample: with S = 1
    (and no ``axis_name``) as it is, so a step draws what the plain Equinox loss would; with
    S > 1 sample s gets ``jax.random.fold_in(dropout_key, s)``; with ``axis_name`` the device
    index is folded in first. Use a key of its own, not the key of the weight noise.

    State (``eqx.nn.BatchNorm`` and other users of ``eqx.nn.State``): with ``has_state`` the
    call takes the state after the optimizer state, ``fun(model, state, *args, **kwargs)``
    returns ``(value, new_state)``, and the new state is returned too. Over S samples its
    floating-point leaves (running statistics) are averaged, others (flags, counters) taken
    from sample 0; with ``axis_name`` the float leaves are averaged over devices as well.

    Args:
      fun: the loss, ``fun(model, *args, **kwargs) -> scalar`` (``(scalar, aux)`` with
        ``has_aux``; ``fun(model, state, *args, **kwargs) -> (value, new_state)`` with
        ``has_state``). It must be the *mean* over the minibatch.
      num_samples: S ≥ 1 weight samples per step.
      has_aux: whether the loss value is ``(scalar, aux)``; ``aux`` is averaged over samples.
      axis_name: inside ``pmap``/``shard_map``, the device axis (each device draws its own
        noise; value, grads and hess are averaged over the axis).
      has_state: whether ``fun`` takes and returns an ``eqx.nn.State`` (see above).
      filter_spec: which leaves are trained, as in ``eqx.partition``: a callable (default
        ``eqx.is_inexact_array``) or a pytree of bools like the model, for a frozen part. The
        optimizer must be initialised with ``eqx.filter(model, filter_spec)``.
      method: Hessian estimator, ``"price"`` (default) or ``"gradsq"``.
      mode: ``"vmap"`` (samples in parallel) or ``"scan"`` (one after another, memory flat
        in S).
      generator: the noise generator, ``"fast"`` (default) or ``"threefry"``.

    Returns:
      A function ``(key, model, opt_state, *args, **kwargs) -> (value, grads, hess)``
      (``(key, model, opt_state, state, *args, **kwargs) -> (value, grads, hess,
      new_state)`` with ``has_state``). ``grads`` and ``hess`` are shaped like
      ``eqx.filter(model, filter_spec)``, ready for ``opt.update(grads, opt_state,
      eqx.filter(model, filter_spec), hess=hess)`` and ``eqx.apply_updates``.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import equinox as ivon_eqx
      >>> model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
      >>> params = eqx.filter(model, eqx.is_inexact_array)
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> opt_state = opt.init(params)
      >>> vg = ivon_eqx.value_and_grad(lambda m, x: jnp.mean(jax.vmap(m)(x) ** 2))
      >>> loss, grads, hess = vg(jax.random.key(1), model, opt_state, jnp.ones((4, 3)))
      >>> updates, opt_state = opt.update(grads, opt_state, params, hess=hess)
      >>> model = eqx.apply_updates(model, updates)
    """

    def core(f: Callable[..., Any]) -> Callable[..., Any]:
        return grad.stateful_value_and_grad(
            f, num_samples, has_aux, axis_name, method=method, mode=mode, generator=generator
        )

    core(fun)  # validates the arguments now, not at the first call
    call = f"vg(key, model, opt_state{', state' if has_state else ''}, *args)"

    def wrapped(
        key: jax.Array, model: Any = None, opt_state: optax.OptState = None, /,
        *args: Any, **kwargs: Any,
    ) -> Any:
        _check_call(key, model, opt_state, call)
        if has_state:
            if not args:
                raise TypeError(
                    f"ivon_jax: with `has_state=True` the call is `{call}`; the state is missing."
                )
            state, *args = args
        else:
            state = None
        params, static = eqx.partition(model, filter_spec)
        model_key = kwargs.pop("key", None)

        def loss(p: Any, st: Any, index: jax.Array, *a: Any, **kw: Any) -> Any:
            m = eqx.combine(p, static)
            if model_key is not None:
                kw = dict(kw, key=grad.sample_key(model_key, index, num_samples, axis_name))
            if has_state:
                return fun(m, st, *a, **kw)
            return fun(m, *a, **kw), None

        value, grads, hess, new_state = core(loss)(key, params, opt_state, state, *args, **kwargs)
        return (value, grads, hess, new_state) if has_state else (value, grads, hess)

    return wrapped


def _check_call(key: Any, model: Any, opt_state: Any, call: str) -> None:
    """A ``TypeError`` that shows the expected call when the arguments are out of order."""
    expected = (
        f"`{call}`: the key of the weight noise (`jax.random.key`), the model, the optimizer "
        "state"
    )
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(
            f"ivon_jax: ivon_jax.equinox.value_and_grad's function is called as {expected}; "
            f"got a {type(key).__name__} as the key."
        )
    if model is None or opt_state is None:
        raise TypeError(
            f"ivon_jax: ivon_jax.equinox.value_and_grad's function is called as {expected}; "
            "the model or the optimizer state is missing."
        )


def sampled_model(
    key: jax.Array, model: Any, opt_state: optax.OptState, *,
    filter_spec: FilterSpec = eqx.is_inexact_array,
) -> Any:
    r"""The model with its trained arrays replaced by one draw :math:`m + \sigma\odot\epsilon`.

    Uses :func:`ivon_jax.sample_params` on ``eqx.filter(model, filter_spec)`` with ``key``
    (so the draw equals sample s of :func:`predict_proba` when ``key = jax.random.split(k,
    S)[s]``); the other leaves are kept.

    Args:
      key: a JAX PRNG key.
      model: the model holding the posterior mean m.
      opt_state: the optimizer state holding the IVON state.
      filter_spec: the trained leaves, as in :func:`value_and_grad`.

    Returns:
      A model of the same type.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import equinox as ivon_eqx
      >>> model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(eqx.filter(model, eqx.is_inexact_array))
      >>> one = ivon_eqx.sampled_model(jax.random.key(1), model, opt_state)
      >>> y = one(jnp.ones(3))
    """
    params, static = eqx.partition(model, filter_spec)
    sampled, _ = posterior.sample_params(key, params, opt_state)
    return eqx.combine(sampled, static)


def _batched(model: Any, *inputs: Any) -> Any:
    # Equinox layers act on one example; the batch is the leading axis of every input.
    return jax.vmap(model)(*inputs)


def _functional(
    model: Any, filter_spec: FilterSpec, call: Callable[..., Any] | None
) -> tuple[Callable[..., Any], Any]:
    params, static = eqx.partition(model, filter_spec)
    call = _batched if call is None else call
    return (lambda p, *inputs: call(eqx.combine(p, static), *inputs)), params


def predict_proba(
    key: jax.Array,
    model: Any,
    opt_state: optax.OptState,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    call: Callable[..., jax.Array] | None = None,
    filter_spec: FilterSpec = eqx.is_inexact_array,
) -> jax.Array:
    r"""Monte-Carlo predictive probabilities of an Equinox classifier under IVON's posterior.

    .. math::
        p(y \mid x) \approx \frac1S \sum_{s=1}^S \mathrm{softmax}\big(f(x; \theta_s)\big),

    with :math:`\theta_s` the trained arrays drawn with key ``jax.random.split(key, S)[s]``
    (:func:`ivon_jax.predictive.predict_proba` on the filtered model). The prediction at the
    mean is ``jax.nn.softmax(jax.vmap(model)(x))``.

    Args:
      key: a JAX PRNG key.
      model: the model holding the posterior mean.
      opt_state: the optimizer state holding the IVON state.
      *inputs: the batch; by default ``jax.vmap(model)(*inputs)`` gives the logits (classes
        on the last axis).
      num_samples: S ≥ 1 weight samples (the paper uses 64 at test time).
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      call: ``call(model, *inputs) -> logits`` instead of ``jax.vmap(model)(*inputs)``, e.g.
        for a model with state: ``lambda m, x: jax.vmap(m, in_axes=(0, None),
        out_axes=(0, None))(x, state)[0]`` on ``eqx.nn.inference_mode(model)``.
      filter_spec: the trained leaves, as in :func:`value_and_grad`.

    Returns:
      Probabilities shaped like the logits, in float32 or wider.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import equinox as ivon_eqx
      >>> model = eqx.nn.Linear(3, 4, key=jax.random.key(0))
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(eqx.filter(model, eqx.is_inexact_array))
      >>> probs = ivon_eqx.predict_proba(jax.random.key(1), model, opt_state,
      ...                                jnp.ones((2, 3)), num_samples=16, chunk_size=8)
      >>> probs.shape
      (2, 4)
    """
    apply_fn, params = _functional(model, filter_spec, call)
    return predictive.predict_proba(
        key, apply_fn, params, opt_state, *inputs, num_samples=num_samples, chunk_size=chunk_size
    )


def predict_regression(
    key: jax.Array,
    model: Any,
    opt_state: optax.OptState,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
    call: Callable[..., jax.Array] | None = None,
    filter_spec: FilterSpec = eqx.is_inexact_array,
) -> tuple[jax.Array, jax.Array]:
    r"""Monte-Carlo predictive mean and variance of an Equinox regression model.

    With :math:`\mu_s` the output of ``jax.vmap(model)(*inputs)`` at sample s,

    .. math::
        \bar\mu = \frac1S \sum_s \mu_s, \qquad
        \mathrm{Var} = \frac1S \sum_s (\mu_s - \bar\mu)^2 + \sigma^2_{\mathrm{obs}}

    (:func:`ivon_jax.predictive.predict_regression` on the filtered model).

    Args:
      key: a JAX PRNG key.
      model: the model holding the posterior mean.
      opt_state: the optimizer state holding the IVON state.
      *inputs: the batch (see :func:`predict_proba`).
      num_samples: S ≥ 1 weight samples.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance :math:`\sigma^2_{\mathrm{obs}}` to add (scalar
        or broadcastable array), or ``None``.
      call: ``call(model, *inputs) -> predictions`` instead of ``jax.vmap(model)(*inputs)``.
      filter_spec: the trained leaves, as in :func:`value_and_grad`.

    Returns:
      ``(mean, variance)`` shaped like the model's output.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import equinox as ivon_eqx
      >>> model = eqx.nn.MLP(3, 1, 8, 1, key=jax.random.key(0))
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(
      ...     eqx.filter(model, eqx.is_inexact_array))
      >>> mean, var = ivon_eqx.predict_regression(
      ...     jax.random.key(1), model, opt_state, jnp.ones((2, 3)), num_samples=4,
      ...     noise_var=0.1)
      >>> mean.shape, bool((var >= 0.1).all())
      ((2, 1), True)
    """
    apply_fn, params = _functional(model, filter_spec, call)
    return predictive.predict_regression(
        key, apply_fn, params, opt_state, *inputs,
        num_samples=num_samples, chunk_size=chunk_size, noise_var=noise_var,
    )
