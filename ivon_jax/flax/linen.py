r"""IVON for Flax Linen: a ``TrainState`` that passes ``hess`` on, training with mutable
collections, and the MC predictive.

Linen's ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)`` and has no
way to pass IVON's Hessian estimate; :class:`TrainState` is the same class with
``apply_gradients(grads=..., hess=...)`` and a ``batch_stats`` field. A model without
Dropout or BatchNorm trains with :func:`ivon_jax.value_and_grad` on ``params``; one with them
trains with :func:`value_and_grad`, which passes ``rngs={"dropout": ...}`` (a mask per weight
sample) and returns the ``batch_stats`` updated by ``apply(..., mutable=["batch_stats"])``,
averaged over the samples. The predictive functions take Linen's ``apply_fn(variables,
*inputs)`` and a variables dict; only ``variables["params"]`` is perturbed, every other
collection (``batch_stats``, ``cache``, ...) is passed through unchanged.

BatchNorm is a poor fit for IVON: the paper reports that IVON "does not go well with batch
normalization layers" and trains its ImageNet ResNet-50 with Filter Response Normalisation
(FRN) instead. A likely reason: batch statistics are computed from activations, which change
with every weight sample, so running averages collected at one set of weights do not match
another, and in training mode each sample renormalises part of its perturbation away. Prefer
normalisations without batch statistics — ``nn.LayerNorm``, ``nn.GroupNorm`` or FRN — or none
for small models. If a model does use BatchNorm, train it with :func:`value_and_grad` (the
running averages get the mean of the S samples' batch statistics) and evaluate it with
``use_running_average=True`` (for example ``functools.partial(model.apply, train=False)`` as
``apply_fn``).

Example::

    import jax, optax
    import ivon_jax
    from ivon_jax.flax import linen as ivon_linen

    state = ivon_linen.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=ivon_jax.ivon(0.2, ess=n_train))
    vg = ivon_jax.value_and_grad(lambda p, x, y: cross_entropy(state.apply_fn({"params": p}, x), y))

    @jax.jit
    def train_step(state, key, x, y):
        loss, grads, hess = vg(key, state.params, state.opt_state, x, y)
        return state.apply_gradients(grads=grads, hess=hess), loss

    probs = ivon_linen.predict_proba(key, state.apply_fn, {"params": state.params},
                                     state.opt_state, x_test, num_samples=64)

With Dropout and BatchNorm (``model(x, train)``)::

    state = ivon_linen.TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables["batch_stats"], tx=ivon_jax.ivon(0.2, ess=n_train))

    def loss_fn(params, batch_stats, rngs, x, y):
        logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, x,
                                         train=True, rngs=rngs, mutable=["batch_stats"])
        return cross_entropy(logits, y), updates["batch_stats"]

    vg = ivon_linen.value_and_grad(loss_fn, num_samples=2)

    @jax.jit
    def train_step(state, key, x, y):
        key, dropout_key = jax.random.split(key)
        loss, grads, hess, batch_stats = vg(key, state.params, state.opt_state,
                                            state.batch_stats, {"dropout": dropout_key}, x, y)
        return state.apply_gradients(grads=grads, hess=hess, batch_stats=batch_stats), loss

References:
  Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import optax
from flax.core import FrozenDict
from flax.training import train_state

from ivon_jax._src import grad
from ivon_jax._src import noise
from ivon_jax._src import posterior
from ivon_jax._src import predictive

__all__ = [
    "TrainState",
    "mixture_predict_proba",
    "mixture_predict_regression",
    "predict_proba",
    "predict_regression",
    "sample_variables",
    "value_and_grad",
]

Variables = Mapping[str, Any]


class TrainState(train_state.TrainState):
    """Flax's ``TrainState`` whose ``apply_gradients`` also takes IVON's ``hess``.

    Create it as Flax's (``TrainState.create(apply_fn=..., params=..., tx=...)``) with ``tx``
    an optax transform containing :func:`ivon_jax.ivon` or :func:`ivon_jax.scale_by_ivon`.
    Like the ``TrainState`` of Flax's ImageNet example it carries ``batch_stats`` (default
    None): pass ``batch_stats=variables["batch_stats"]`` to ``create`` for a model with
    BatchNorm, and the new statistics from :func:`value_and_grad` to ``apply_gradients``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> model = nn.Dense(2)
      >>> x = jnp.ones((4, 3))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> state = ivon_linen.TrainState.create(
      ...     apply_fn=model.apply, params=params, tx=ivon_jax.ivon(0.1, ess=100.0))
      >>> loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
      >>> _, grads, hess = ivon_jax.value_and_grad(loss)(
      ...     jax.random.key(1), state.params, state.opt_state)
      >>> state = state.apply_gradients(grads=grads, hess=hess)
    """

    batch_stats: Any = None

    def apply_gradients(  # type: ignore[override]
        self, *, grads: optax.Updates, hess: optax.Updates, **kwargs: Any
    ) -> TrainState:
        """One optimizer step: ``tx.update(grads, opt_state, params, hess=hess)``.

        Args:
          grads: gradients like ``params`` (averaged over the MC samples).
          hess: the matching Hessian estimate (:func:`ivon_jax.estimate_hessian` or the third
            output of :func:`ivon_jax.value_and_grad`), like ``params``.
          **kwargs: other fields of the state to replace, as in Flax's ``apply_gradients``
            (for example ``batch_stats``).

        Returns:
          The new state, with ``step`` incremented and ``params``/``opt_state`` updated.
        """
        if isinstance(grads, Mapping) and "_overwrite_with_gradient" in grads:
            raise ValueError(
                "ivon_jax: TrainState.apply_gradients does not support Flax's "
                "overwrite-with-gradient (fp8) parameters."
            )
        updates, new_opt_state = self.tx.update(grads, self.opt_state, self.params, hess=hess)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=new_opt_state,
            **kwargs,
        )


def value_and_grad(
    loss_fn: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
    generator: noise.Generator = "fast",
) -> Callable[..., tuple[Any, optax.Updates, optax.Updates, Any]]:
    r""":func:`ivon_jax.value_and_grad` for a Linen model in training mode (Dropout, BatchNorm).

    ``loss_fn(params, model_state, rngs, *args, **kwargs) -> (value, new_model_state)`` is
    evaluated at the S weight samples :math:`\theta_s = m + \sigma\odot\epsilon_s` of
    :func:`ivon_jax.value_and_grad` (same keys; value, grads and hess averaged the same way).
    ``model_state`` is the non-parameter state it reads (normally ``state.batch_stats``) and
    ``new_model_state`` what ``apply(..., mutable=["batch_stats"])`` returned for it; ``rngs``
    is Linen's ``{"dropout": key, ...}`` (or None), made per sample:

    * with S = 1 each key is used as it is (exactly Flax's own training step);
    * with S > 1 sample s gets ``jax.random.fold_in(k, s)`` for every key ``k``, so each
      weight sample draws its own dropout mask;
    * with ``axis_name`` the device index is folded into each key first (each device draws
      its own masks, like its own weight noise). Pass a new ``rngs`` every step (split it from
      the step's key), as with any Linen training loop.

    The S new model states are combined as in :func:`ivon_jax.flax.nnx.value_and_grad`:
    floating-point leaves (batch statistics) are *averaged* over the samples, a running
    average of the batch statistics in expectation over q (``vmap`` and ``scan`` agree; with
    S = 1 it is BatchNorm's own update), and with ``axis_name`` also over devices
    (``lax.pmean``, Flax's usual ``sync_batch_stats``); other leaves take sample 0's value.
    Leaves that ``loss_fn`` returns unchanged are returned exactly. The paper's warning about
    BatchNorm (see the module docstring) still applies.

    Args:
      loss_fn: ``loss_fn(params, model_state, rngs, *args, **kwargs) -> (loss,
        new_model_state)`` (``((loss, aux), new_model_state)`` with ``has_aux``), the *mean*
        loss over the minibatch.
      num_samples: S ≥ 1 weight samples per step.
      has_aux: whether ``loss_fn``'s value is ``(loss, aux)``; ``aux`` is averaged over the
        samples.
      axis_name: the mapped axis inside ``pmap``/``shard_map`` (per-device weight noise;
        value, grads, hess and float model state averaged over the axis).
      method, mode, generator: as in :func:`ivon_jax.value_and_grad`.

    Returns:
      A function ``(key, params, opt_state, model_state, rngs, *args, **kwargs) -> (value,
      grads, hess, new_model_state)``.

    Raises:
      ValueError: if ``num_samples < 1`` or another option is invalid.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
      ...         return nn.Dense(1)(nn.Dropout(0.2, deterministic=not train)(x))
      >>> model, x = Net(), jnp.ones((4, 3))
      >>> variables = model.init(jax.random.key(0), x, train=False)
      >>> state = ivon_linen.TrainState.create(
      ...     apply_fn=model.apply, params=variables["params"],
      ...     batch_stats=variables["batch_stats"], tx=ivon_jax.ivon(0.1, ess=100.0))
      >>> def loss_fn(params, batch_stats, rngs, x):
      ...     out, updates = state.apply_fn(
      ...         {"params": params, "batch_stats": batch_stats}, x, train=True,
      ...         rngs=rngs, mutable=["batch_stats"])
      ...     return jnp.mean(out ** 2), updates["batch_stats"]
      >>> vg = ivon_linen.value_and_grad(loss_fn, num_samples=2)
      >>> key, dropout_key = jax.random.split(jax.random.key(1))
      >>> loss, grads, hess, batch_stats = vg(
      ...     key, state.params, state.opt_state, state.batch_stats, {"dropout": dropout_key}, x)
      >>> state = state.apply_gradients(grads=grads, hess=hess, batch_stats=batch_stats)
    """

    def core(fun: Callable[..., Any]) -> Callable[..., Any]:
        return grad.stateful_value_and_grad(
            fun, num_samples, has_aux, axis_name, method=method, mode=mode, generator=generator
        )

    core(loss_fn)  # validates the arguments now, not at the first call

    def wrapped(
        key: jax.Array,
        params: optax.Params,
        opt_state: optax.OptState,
        model_state: Any,
        rngs: Mapping[str, jax.Array] | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, optax.Updates, optax.Updates, Any]:
        state_def = jax.tree.structure(model_state)
        marked: list[bool] = []  # whether unchanged leaves were marked None (seen when tracing)

        def fun(p: Any, state: Any, index: jax.Array, rngs: Any, *args: Any, **kwargs: Any):
            per_sample = lambda k: grad.sample_key(k, index, num_samples, axis_name)
            rngs = jax.tree.map(per_sample, rngs)
            value, new_state = loss_fn(p, state, rngs, *args, **kwargs)
            marked[:] = [jax.tree.structure(new_state) == state_def]
            if not marked[0]:
                return value, new_state
            # Unchanged leaves become None, so they are neither averaged nor rewritten.
            old = jax.tree.leaves(state)
            new = jax.tree.leaves(new_state)
            return value, [n if n is not o else None for o, n in zip(old, new, strict=True)]

        value, grads, hess, new_state = core(fun)(
            key, params, opt_state, model_state, rngs, *args, **kwargs
        )
        if marked[0]:
            old = jax.tree.leaves(model_state)
            leaves = [o if n is None else n for o, n in zip(old, new_state, strict=True)]
            new_state = jax.tree.unflatten(state_def, leaves)
        return value, grads, hess, new_state

    return wrapped


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "ivon_jax: `variables` must be a Linen variables dict with a 'params' collection, "
            f"e.g. {{'params': state.params}}; got {type(variables).__name__}"
            + (f" with keys {list(variables)}" if isinstance(variables, Mapping) else "")
            + "."
        )


def _with_params(variables: Variables, params: Any) -> Variables:
    """``variables`` with its ``params`` collection replaced (same mapping type)."""
    out = {**variables, "params": params}
    return FrozenDict(out) if isinstance(variables, FrozenDict) else out


def _apply_with(apply_fn: Callable[..., Any], variables: Variables) -> Callable[..., Any]:
    return lambda params, *inputs: apply_fn(_with_params(variables, params), *inputs)


def sample_variables(key: jax.Array, variables: Variables, opt_state: optax.OptState) -> Variables:
    r"""``variables`` with ``params`` replaced by one draw :math:`m + \sigma\odot\epsilon`.

    Uses :func:`ivon_jax.sample_params` on ``variables["params"]`` with ``key``; the other
    collections are returned as they are.

    Args:
      key: a JAX PRNG key.
      variables: a Linen variables dict holding the posterior mean in ``"params"``.
      opt_state: the optimizer state (for example ``state.opt_state``) with the IVON state.

    Returns:
      A variables dict of the same type, for ``apply_fn``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> model = nn.Dense(2)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(variables["params"])
      >>> sampled = ivon_linen.sample_variables(jax.random.key(1), variables, opt_state)
    """
    _check_variables(variables)
    sampled, _ = posterior.sample_params(key, variables["params"], opt_state)
    return _with_params(variables, sampled)


def predict_proba(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    variables: Variables,
    opt_state: optax.OptState,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Monte-Carlo predictive probabilities of a Linen classifier under IVON's posterior.

    .. math::
        p(y \mid x) \approx \frac1S \sum_{s=1}^S \mathrm{softmax}\big(f(x; \theta_s)\big),

    with ``apply_fn({**variables, "params": θ_s}, *inputs)`` returning logits and
    :math:`\theta_s` drawn with key ``jax.random.split(key, S)[s]``, evaluated with ``vmap``
    in chunks of ``chunk_size``.

    Args:
      key: a JAX PRNG key.
      apply_fn: Linen's ``model.apply`` (use ``functools.partial`` for keyword arguments such
        as ``train=False``).
      variables: the variables dict; ``"params"`` holds the posterior mean, other collections
        are used unchanged.
      opt_state: the optimizer state holding the IVON state (``state.opt_state``).
      *inputs: passed to ``apply_fn`` after the variables.
      num_samples: S ≥ 1 weight samples (the paper uses 64 at test time).
      chunk_size: samples per vectorised chunk (``None``: all S at once).

    Returns:
      Probabilities shaped like the logits, in float32 or wider.

    Raises:
      ValueError: on ``num_samples < 1``, ``chunk_size < 1`` or ``variables`` without
        ``"params"``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> model = nn.Dense(4)
      >>> x = jnp.ones((2, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(variables["params"])
      >>> probs = ivon_linen.predict_proba(jax.random.key(1), model.apply, variables,
      ...                                  opt_state, x, num_samples=16, chunk_size=8)
    """
    _check_variables(variables)
    return predictive.predict_proba(
        key,
        _apply_with(apply_fn, variables),
        variables["params"],
        opt_state,
        *inputs,
        num_samples=num_samples,
        chunk_size=chunk_size,
    )


def predict_regression(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    variables: Variables,
    opt_state: optax.OptState,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Monte-Carlo predictive mean and variance of a Linen regression model.

    .. math::
        \bar\mu = \frac1S \sum_s \mu_s, \qquad
        \mathrm{Var} = \frac1S \sum_s (\mu_s - \bar\mu)^2 + \sigma^2_{\mathrm{obs}},

    with :math:`\mu_s` = ``apply_fn({**variables, "params": θ_s}, *inputs)``.

    Args:
      key: a JAX PRNG key.
      apply_fn: Linen's ``model.apply``.
      variables: the variables dict (``"params"`` = posterior mean).
      opt_state: the optimizer state holding the IVON state.
      *inputs: passed to ``apply_fn`` after the variables.
      num_samples: S ≥ 1 weight samples.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance to add (scalar or broadcastable array), or
        ``None``.

    Returns:
      ``(mean, variance)`` shaped like the model's output.

    Raises:
      ValueError: as :func:`predict_proba`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> model = nn.Dense(1)
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> opt_state = ivon_jax.ivon(0.1, ess=100.0).init(variables["params"])
      >>> mean, var = ivon_linen.predict_regression(jax.random.key(1), model.apply, variables,
      ...                                           opt_state, jnp.ones((5, 3)), num_samples=16,
      ...                                           noise_var=0.01)
      >>> mean.shape, var.shape
      ((5, 1), (5, 1))
    """
    _check_variables(variables)
    return predictive.predict_regression(
        key,
        _apply_with(apply_fn, variables),
        variables["params"],
        opt_state,
        *inputs,
        num_samples=num_samples,
        chunk_size=chunk_size,
        noise_var=noise_var,
    )


_PAIR = "(variables, opt_state)"


def mixture_predict_proba(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    members: Sequence[tuple[Variables, optax.OptState]],
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Multi-IVON: the predictive of a uniform mixture of K independently trained runs.

    .. math:: p(y \mid x) = \frac1K \sum_{k=1}^K p_k(y \mid x),

    with :math:`p_k` member k's :func:`predict_proba` using key
    ``jax.random.split(key, K)[k]``.

    Args:
      key: a JAX PRNG key.
      apply_fn: Linen's ``model.apply`` (shared by all members).
      members: K ≥ 1 ``(variables, opt_state)`` pairs, one per IVON run.
      *inputs: passed to ``apply_fn`` after the variables.
      num_samples: S ≥ 1 weight samples per member.
      chunk_size: samples per vectorised chunk (``None``: all S at once).

    Returns:
      Probabilities shaped like the logits.

    Raises:
      ValueError: if ``members`` is empty (K = 0) or not a list of pairs.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> model, opt = nn.Dense(4), ivon_jax.ivon(0.1, ess=100.0)
      >>> variables = [model.init(jax.random.key(seed), jnp.ones((1, 3))) for seed in (0, 1)]
      >>> members = [(v, opt.init(v["params"])) for v in variables]
      >>> probs = ivon_linen.mixture_predict_proba(jax.random.key(2), model.apply, members,
      ...                                          jnp.ones((2, 3)), num_samples=8)
      >>> probs.shape
      (2, 4)
    """
    return predictive.mixture_of_probs(predictive.over_members(
        key, members, num_samples,
        lambda k, v, s: predict_proba(
            k, apply_fn, v, s, *inputs, num_samples=num_samples, chunk_size=chunk_size
        ),
        _PAIR,
    ))


def mixture_predict_regression(
    key: jax.Array,
    apply_fn: Callable[..., jax.Array],
    members: Sequence[tuple[Variables, optax.OptState]],
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Multi-IVON for regression: mean and variance of the uniform mixture of K runs.

    .. math::
        \bar\mu = \frac1K \sum_k \bar\mu_k, \qquad
        v = \frac1K \sum_k v_k + \frac1K \sum_k (\bar\mu_k - \bar\mu)^2.

    Args:
      key: a JAX PRNG key; member k uses ``jax.random.split(key, K)[k]``.
      apply_fn: Linen's ``model.apply``.
      members: K ≥ 1 ``(variables, opt_state)`` pairs.
      *inputs: passed to ``apply_fn`` after the variables.
      num_samples: S ≥ 1 weight samples per member.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance added to each member's variance, or ``None``.

    Returns:
      ``(mean, variance)`` shaped like the model's output.

    Raises:
      ValueError: if ``members`` is empty (K = 0) or not a list of pairs.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, ivon_jax
      >>> from ivon_jax.flax import linen as ivon_linen
      >>> model, opt = nn.Dense(1), ivon_jax.ivon(0.1, ess=100.0)
      >>> variables = [model.init(jax.random.key(seed), jnp.ones((1, 3))) for seed in (0, 1)]
      >>> members = [(v, opt.init(v["params"])) for v in variables]
      >>> mean, var = ivon_linen.mixture_predict_regression(jax.random.key(2), model.apply, members,
      ...                                                   jnp.ones((5, 3)), num_samples=8)
      >>> mean.shape, var.shape
      ((5, 1), (5, 1))
    """
    return predictive.mixture_of_moments(predictive.over_members(
        key, members, num_samples,
        lambda k, v, s: predict_regression(
            k, apply_fn, v, s, *inputs,
            num_samples=num_samples, chunk_size=chunk_size, noise_var=noise_var,
        ),
        _PAIR,
    ))
