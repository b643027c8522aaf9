r"""IVON for Flax NNX: training (Dropout, BatchNorm included), weight samples, MC predictions.

``nnx.Optimizer`` forwards extra keyword arguments to the transform, so
``nnx.Optimizer(model, ivon_jax.ivon(...), wrt=nnx.Param)`` and ``optimizer.update(model,
grads, hess=hess)`` work as they are. This module adds the NNX spelling of the rest:

* :func:`value_and_grad` — :func:`ivon_jax.value_and_grad` for a loss of the model, in
  ``model.train()`` mode too: Dropout with the module's own ``rngs`` (each weight sample draws
  its own mask) and BatchNorm batch statistics (the average of the samples' updates) are
  written back to the model, as ``nnx.value_and_grad`` would;
* :func:`sampled_model` — a copy of the model with one set of weights drawn from q;
* :func:`predict_proba`, :func:`predict_regression` — the Monte-Carlo predictive, vectorised
  over samples in chunks; :func:`mixture_predict_proba`, :func:`mixture_predict_regression` —
  Multi-IVON.

Only the variables the optimizer trains (``optimizer.wrt``, normally ``nnx.Param``) are
perturbed; ``nnx.BatchStat``, RNG state and every other variable are never sampled. Prediction
evaluates a functional copy of the model (``nnx.split``/``nnx.merge``) and never modifies the
model you pass: a forward pass that *changes* non-parameter state there (a model still in
training mode) raises an error instead of being silently dropped — call ``model.eval()`` before
predicting.

BatchNorm is a poor fit for IVON: the paper reports that IVON "does not go well with batch
normalization layers" and trains its ImageNet ResNet-50 with Filter Response Normalisation
(FRN) instead. A likely reason: batch statistics are computed from activations, which change
with every weight sample, so running averages collected at one set of weights do not match
another, and in training mode each sample renormalises part of its perturbation away. Prefer
normalisations without batch statistics — ``nnx.LayerNorm``, ``nnx.GroupNorm`` or FRN — or
none for small models. BatchNorm still works: :func:`value_and_grad` updates its running
averages with the mean of the S samples' batch statistics.

Example::

    import jax, optax
    from flax import nnx
    import ivon_jax
    from ivon_jax.flax import nnx as ivon_nnx

    model = MyModel(rngs=nnx.Rngs(0))  # may hold nnx.Dropout(rate, rngs=rngs), nnx.BatchNorm
    model.train()
    optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.2, ess=n_train), wrt=nnx.Param)
    vg = ivon_nnx.value_and_grad(lambda m, x, y: cross_entropy(m(x), y))

    @nnx.jit
    def train_step(model, optimizer, key, x, y):
        loss, grads, hess = vg(key, model, optimizer, x, y)
        optimizer.update(model, grads, hess=hess)
        return loss

    model.eval()
    probs = ivon_nnx.predict_proba(key, model, optimizer, x_test, num_samples=64)

References:
  Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import numpy as np
import optax
from flax import nnx

from ivon_jax._src import grad
from ivon_jax._src import noise
from ivon_jax._src import posterior
from ivon_jax._src import predictive

__all__ = [
    "mixture_predict_proba",
    "mixture_predict_regression",
    "predict_proba",
    "predict_regression",
    "sampled_model",
    "value_and_grad",
]

OptimizerLike = nnx.Optimizer | optax.OptState


def _state_and_filter(optimizer: OptimizerLike, wrt: Any) -> tuple[optax.OptState, Any]:
    """The optimizer state and the filter of the variables it trains."""
    if isinstance(optimizer, nnx.Optimizer):
        return optimizer.opt_state, optimizer.wrt if wrt is None else wrt
    return optimizer, nnx.Param if wrt is None else wrt


def _functional(
    model: nnx.Module, wrt: Any, call: Callable[..., Any]
) -> tuple[Callable[..., Any], nnx.State]:
    """``(fun, params)`` with ``fun(p, *args, **kwargs) = call(copy of model with p, ...)``.

    ``params`` is the state of the variables matched by ``wrt``. The copy is made with
    ``nnx.merge(..., copy=True)``, so ``fun`` never touches ``model``; if ``call`` changes any
    other variable of the copy, ``fun`` raises instead of silently dropping the change.
    """
    graphdef, params, rest = nnx.split(model, wrt, ...)
    rest_leaves = jax.tree_util.tree_flatten_with_path(rest)[0]

    def fun(p: Any, *args: Any, **kwargs: Any) -> Any:
        copy = nnx.merge(graphdef, p, rest, copy=True)
        out = call(copy, *args, **kwargs)
        new_leaves = jax.tree.leaves(nnx.split(copy, wrt, ...)[2])
        changed = [
            jax.tree_util.keystr(path)
            for (path, old), new in zip(rest_leaves, new_leaves, strict=True)
            if new is not old
        ]
        if changed:
            raise ValueError(
                "ivon_jax: the model's forward pass changed variables that IVON does not "
                f"sample ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}). "
                "Prediction evaluates a functional copy of the model per weight sample and "
                "writes nothing back: call `model.eval()` first (BatchNorm running averages, "
                "Dropout). Training in `model.train()` mode goes through "
                "`ivon_jax.flax.nnx.value_and_grad`, which writes such changes back."
            )
        return out

    return fun, params


def _call_module(module: nnx.Module, *inputs: Any) -> Any:
    return module(*inputs)


def _stateful_functional(
    model: nnx.Module,
    wrt: Any,
    call: Callable[..., Any],
    num_samples: int,
    axis_name: Hashable | None,
) -> tuple[Callable[..., Any], nnx.State, tuple[nnx.State, nnx.State]]:
    """``(fun, params, (keys, rest))`` for :func:`ivon_jax._src.grad.stateful_value_and_grad`.

    ``fun(p, (keys, rest), s, *args, **kwargs)`` runs ``call`` on a copy of the model with the
    trained variables ``p``, the RNG stream keys ``keys`` (``nnx.RngKey``) made per-sample with
    :func:`grad.sample_key` and the other variables ``rest``; it returns ``(value, changed)``
    with ``changed`` the list of ``rest``'s leaves, each the new value if the forward pass
    changed it and None otherwise (so unchanged leaves are never averaged or rewritten).
    """
    graphdef, params, keys, rest = nnx.split(model, wrt, nnx.RngKey, ...)
    rest_def = jax.tree.structure(rest)

    def fun(p: Any, state: Any, index: jax.Array, *args: Any, **kwargs: Any) -> Any:
        keys, rest = state
        per_sample = lambda k: grad.sample_key(k, index, num_samples, axis_name)
        keys = jax.tree.map(per_sample, keys)
        copy = nnx.merge(graphdef, p, keys, rest, copy=True)
        out = call(copy, *args, **kwargs)
        _, _, new_keys, new_rest = nnx.split(copy, wrt, nnx.RngKey, ...)
        if jax.tree.structure(new_rest) != rest_def or any(
            new is not old
            for old, new in zip(jax.tree.leaves(keys), jax.tree.leaves(new_keys), strict=True)
        ):
            raise ValueError(
                "ivon_jax: the model's forward pass added or removed variables, or replaced an "
                "RNG stream's key; ivon_jax.flax.nnx.value_and_grad writes back updated "
                "values of existing variables only (batch statistics, RNG counters)."
            )
        old_leaves = jax.tree.leaves(rest)
        changed = [
            new if new is not old else None
            for old, new in zip(old_leaves, jax.tree.leaves(new_rest), strict=True)
        ]
        return out, changed

    return fun, params, (keys, rest)


_CALL = (
    "`vg = ivon_jax.flax.nnx.value_and_grad(loss_fn)` is called as "
    "`loss, grads, hess = vg(key, model, optimizer, *args)`: the first argument is the key of "
    "the weight noise (a `jax.random.key`, an `nnx.Rngs` or one of its streams), then the "
    "model, then the `nnx.Optimizer` (or its `opt_state`)"
)


def _as_key(key: Any) -> jax.Array:
    """The weight-noise key: a JAX key as it is, or the next key of an ``nnx.Rngs`` (its
    default stream) or of an ``nnx.RngStream``, drawn as NNX layers draw theirs."""
    if isinstance(key, nnx.Rngs):
        try:
            return key()
        except AttributeError:
            raise TypeError(
                "ivon_jax: the `nnx.Rngs` passed as the key has no `default` stream to draw "
                "from; pass one of its streams (e.g. `rngs.noise`) or an `nnx.Rngs(seed)`. "
                + _CALL + "."
            ) from None
    if isinstance(key, nnx.RngStream):
        return key()
    if isinstance(key, (jax.Array, np.ndarray)):
        return key
    raise TypeError(f"ivon_jax: {_CALL}; got a {type(key).__name__} as the key.")


def value_and_grad(
    loss_fn: Callable[..., Any],
    num_samples: int = 1,
    has_aux: bool = False,
    axis_name: Hashable | None = None,
    *,
    method: Literal["price", "gradsq"] = "price",
    mode: Literal["vmap", "scan"] = "vmap",
    generator: noise.Generator = "fast",
    wrt: Any = None,
) -> Callable[..., tuple[Any, nnx.State, nnx.State]]:
    r""":func:`ivon_jax.value_and_grad` for a loss of an NNX model, in training mode too.

    Returns a function ``(key, model, optimizer, *args, **kwargs) -> (value, grads, hess)``
    (``key``: a JAX key, or an ``nnx.Rngs``/``nnx.RngStream`` from which the next key is
    drawn) that evaluates ``loss_fn(model_s, *args, **kwargs)`` at S copies of the model whose
    trained variables are :math:`\theta_s = m + \sigma\odot\epsilon_s` (sample s with key
    ``jax.random.split(key, S)[s]``) and averages the value, the gradients and the Hessian
    estimate over them. ``grads`` and ``hess`` are ``nnx.State`` s like
    ``nnx.state(model, optimizer.wrt)``, ready for ``optimizer.update(model, grads,
    hess=hess)``.

    Non-parameter state that the forward pass updates is written back to ``model``, as
    ``nnx.value_and_grad`` would (the trained variables are left to ``optimizer.update``):

    * **RNG streams** (``nnx.Dropout(rngs=...)`` and other users of the module's own
      ``nnx.Rngs``): with S = 1 the streams are used as they are, so a step draws the masks
      a plain ``model(x)`` would; with S > 1 sample s draws from each stream as if its key
      were ``jax.random.fold_in(key, s)``, so every weight sample gets its own dropout
      mask; with ``axis_name`` the device index is folded in first (each device its own
      masks). The stream keys are never changed and each counter advances once per draw, as
      after one forward pass: the next step draws fresh masks, deterministically.
    * **Batch statistics** (``nnx.BatchNorm`` in training mode) and any other
      floating-point variable: the *average* of the S updated values,

      .. math:: \mu \leftarrow \frac1S \sum_{s=1}^S \big(\rho\,\mu + (1-\rho)\,
                \bar a(\theta_s)\big) = \rho\,\mu + (1-\rho)\,\frac1S\sum_s
                \bar a(\theta_s),

      a running average of the batch statistics *in expectation over q* — the statistics
      the prediction (which uses one set of running averages for all weight samples) needs.
      It is independent of the order of the samples (``"vmap"`` and ``"scan"`` agree), uses
      all S samples rather than one, and with S = 1 is exactly BatchNorm's own update. With
      ``axis_name`` the statistics are also averaged over devices (``lax.pmean``), so the
      replicated model stays identical everywhere (Flax's usual ``sync_batch_stats``).
    * Other non-float variables that change (integer counters) take sample 0's value.

    The forward pass must not add or remove variables (pop ``nnx.Intermediate`` values
    inside ``loss_fn``). Prediction (:func:`predict_proba`, ...) is unchanged: it runs in
    ``model.eval()`` mode and refuses state changes.

    Args:
      loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux``): the *mean* loss over the minibatch.
      num_samples: S ≥ 1 weight samples per step.
      has_aux: whether ``loss_fn`` returns ``(value, aux)``; ``aux`` is averaged over the
        samples.
      axis_name: the mapped axis inside ``pmap``/``shard_map`` (each device draws its own
        weight noise; grads, hess and batch statistics are averaged over the axis).
      method: Hessian estimator, ``"price"`` (default) or ``"gradsq"``.
      mode: ``"vmap"`` (samples in parallel) or ``"scan"`` (one after another); the results
        agree up to float rounding.
      generator: the Gaussian generator, ``"fast"`` (default) or ``"threefry"``, as in
        :func:`ivon_jax.value_and_grad`.
      wrt: the filter of the trained variables; default ``optimizer.wrt`` (``nnx.Param``
        when a bare optimizer state is passed).

    Returns:
      A function ``(key, model, optimizer, *args, **kwargs) -> (value, grads, hess)``, where
      ``optimizer`` is an ``nnx.Optimizer`` or its ``opt_state``; it updates ``model``'s
      non-parameter state in place.

    Raises:
      ValueError: if ``num_samples < 1``, or (when called) if the forward pass adds or
        removes variables.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from flax import nnx
      >>> from ivon_jax.flax import nnx as ivon_nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=100.0), wrt=nnx.Param)
      >>> vg = ivon_nnx.value_and_grad(lambda m, x: jnp.mean(m(x) ** 2))
      >>> loss, grads, hess = vg(jax.random.key(0), model, optimizer, jnp.ones((4, 3)))
      >>> _ = optimizer.update(model, grads, hess=hess)
    """

    def core(fun: Callable[..., Any]) -> Callable[..., Any]:
        return grad.stateful_value_and_grad(
            fun, num_samples, has_aux, axis_name, method=method, mode=mode, generator=generator
        )

    core(loss_fn)  # validates the arguments now, not at the first call

    def wrapped(
        key: jax.Array | nnx.Rngs | nnx.RngStream,
        model: nnx.Module | None = None,
        optimizer: OptimizerLike | None = None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, nnx.State, nnx.State]:
        key = _as_key(key)
        if not isinstance(model, nnx.Module) or optimizer is None:
            got = "nothing" if model is None else f"a {type(model).__name__}"
            raise TypeError(f"ivon_jax: {_CALL}; got {got} as the model.")
        opt_state, filt = _state_and_filter(optimizer, wrt)
        fun, params, (keys, rest) = _stateful_functional(
            model, filt, loss_fn, num_samples, axis_name
        )
        value, grads, hess, changed = core(fun)(
            key, params, opt_state, (keys, rest), *args, **kwargs
        )
        if any(c is not None for c in changed):
            leaves = [
                o if c is None else c for o, c in zip(jax.tree.leaves(rest), changed, strict=True)
            ]
            nnx.update(model, jax.tree.unflatten(jax.tree.structure(rest), leaves))
        return value, grads, hess

    return wrapped


def sampled_model(
    key: jax.Array, model: nnx.Module, optimizer: OptimizerLike, *, wrt: Any = None
) -> nnx.Module:
    r"""A new model whose trained variables are one draw :math:`m + \sigma\odot\epsilon`.

    Uses :func:`ivon_jax.sample_params` on ``nnx.state(model, wrt)`` with ``key`` (so the
    draw equals sample s of :func:`predict_proba` when ``key = jax.random.split(k, S)[s]``).
    Every other variable (batch statistics, RNG state, ...) is copied unchanged; ``model``
    itself is not modified.

    Args:
      key: a JAX PRNG key.
      model: the model holding the posterior mean m.
      optimizer: the ``nnx.Optimizer`` (or its ``opt_state``) holding the IVON state.
      wrt: the filter of the sampled variables; default ``optimizer.wrt`` (``nnx.Param``
        for a bare optimizer state).

    Returns:
      A model of the same type, independent of ``model``.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from flax import nnx
      >>> from ivon_jax.flax import nnx as ivon_nnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=100.0), wrt=nnx.Param)
      >>> one = ivon_nnx.sampled_model(jax.random.key(1), model, optimizer)
      >>> y = one(jnp.ones((4, 3)))
    """
    opt_state, filt = _state_and_filter(optimizer, wrt)
    graphdef, params, rest = nnx.split(model, filt, ...)
    sampled, _ = posterior.sample_params(key, params, opt_state)
    return nnx.merge(graphdef, sampled, rest, copy=True)


def predict_proba(
    key: jax.Array,
    model: nnx.Module,
    optimizer: OptimizerLike,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    wrt: Any = None,
) -> jax.Array:
    r"""Monte-Carlo predictive probabilities of an NNX classifier under IVON's posterior.

    .. math::
        p(y \mid x) \approx \frac1S \sum_{s=1}^S \mathrm{softmax}\big(f(x; \theta_s)\big)

    where ``model(*inputs)`` returns logits (classes on the last axis) and
    :math:`\theta_s` are the trained variables drawn from q with key
    ``jax.random.split(key, S)[s]``; other variables are used as they are. The S samples are
    evaluated with ``vmap`` in chunks of ``chunk_size``. Call ``model.eval()`` first if the
    model has Dropout or BatchNorm.

    Args:
      key: a JAX PRNG key.
      model: the model holding the posterior mean.
      optimizer: the ``nnx.Optimizer`` (or its ``opt_state``) holding the IVON state.
      *inputs: passed to ``model``.
      num_samples: S ≥ 1 weight samples (the paper uses 64 at test time).
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      wrt: the filter of the sampled variables (default ``optimizer.wrt``).

    Returns:
      Probabilities shaped like the logits, in float32 or wider.

    Raises:
      ValueError: on ``num_samples < 1`` or ``chunk_size < 1``, or if the forward pass
        changes non-parameter variables (a model in training mode).

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from flax import nnx
      >>> from ivon_jax.flax import nnx as ivon_nnx
      >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=100.0), wrt=nnx.Param)
      >>> probs = ivon_nnx.predict_proba(jax.random.key(0), model, optimizer,
      ...                                jnp.ones((2, 3)), num_samples=16, chunk_size=8)
    """
    opt_state, filt = _state_and_filter(optimizer, wrt)
    apply_fn, params = _functional(model, filt, _call_module)
    return predictive.predict_proba(
        key, apply_fn, params, opt_state, *inputs, num_samples=num_samples, chunk_size=chunk_size
    )


def predict_regression(
    key: jax.Array,
    model: nnx.Module,
    optimizer: OptimizerLike,
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
    wrt: Any = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Monte-Carlo predictive mean and variance of an NNX regression model.

    With :math:`\mu_s = f(x; \theta_s)` the output of ``model(*inputs)`` at sample s,

    .. math::
        \bar\mu = \frac1S \sum_s \mu_s, \qquad
        \mathrm{Var} = \frac1S \sum_s (\mu_s - \bar\mu)^2 + \sigma^2_{\mathrm{obs}}.

    Args:
      key: a JAX PRNG key.
      model: the model holding the posterior mean.
      optimizer: the ``nnx.Optimizer`` (or its ``opt_state``) holding the IVON state.
      *inputs: passed to ``model``.
      num_samples: S ≥ 1 weight samples.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance :math:`\sigma^2_{\mathrm{obs}}` to add (scalar or
        broadcastable array), or ``None``.
      wrt: the filter of the sampled variables (default ``optimizer.wrt``).

    Returns:
      ``(mean, variance)`` shaped like the model's output.

    Raises:
      ValueError: as :func:`predict_proba`.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from flax import nnx
      >>> from ivon_jax.flax import nnx as ivon_nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, ivon_jax.ivon(0.1, ess=100.0), wrt=nnx.Param)
      >>> mean, var = ivon_nnx.predict_regression(jax.random.key(0), model, optimizer,
      ...                                         jnp.ones((5, 3)), num_samples=16, noise_var=0.01)
      >>> mean.shape, var.shape
      ((5, 1), (5, 1))
    """
    opt_state, filt = _state_and_filter(optimizer, wrt)
    apply_fn, params = _functional(model, filt, _call_module)
    return predictive.predict_regression(
        key,
        apply_fn,
        params,
        opt_state,
        *inputs,
        num_samples=num_samples,
        chunk_size=chunk_size,
        noise_var=noise_var,
    )


