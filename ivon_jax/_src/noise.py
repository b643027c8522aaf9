"""Keys to standard-normal noise, one draw per parameter leaf, sharded like the leaf."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def explicit_sharding(x: Any) -> jax.sharding.NamedSharding | None:
    """The sharding of ``x`` when it is sharded over explicit mesh axes, else ``None``.

    With explicit sharding the noise must be drawn with the parameter's sharding (each
    device draws only its block); with automatic sharding XLA propagates it by itself.
    """
    sharding = jax.typeof(x).sharding
    if all(p is None for p in sharding.spec):
        return None
    return sharding


def standard_normal_leaves(
    key: jax.Array,
    shapes_dtypes: Sequence[tuple[tuple[int, ...], jnp.dtype, Any] | None],
) -> list[jax.Array | None]:
    """Draws ε ~ N(0, I) for each ``(shape, dtype, sharding)`` entry (``None`` gets ``None``).

    Leaf ``i`` uses ``jax.random.split(key, n)[i]`` with ``n = len(shapes_dtypes)``, so the
    noise of a leaf depends only on the key, the number of leaves and its position: the
    same key gives the same noise, and different leaves are independent. A non-``None``
    sharding is passed as ``out_sharding`` so the draw happens shard by shard.
    """
    n = len(shapes_dtypes)
    if n == 0:
        return []
    keys = jax.random.split(key, n)
    out: list[jax.Array | None] = []
    for i, spec in enumerate(shapes_dtypes):
        if spec is None:
            out.append(None)
            continue
        shape, dtype, sharding = spec
        if sharding is None:
            out.append(jax.random.normal(keys[i], shape, dtype))
        else:
            out.append(jax.random.normal(keys[i], shape, dtype, out_sharding=sharding))
    return out
