"""Steering XLA's fusion from JAX: make a value be computed once, in its own kernel.

XLA fuses a cheap elementwise producer into every consumer that reads it, recomputing it in
each; an "expensive" operation such as a division is not duplicated that way. On CPU this
matters for IVON's new Hessian h', read both by the state output and by the step: ending h' in
a division makes XLA write it once, straight into the donated state buffer, instead of keeping
a temporary that both consumers re-read (which also made XLA copy h and the parameters each
step). (The small leaves' shared noise draw is deliberately *not* materialised: slicing a
materialised draw per leaf was measured to compile about twice as slowly on CPU.)"""

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
