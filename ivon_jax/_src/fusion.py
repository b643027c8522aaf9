"""Steering XLA's fusion from JAX: make a value be computed once, in its own kernel.

XLA fuses a cheap elementwise producer into every consumer that reads it, recomputing it in
each; an "expensive" operation such as a division is not duplicated that way. On CPU that
choice matters for IVON in two places: the new Hessian h' is read both by the state output and
by the step, and a flat noise draw for many small leaves is read by one slice per leaf. Ending
such a value in a division makes XLA compute it once (and, for h', write it straight into the
donated state buffer), instead of re-reading its inputs in every consumer or compiling a copy
of the noise generator into every leaf's kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def materialize(x: jax.Array) -> jax.Array:
    """``x`` itself, bit for bit, ending in a division XLA cannot simplify away.

    ``x / where(isnan(x), x, 1)``: x / 1 = x exactly for every non-NaN x (±0 and ±inf
    included) and NaN stays NaN. A division by a scalar would be rewritten by XLA into a
    multiplication by its reciprocal (which is duplicated again); a division by the
    constant 1 would be removed.
    """
    return x / jnp.where(jnp.isnan(x), x, jnp.ones((), x.dtype))
