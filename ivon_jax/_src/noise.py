"""Keys to standard-normal noise, one draw per parameter leaf."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def standard_normal_leaves(
    key: jax.Array, shapes_dtypes: Sequence[tuple[tuple[int, ...], jnp.dtype] | None]
) -> list[jax.Array | None]:
    """Draws ε ~ N(0, I) for each entry of ``shapes_dtypes`` (``None`` entries get ``None``).

    Leaf ``i`` uses ``jax.random.split(key, n)[i]`` with ``n = len(shapes_dtypes)``, so the
    noise of a leaf depends only on the key, the number of leaves and its position: the
    same key gives the same noise, and different leaves are independent.
    """
    n = len(shapes_dtypes)
    if n == 0:
        return []
    keys = jax.random.split(key, n)
    return [
        None if sd is None else jax.random.normal(keys[i], sd[0], sd[1])
        for i, sd in enumerate(shapes_dtypes)
    ]