_PAIR = "(model, optimizer)"


def mixture_predict_proba(
    key: jax.Array,
    members: Sequence[tuple[nnx.Module, OptimizerLike]],
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    wrt: Any = None,
) -> jax.Array:
    r"""Multi-IVON: the predictive of a uniform mixture of K independently trained models.

    .. math:: p(y \mid x) = \frac1K \sum_{k=1}^K p_k(y \mid x),

    with :math:`p_k` member k's :func:`predict_proba` using key
    ``jax.random.split(key, K)[k]``.

    Args:
      key: a JAX PRNG key.
      members: K ≥ 1 ``(model, optimizer)`` pairs, one per IVON run.
      *inputs: passed to each model.
      num_samples: S ≥ 1 weight samples per member.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      wrt: the filter of the sampled variables (default each ``optimizer.wrt``).

    Returns:
      Probabilities shaped like the logits.

    Raises:
      ValueError: if ``members`` is empty (K = 0) or not a list of pairs.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from flax import nnx
      >>> from ivon_jax.flax import nnx as ivon_nnx
      >>> models = [nnx.Linear(3, 4, rngs=nnx.Rngs(seed)) for seed in (0, 1)]
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> members = [(m, nnx.Optimizer(m, opt, wrt=nnx.Param)) for m in models]
      >>> probs = ivon_nnx.mixture_predict_proba(jax.random.key(0), members, jnp.ones((2, 3)),
      ...                                        num_samples=8)
      >>> probs.shape
      (2, 4)
    """
    return predictive.mixture_of_probs(predictive.over_members(
        key, members, num_samples,
        lambda k, m, o: predict_proba(
            k, m, o, *inputs, num_samples=num_samples, chunk_size=chunk_size, wrt=wrt
        ),
        _PAIR,
    ))


