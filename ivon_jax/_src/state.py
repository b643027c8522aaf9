"""IVON's state and the dtype rules for its statistics.

The lowest layer: the transform (``transform.py``), its wrappers, the posterior and every
downstream tool read these; this module imports nothing from ``ivon_jax``.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class IVONState(NamedTuple):
    r"""State of :func:`scale_by_ivon`: everything that defines the posterior's σ.

    Its structure and dtypes never change between steps, so it can be carried through
    ``lax.scan``/``lax.cond`` and checkpointed. It holds no noise and, unless the prior is
    centred away from zero, no copy of the parameters.

    The prior is :math:`N(m_0, 1/(\lambda \delta))` elementwise. By default :math:`m_0 = 0`
    and δ is the transform's ``weight_decay`` (``prior_mean`` and ``prior_precision`` are ``None``:
    nothing is stored). ``scale_by_ivon(..., prior_mean="init")`` keeps the initial parameters as
    :math:`m_0`; :func:`ivon_jax.set_prior` sets either field.

    Attributes:
      count: shape (), int32: the number of updates applied (the t in the debiasing 1 - b1^t).
      momentum: the gradient momentum g, a pytree like the parameters, in float32 or wider.
      hess: IVON's Hessian estimate h, like the parameters, in float32 or wider; the posterior's
        standard deviation is σ = 1 / √(λ (h + δ)).
      ess: shape (): the effective sample size λ used for σ.
      weight_decay: shape (): the weight decay δ used for σ (the prior precision per unit of λ)
        unless ``prior_precision`` is set.
      prior_mean: the prior's centre m₀ (like the parameters), or ``None`` for zero.
      prior_precision: a δ per leaf (each h's shape or a scalar) overriding ``weight_decay``,
        or ``None``.
      hess_init: h₀ of each leaf (shape-() arrays): the constant ``hess_init``, or with
        ``hess_init="auto"`` the value calibrated from the first steps' ĥ.
      b2: shape (): β₂; h₀β₂ᵗ is the part of h that is still h₀'s decay.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> state = ivon_jax.scale_by_ivon(ess=100.0, hess_init=0.5).init({"w": jnp.zeros(3)})
      >>> state.hess["w"], state.count
      (Array([0.5, 0.5, 0.5], dtype=float32), Array(0, dtype=int32))
    """

    count: jax.Array  # shape=(), int32: number of updates applied (the t in 1 - b1^t)
    momentum: optax.Updates  # g: like params, dtype promote(param, float32)
    hess: optax.Updates  # h: like params, dtype promote(param, float32)
    ess: jax.Array  # shape=(), canonical float: λ used for σ = 1 / sqrt(λ (h + δ))
    weight_decay: jax.Array  # shape=(), canonical float: δ used for σ (unless prior_precision)
    prior_mean: optax.Params | None = None  # m₀: like params, in their dtypes; None = zero
    # δ overriding weight_decay: like hess, each leaf h's shape or shape=(), h's dtype
    prior_precision: optax.Updates | None = None
    # h₀ of each leaf (a tree like params of shape-() arrays in h's dtype): the constant
    # `hess_init`, or with `hess_init="auto"` the value calibrated from the first steps' ĥ
    # (until then, the running average of the leaf means of ĥ). Read by `state_summary` to tell
    # the data's curvature from h₀'s decay, and by the "auto" rescaling of the step.
    hess_init: optax.Updates = None
    b2: jax.Array | None = None  # shape=(), canonical float: β₂ (h₀β₂ᵗ is h₀'s share of h)


def prior_precision_leaves(state: IVONState) -> list[jax.Array]:
    """δ for each leaf of ``state.hess``, in h's dtype: an array like h, or a scalar."""
    hs = jax.tree.leaves(state.hess)
    if state.prior_precision is None:
        wd = _single(state.weight_decay)
        return [wd.astype(h.dtype) for h in hs]
    deltas = jax.tree.leaves(state.prior_precision)
    return [d.astype(h.dtype) for d, h in zip(deltas, hs, strict=True)]


def _single(x: Any) -> jax.Array:
    # An NNX optimizer state wraps each array in a Variable; its single leaf is the array.
    (leaf,) = jax.tree.leaves(x)
    return leaf


ScaleByIVONState = IVONState


def stats_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of IVON's statistics for a parameter of ``dtype``: float32 or wider.

    With b2 = 0.99999 an increment of h is 1e-5 of its value, below bfloat16's resolution
    (2^-8), so a bfloat16 h would never move.
    """
    dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))  # float64 → float32 without x64
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.dtype(jnp.float32)


def hess_lower_bound(weight_decay: jax.Array, dtype: Any) -> jax.Array:
    """The smallest h that :func:`scale_by_ivon`'s update keeps: h is clamped to at least this.

    It is ``floor - δ`` with ``floor = max(tiny, 4 eps δ)`` in ``dtype``: h + δ, which can
    underflow or cancel to 0 in floating point, stays about ``floor`` > 0 (4 eps δ exceeds the
    rounding of ``floor - δ``). :func:`ivon_jax.state_summary` counts the elements held here.

    Args:
      weight_decay: δ in ``dtype``, a scalar or an array like h (a per-element prior).
      dtype: the statistics' dtype (h's dtype).
    """
    floor = jnp.maximum(jnp.finfo(dtype).tiny, 4 * jnp.finfo(dtype).eps * weight_decay)
    return floor - weight_decay


def scalar_dtype() -> jnp.dtype:
    """float64 when x64 is enabled, float32 otherwise."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
