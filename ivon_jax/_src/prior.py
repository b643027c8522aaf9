"""The prior N(m₀, 1/(λδ)) of an IVON state: set it, and turn a posterior into the next prior."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ivon_jax._src import checks
from ivon_jax._src import posterior
from ivon_jax._src.state import IVONState


def _lookup(tree: Any) -> dict[tuple[Any, ...], Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {checks.normalized_path(path): x for path, x in flat}


def _check_nonnegative(name: str, x: Any) -> None:
    if isinstance(x, jax.core.Tracer):
        return  # a traced value cannot be inspected; the caller vouches for it
    values = np.asarray(x, np.float64)
    if not np.all(np.isfinite(values) & (values >= 0)):
        raise ValueError(
            f"ivon_jax: `precision{name}` must be >= 0 and finite everywhere (δ, the prior "
            "precision divided by λ)."
        )


def set_prior(
    opt_state: optax.OptState,
    *,
    mean: optax.Params | None = None,
    precision: optax.Params | float | jax.Array | None = None,
) -> optax.OptState:
    r"""Returns ``opt_state`` with the prior :math:`N(m_0, 1/(\lambda \delta))` replaced.

    Every IVON state inside ``opt_state`` (in chains, masks, injected hyper-parameters) gets
    the centre ``mean`` (:math:`m_0`) and the elementwise precision ``precision`` (δ, in the
    units of ``weight_decay``: the prior precision divided by the state's λ). Its update
    becomes

    .. math::
        u = (\bar g + \delta \odot (m - m_0)) / (h + \delta), \qquad
        \sigma = 1/\sqrt{\lambda (h + \delta)},

    and :func:`sample_params`, :func:`posterior_std`, :func:`estimate_hessian`,
    :func:`state_summary`, merging and sensitivity use this δ. A δ set here replaces the
    optimizer's ``weight_decay`` (also one injected with ``optax.inject_hyperparams``);
    ``rescale_lr`` keeps the constructor's h₀ + ``weight_decay``. g, h and the step count are
    unchanged: for a new task, initialise a fresh state first.

    To continue from a finished task, its posterior :math:`N(m, 1/(\lambda (h + \delta)))`
    becomes the prior: ``set_prior(state, **posterior_as_prior(params, old_state))``. With a
    Gaussian likelihood this is exact sequential Bayes for the mean-field posterior.

    Args:
      opt_state: an optimizer state holding one or more IVON states.
      mean: the prior mean m₀, a tree like the parameters (only the leaves IVON manages are
        read); ``None`` keeps the current one (zero, unless ``prior_mean="init"`` or an
        earlier ``set_prior``). Stored in the dtype of the current m₀, else in the given
        leaves' dtypes; in a checkpoint it travels with the state.
      precision: δ ≥ 0: a scalar for every element, or a tree like the parameters whose
        leaves are scalars or arrays of the parameter's shape; stored in h's dtype.
        ``None`` keeps the current δ.

    Returns:
      A state of the same kind; its structure changes where a prior field is set for the
      first time (set it before ``jax.jit``-compiling the train step, or call the step on
      the new state and let it compile again).

    Raises:
      ValueError: when a tree lacks a parameter that IVON manages, a leaf has the wrong
        shape, or a concrete precision is negative or not finite.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=1.0, weight_decay=0.0)
      >>> state = opt.init({"w": jnp.zeros(2)})
      >>> state = ivon_jax.set_prior(state, mean={"w": jnp.ones(2)}, precision=3.0)
      >>> [round(float(s), 4) for s in ivon_jax.posterior_std(state)["w"]]  # 1/sqrt(100*4)
      [0.05, 0.05]
    """
    means = None if mean is None else _lookup(mean)
    scalar_precision = precision is not None and jax.tree_util.treedef_is_leaf(
        jax.tree.structure(precision)
    ) and jnp.ndim(precision) == 0
    if scalar_precision:
        _check_nonnegative("", precision)
    precisions = None if precision is None or scalar_precision else _lookup(precision)

    def leaf_from(table: dict, what: str, path: Any, h: jax.Array) -> jax.Array:
        key = checks.normalized_path(path)
        if key not in table:
            raise ValueError(
                f"ivon_jax: `{what}` lacks the parameter {checks.path_str(key)} that IVON "
                "manages; pass a tree like the parameters."
            )
        return table[key]

    def new_state(st: IVONState) -> IVONState:
        prior_mean, prior_precision = st.prior_mean, st.prior_precision
        if means is not None:
            old = None if prior_mean is None else _lookup(prior_mean)

            def one_mean(path: Any, h: jax.Array) -> jax.Array:
                x = jnp.asarray(leaf_from(means, "mean", path, h))
                if x.shape != h.shape:
                    raise ValueError(
                        f"ivon_jax: `mean{checks.path_str(path)}` has shape {x.shape}, the "
                        f"parameter has shape {h.shape}."
                    )
                dt = x.dtype if old is None else old[checks.normalized_path(path)].dtype
                if not jnp.issubdtype(dt, jnp.floating):
                    dt = h.dtype
                return x.astype(dt)

            prior_mean = jax.tree_util.tree_map_with_path(one_mean, st.hess)
        if precision is not None:

            def one_precision(path: Any, h: jax.Array) -> jax.Array:
                if scalar_precision:
                    return jnp.asarray(precision).astype(h.dtype)
                x = jnp.asarray(leaf_from(precisions, "precision", path, h))
                if x.ndim and x.shape != h.shape:
                    raise ValueError(
                        f"ivon_jax: `precision{checks.path_str(path)}` has shape {x.shape}; "
                        f"it must be a scalar or the parameter's shape {h.shape}."
                    )
                _check_nonnegative(checks.path_str(path), x)
                return x.astype(h.dtype)

            prior_precision = jax.tree_util.tree_map_with_path(one_precision, st.hess)
        return st._replace(prior_mean=prior_mean, prior_precision=prior_precision)

    posterior.find_ivon_states(opt_state)  # raises if there is none
    is_state = lambda x: isinstance(x, IVONState)
    return jax.tree.map(
        lambda x: new_state(x) if is_state(x) else x, opt_state, is_leaf=is_state
    )


def posterior_as_prior(
    params: optax.Params,
    opt_state: optax.OptState,
    *,
    ess: float | None = None,
) -> dict[str, Any]:
    r"""A finished run's posterior as the arguments of :func:`set_prior` for the next task.

    The posterior :math:`N(m, 1/(\lambda (h + \delta)))` of the run becomes the prior
    :math:`N(m_0, 1/(\lambda' \delta'))` with :math:`m_0 = m` and
    :math:`\delta' = \lambda (h + \delta) / \lambda'`, where λ' is the next optimizer's
    ``ess`` (the same λ when ``ess`` is ``None``).

    Args:
      params: the run's parameters (the posterior mean m).
      opt_state: its optimizer state.
      ess: λ' of the optimizer that will use the prior, if it differs from this run's λ.

    Returns:
      ``{"mean": m, "precision": δ'}``, trees like ``params`` (δ' in h's dtype, 0 for
      parameters no IVON transform manages): ``set_prior(new_state, **result)``.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=0.5, weight_decay=0.0)
      >>> params = {"w": jnp.ones(2)}
      >>> prior = ivon_jax.posterior_as_prior(params, opt.init(params), ess=50.0)
      >>> prior["precision"]["w"].tolist()  # 100 * 0.5 / 50
      [1.0, 1.0]
    """
    if ess is not None:
        checks.check_hyperparam("ess", ess, lambda x: 0 < x < math.inf, "> 0 and finite")
    leaves, managed, treedef = posterior.managed_leaves(params, opt_state)
    out = []
    for x, m in zip(leaves, managed, strict=True):
        if m is None:
            out.append(jnp.zeros(jnp.shape(x), jnp.result_type(x)))
            continue
        if ess is None:  # the same λ: δ' = h + δ exactly
            out.append(m.hess + m.weight_decay.astype(m.hess.dtype))
        else:
            p = m.precision()  # λ (h + δ)
            out.append(p / jnp.asarray(ess, p.dtype))
    return {"mean": params, "precision": jax.tree.unflatten(treedef, out)}
