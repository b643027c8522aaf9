"""Keys to standard-normal noise, one draw per parameter leaf, sharded like the leaf.

Two generators:

``"fast"`` (default)
  A counter-based generator written for IVON's perturbation. Element i of a leaf (row-major
  index) gets two 32-bit words ``H(2i)`` and ``H(2i + 1)``, where ``H`` is a keyed integer
  hash (three rounds of the murmur3 finaliser with a 64-bit key mixed in between: the call's
  key words, the first xor-ed with a constant for the leaf), and returns ``r cos θ`` — one
  coordinate of the Box–Muller pair, exactly N(0, 1) for θ uniform on the circle: ``r =
  sqrt(-2 log u₁)`` with u₁ from 24 bits (tails reach 5.8σ), θ from 23 bits of the other word
  and a sign from one more bit, cos by a short polynomial on [-π/2, π/2) (error < 1e-7). For a
  leaf above ``SMALL_LEAF`` elements everything is elementwise on an iota in the leaf's shape,
  so it fuses into one pass and partitions with the leaf's sharding; smaller leaves share one
  flat draw. Counter-based: the same key gives the same noise, no state is carried. On CPU it
  is several times cheaper than threefry plus the inverse error function.
``"threefry"``
  ``jax.random.normal`` with ``jax.random.split(key, n)[i]`` for leaf i (JAX's default
  generator).

Leaves sharded over *explicit* mesh axes always use ``jax.random.normal`` with
``out_sharding`` (each device draws only its block), keyed by ``fold_in(key, i)``.
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


def _key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 words from a key (typed or raw), folding in any extra words."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = data.reshape(-1).astype(jnp.uint32)
    k0, k1 = data[0], data[1]
    for i in range(2, data.shape[0]):
        if i % 2:
            k1 = _fmix32(k1 ^ data[i])
        else:
            k0 = _fmix32(k0 ^ data[i])
    return k0, k1


def _leaf_constant(i: int) -> int:
    """A well-mixed 32-bit constant for leaf ``i`` (murmur3 finaliser, in Python)."""
    x = (i + 1) * 0x9E3779B9 & 0xFFFFFFFF
    x ^= x >> 16
    x = x * 0x85EBCA6B & 0xFFFFFFFF
    x ^= x >> 13
    x = x * 0xC2B2AE35 & 0xFFFFFFFF
    return x ^ (x >> 16)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2^32) in ``shape``, built from iotas: no reshape."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, d)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return index


def _normal_from_counter(counter: jax.Array, k0: jax.Array, k1: jax.Array) -> jax.Array:
    """One float32 standard normal per uint32 counter (see the module docstring)."""
    counter = counter * jnp.uint32(2)
    h1 = _hash(counter, k0, k1)
    h2 = _hash(counter + jnp.uint32(1), k0, k1)
    # u₁ in (0, 1] from 24 bits: log stays finite; r = sqrt(-2 log u₁) ≤ 5.77.
    u1 = ((h1 >> 8).astype(jnp.float32) + jnp.float32(1.0)) * jnp.float32(2.0**-24)
    r = jnp.sqrt(jnp.float32(-2.0) * jnp.log(u1))
    c = _cos_pi(_unit_float(h2) - jnp.float32(0.5))
    return r * jnp.where((h2 & jnp.uint32(1)) == 1, c, -c)  # the sign completes the circle


# Leaves up to this many elements (biases, norm scales) are drawn together in one flat vector
# per dtype: one generator instead of one per leaf keeps compile time down with many small
# leaves. Such a leaf's noise is drawn whole on every device if the leaf is sharded over Auto
# mesh axes (negligible at this size). Larger leaves are drawn in their own shape, so the
# draw partitions with their sharding.
SMALL_LEAF = 1 << 12


def standard_normal_leaves(
    key: jax.Array,
    shapes_dtypes: Sequence[tuple[tuple[int, ...], jnp.dtype, Any] | None],
    generator: Generator = "fast",
) -> list[jax.Array | None]:
    """Draws ε ~ N(0, I) for each ``(shape, dtype, sharding)`` entry (``None`` gets ``None``).

    The noise is a deterministic function of the key and of the list of shapes: the same
    key gives the same noise, and different leaves are independent. A non-``None`` sharding
    (explicit mesh axes) is passed as ``out_sharding`` to ``jax.random.normal`` so the draw
    happens shard by shard.

    With ``"threefry"`` leaf ``i`` uses ``jax.random.split(key, n)[i]``. With ``"fast"``
    leaf ``i`` hashes its element indices under the key's words mixed with a constant for
    ``i``; leaves of at most ``SMALL_LEAF`` elements share one flat draw per dtype, leaf
    ``i`` taking the counters from its offset there.
    """
    check_generator(generator)
    n = len(shapes_dtypes)
    if n == 0:
        return []
    out: list[jax.Array | None] = [None] * n
    if generator == "threefry":
        keys = jax.random.split(key, n)
        for i, spec in enumerate(shapes_dtypes):
            if spec is not None:
                shape, dtype, sharding = spec
                out[i] = jax.random.normal(keys[i], shape, dtype, out_sharding=sharding)
        return out
    k0, k1 = _key_words(key)
    small: dict[Any, list[int]] = {}
    for i, spec in enumerate(shapes_dtypes):
        if spec is None:
            continue
        shape, dtype, sharding = spec
        size = int(np.prod(shape, dtype=np.int64))
        if sharding is not None:
            leaf_key = jax.random.fold_in(key, i)
            out[i] = jax.random.normal(leaf_key, shape, dtype, out_sharding=sharding)
        elif size <= SMALL_LEAF:
            small.setdefault(jnp.dtype(dtype), []).append(i)
        else:
            k0_i = k0 ^ jnp.uint32(_leaf_constant(i))
            out[i] = _normal_from_counter(_flat_index(tuple(shape)), k0_i, k1).astype(dtype)
    for group, (dtype, members) in enumerate(small.items()):
        sizes = [int(np.prod(shapes_dtypes[i][0], dtype=np.int64)) for i in members]
        k0_g = k0 ^ jnp.uint32(_leaf_constant(n + group))
        flat = _normal_from_counter(jax.lax.iota(jnp.uint32, sum(sizes)), k0_g, k1)
        offset = 0
        for i, size in zip(members, sizes, strict=True):
            out[i] = flat[offset : offset + size].reshape(shapes_dtypes[i][0]).astype(dtype)
            offset += size
    return out