def mixture_predict_regression(
    key: jax.Array,
    members: Sequence[tuple[nnx.Module, OptimizerLike]],
    *inputs: Any,
    num_samples: int,
    chunk_size: int | None = None,
    noise_var: float | jax.Array | None = None,
    wrt: Any = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Multi-IVON for regression: mean and variance of the uniform mixture of K members.

    .. math::
        \bar\mu = \frac1K \sum_k \bar\mu_k, \qquad
        v = \frac1K \sum_k v_k + \frac1K \sum_k (\bar\mu_k - \bar\mu)^2,

    with member k's :func:`predict_regression` moments using key
    ``jax.random.split(key, K)[k]``.

    Args:
      key: a JAX PRNG key.
      members: K ≥ 1 ``(model, optimizer)`` pairs.
      *inputs: passed to each model.
      num_samples: S ≥ 1 weight samples per member.
      chunk_size: samples per vectorised chunk (``None``: all S at once).
      noise_var: observation-noise variance added to each member's variance, or ``None``.
      wrt: the filter of the sampled variables (default each ``optimizer.wrt``).

    Returns:
      ``(mean, variance)`` shaped like the model's output.

    Raises:
      ValueError: if ``members`` is empty (K = 0) or not a list of pairs.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from flax import nnx
      >>> from ivon_jax.flax import nnx as ivon_nnx
      >>> models = [nnx.Linear(3, 1, rngs=nnx.Rngs(seed)) for seed in (0, 1)]
      >>> opt = ivon_jax.ivon(0.1, ess=100.0)
      >>> members = [(m, nnx.Optimizer(m, opt, wrt=nnx.Param)) for m in models]
      >>> mean, var = ivon_nnx.mixture_predict_regression(jax.random.key(0), members,
      ...                                                 jnp.ones((5, 3)), num_samples=8)
      >>> mean.shape, var.shape
      ((5, 1), (5, 1))
    """
    return predictive.mixture_of_moments(predictive.over_members(
        key, members, num_samples,
        lambda k, m, o: predict_regression(
            k, m, o, *inputs,
            num_samples=num_samples, chunk_size=chunk_size, noise_var=noise_var, wrt=wrt,
        ),
        _PAIR,
    ))
