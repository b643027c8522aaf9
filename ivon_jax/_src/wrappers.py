"""Wrappers around IVON's transform: skipping steps with non-finite gradients or estimates."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from ivon_jax._src.state import IVONState


class SkipNonFiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped transform's state, left untouched on a skipped step.
      skipped: shape (), int32: the number of steps skipped so far.

    Example:
      >>> import jax.numpy as jnp, optax, ivon_jax
      >>> opt = ivon_jax.skip_nonfinite(optax.sgd(0.1))
      >>> state = opt.init({"w": jnp.zeros(2)})
      >>> _, state = opt.update({"w": jnp.array([jnp.nan, 1.0])}, state)
      >>> int(state.skipped)
      1
    """

    inner_state: optax.OptState  # the wrapped transform's state, untouched on a skipped step
    skipped: jax.Array  # shape=(), int32: number of steps skipped so far


def _is_ivon_state(x: Any) -> bool:
    return isinstance(x, IVONState)


def _all_finite(tree: Any) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def skip_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """Skips a step whose gradients, Hessian estimate or results hold a NaN or an infinity.

    On such a step the updates are zero and the wrapped state — IVON's m-independent
    statistics g and h, its step count, schedule counts — is returned unchanged, so one bad
    batch cannot put a NaN into h (and hence σ) for the rest of training. The number of
    skipped steps is counted in the state. Unlike ``optax.apply_if_finite``, the check
    covers the ``hess`` keyword argument too, and a skip is never overridden.

    ``ivon_jax.ivon(...)`` has a cheaper guard of its own, on by default (its
    ``skip_nonfinite`` argument): it skips steps with non-finite *gradients* the same way, but
    keeps h element by element where only ĥ is bad or h would overflow. This wrapper is the
    stricter, generic one — any chain, any non-finite value, whole steps — and reads the
    inputs and results a second time (1.29–1.73× a train step on 2-core CPUs,
    ``benchmarks/perf.py``).

    Args:
      inner: the transform to protect, e.g. ``ivon_jax.ivon(..., skip_nonfinite=False)`` or
        a chain that contains IVON.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SkipNonFiniteState`.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> tx = ivon_jax.skip_nonfinite(ivon_jax.ivon(0.1, ess=100.0))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> bad = {"w": jnp.array([jnp.nan, 1.0])}
      >>> updates, state = tx.update(bad, state, params, hess=bad)
      >>> int(state.skipped)
      1
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: optax.Params) -> SkipNonFiniteState:
        return SkipNonFiniteState(inner.init(params), jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: SkipNonFiniteState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SkipNonFiniteState]:
        finite = _all_finite(updates)
        if extra_args.get("hess") is not None:
            finite = jnp.logical_and(finite, _all_finite(extra_args["hess"]))
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        # Finite inputs can still overflow the statistics (gradients of 1e30 give a finite
        # ĥ whose square does not fit): check the results too. Only IVON's g and h and the
        # updates are checked, since other transforms may legitimately hold infinities.
        ivon_stats = [
            (st.momentum, st.hess)
            for st in jax.tree.leaves(new_inner, is_leaf=_is_ivon_state)
            if _is_ivon_state(st)
        ]
        finite = jnp.logical_and(finite, _all_finite((new_updates, ivon_stats)))
        keep = lambda new, old: jnp.where(finite, new, old)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(keep, new_inner, state.inner_state)
        skipped = jnp.where(finite, state.skipped, numerics.safe_increment(state.skipped))
        return new_updates, SkipNonFiniteState(new_inner, skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
