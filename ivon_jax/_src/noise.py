"""Keys to standard-normal noise, one draw per parameter leaf, sharded like the leaf.

Two generators:

``"fast"`` (default)
  A counter-based generator written for IVON's perturbation. Element i of a leaf (row-major
  index) gets two 32-bit words ``H(2i)`` and ``H(2i + 1)``, where ``H`` is a keyed integer
  hash (three rounds of the murmur3 finaliser with the leaf's 64-bit key mixed in between),
  and returns ``r cos θ`` — one coordinate of the Box–Muller pair, exactly N(0, 1) for θ
  uniform on the circle: ``r = sqrt(-2 log u₁)`` with u₁ from 24 bits (tails reach 5.8σ),
  θ from 23 bits of the other word and a sign from one more bit, cos by a short polynomial
  on [-π/2, π/2) (error < 1e-7). Everything is elementwise on an iota in the leaf's shape,
  so it fuses into one pass and partitions with the leaf's sharding. Counter-based: the same
  key gives the same noise, no state is carried. On CPU it is several times cheaper than
  threefry plus the inverse error function.
``"threefry"``
  ``jax.random.normal`` with the key as given (JAX's default generator).

Leaves sharded over *explicit* mesh axes always use ``jax.random.normal`` with
``out_sharding`` (each device draws only its block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

GENERATORS = ("fast", "threefry")
Generator = Literal["fast", "threefry"]


def check_generator(generator: str) -> None:
    if generator not in GENERATORS:
        raise ValueError(
            f"ivon_jax: unknown noise generator {generator!r}; expected one of {GENERATORS}."
        )


def explicit_sharding(x: Any) -> jax.sharding.NamedSharding | None:
    """The sharding of ``x`` when it is sharded over explicit mesh axes, else ``None``.

    With explicit sharding the noise must be drawn with the parameter's sharding (each
    device draws only its block); with automatic sharding XLA propagates it by itself.
    """
    sharding = jax.typeof(x).sharding
    if all(p is None for p in sharding.spec):
        return None
    return sharding


def _fmix32(x: jax.Array) -> jax.Array:
    # murmur3's 32-bit finaliser: a bijection with full avalanche.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _hash(counter: jax.Array, k0: jax.Array, k1: jax.Array) -> jax.Array:
    x = _fmix32(counter * jnp.uint32(0x9E3779B9) + k0)
    x = _fmix32(x ^ k1)
    return _fmix32(x + (k0 ^ jnp.uint32(0x5BD1E995)))


def _unit_float(bits: jax.Array) -> jax.Array:
    """The top 23 bits as a float32 in [0, 1)."""
    one = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    return one - jnp.float32(1.0)


def _cos_pi(x: jax.Array) -> jax.Array:
    """cos(πx) for x in [-1/2, 1/2) by its Taylor polynomial (error < 1e-7)."""
    a = jnp.float32(np.pi) * x
    a2 = a * a
    return 1 + a2 * (-1 / 2 + a2 * (1 / 24 + a2 * (-1 / 720 + a2 * (1 / 40320 + a2 * (
        -1 / 3628800 + a2 * (1 / 479001600))))))


def _key_words(keys: jax.Array) -> jax.Array:
    """(n, 2) uint32 words from n keys (typed or raw), folding in any extra words."""
    data = jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
    data = data.reshape(data.shape[0], -1).astype(jnp.uint32)
    words = data[:, :2]
    for i in range(2, data.shape[1]):
        words = words.at[:, i % 2].set(_fmix32(words[:, i % 2] ^ data[:, i]))
    return words


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2^32) in ``shape``, built from iotas: no reshape."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, d)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return index


def fast_normal(words: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Standard normals of ``shape`` from the two uint32 key ``words``."""
    k0, k1 = words[0], words[1]
    counter = _flat_index(tuple(shape)) * jnp.uint32(2)
    h1 = _hash(counter, k0, k1)
    h2 = _hash(counter + jnp.uint32(1), k0, k1)
    # u₁ in (0, 1] from 24 bits: log stays finite; r = sqrt(-2 log u₁) ≤ 5.77.
    u1 = ((h1 >> 8).astype(jnp.float32) + jnp.float32(1.0)) * jnp.float32(2.0**-24)
    r = jnp.sqrt(jnp.float32(-2.0) * jnp.log(u1))
    c = _cos_pi(_unit_float(h2) - jnp.float32(0.5))
    z = r * jnp.where((h2 & jnp.uint32(1)) == 1, c, -c)  # the sign completes the circle
    return z.astype(dtype)


def standard_normal_leaves(
    key: jax.Array,
    shapes_dtypes: Sequence[tuple[tuple[int, ...], jnp.dtype, Any] | None],
    generator: Generator = "fast",
) -> list[jax.Array | None]:
    """Draws ε ~ N(0, I) for each ``(shape, dtype, sharding)`` entry (``None`` gets ``None``).

    Leaf ``i`` uses ``jax.random.split(key, n)[i]`` with ``n = len(shapes_dtypes)``, so the
    noise of a leaf depends only on the key, the number of leaves and its position: the
    same key gives the same noise, and different leaves are independent. A non-``None``
    sharding is passed as ``out_sharding`` so the draw happens shard by shard.
    """
    check_generator(generator)
    n = len(shapes_dtypes)
    if n == 0:
        return []
    keys = jax.random.split(key, n)
    words = _key_words(keys) if generator == "fast" else None
    out: list[jax.Array | None] = []
    for i, spec in enumerate(shapes_dtypes):
        if spec is None:
            out.append(None)
            continue
        shape, dtype, sharding = spec
        if sharding is not None:
            out.append(jax.random.normal(keys[i], shape, dtype, out_sharding=sharding))
        elif generator == "fast":
            out.append(fast_normal(words[i], shape, dtype))
        else:
            out.append(jax.random.normal(keys[i], shape, dtype))
    return out
