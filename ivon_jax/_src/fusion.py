"""Steering XLA's fusion from JAX: make a value be computed once, in its own kernel.

XLA fuses a cheap elementwise producer into every consumer that reads it, recomputing it in
each; an "expensive" operation such as a division is not duplicated that way. On CPU this
matters for IVON's new Hessian h', read both by the state output and by the step: ending h' in
a division makes XLA write it once, straight into the donated state buffer, instead of keeping
a temporary that both consumers re-read (which also made XLA copy h and the parameters each
step; an optimization barrier in its place brought those copies back when the non-finite guard
is off). The small leaves' shared noise draw is materialised too, and each leaf reads its
block at an offset given as data, so same-shape leaves share one compiled kernel (with the
offsets written in as constants, every leaf's slice was a kernel of its own)."""

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
