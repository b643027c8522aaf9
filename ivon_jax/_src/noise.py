"""Keys to standard-normal noise, one draw per parameter leaf, sharded like the leaf.

Two generators:

``"fast"`` (default)
  A counter-based generator written for IVON's perturbation: one 32-bit word per element,
  ``H(c) = mix(mix(c + k₀) ^ k₁)``, where ``mix`` is a full-avalanche 32-bit integer bijection
  (xor-shifts and two multiplications), ``c`` the element's counter (its row-major index plus
  the number of elements drawn before its leaf in the same call, so no two elements of a call
  share one) and ``(k₀, k₁)`` the key's two words, ``k₁`` xor-ed with a constant for the leaf.
  The word becomes ``r cos θ``, one coordinate of a Box–Muller pair: ``r = sqrt(-2 ln u₁)``
  with u₁ from the top 21 bits (at cell midpoints, so ``|z| ≤ 5.52``: a normal exceeds that
  with probability 3e-8), ``-2 ln u₁`` from the exponent and a degree-7 polynomial in the
  mantissa (relative error < 3e-7), and θ from the low 11 bits: 2048 equally spaced angles,
  for which every moment of ``cos θ`` below order 2048 equals the continuous one; ``cos`` by a
  degree-8 polynomial on [-π/2, π/2] and a sign bit (error < 2.5e-7 with float32 rounding).
  Scaled by 1/sqrt(precision), as IVON's σ ⊙ ε, it is ``sqrt(-2 ln u₁ / precision) cos θ``.
  For a leaf above ``SMALL_LEAF`` elements everything is elementwise on an iota in the
  leaf's shape, so it fuses into the pass that forms θ = m + σε and partitions with the
  leaf's sharding; smaller leaves share one flat draw. A leaf's counter offset and constant
  reach its kernel as data, so leaves of the same shape share one compiled kernel. The same
  key gives the same noise, and no state is carried. On CPU it is several times cheaper than
  threefry plus the inverse error function.
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

from ivon_jax._src import fusion

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


def _mix32(x: jax.Array) -> jax.Array:
    # A 32-bit integer bijection with full avalanche: xor-shift / multiply rounds with the
    # constants of the "lowbias32" hash from Wellons' hash-prospector search.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _small_to_float(x: jax.Array) -> jax.Array:
    """float32 of a uint32 below 2^31, converted as int32: x86 has no vector instruction for
    unsigned conversion below AVX-512, and LLVM then falls back to scalar code (slow to run and,
    in the small unrolled kernels of small leaves, very slow to compile)."""
    return jax.lax.bitcast_convert_type(x, jnp.int32).astype(jnp.float32)


def _horner(x: jax.Array, coefficients: Sequence[float]) -> jax.Array:
    q = jnp.float32(coefficients[-1])
    for c in coefficients[-2::-1]:
        q = q * x + jnp.float32(c)
    return q


# ln(1+t) = t R(t) on [√½ - 1, √2 - 1], R of degree 7 fitted here (least squares on Chebyshev
# nodes, reweighted towards the minimax fit): -2 ln u₁ is then within a relative 3e-7 of
# float64 on every value u₁ takes (a test checks all 2^21).
_LOG_R = (
    0.9999999453093248, -0.5000036512339981, 0.33335058949793117, -0.24969909067738674,
    0.19900165331507494, -0.17250829519364982, 0.1622258151193595, -0.10106897442345023,
)
# cos a = C(a²) on [-π/2, π/2], C of degree 4 fitted the same way (error < 1.1e-7; < 2.5e-7
# with the float32 roundings of the angle and the polynomial, which a test checks).
_COS_C = (
    0.9999999534666574, -0.49999905347062484, 0.041663584692819944, -0.0013853704306369397,
    2.3153931621389123e-05,
)


def _radius_squared(h: jax.Array) -> jax.Array:
    """-2 ln u₁ for u₁ = (2k + 1) / 2^22, k the top 21 bits of the word h: u₁ is uniform on
    the midpoints of 2^21 equal cells, so -2 ln u₁ ≤ 44 ln 2 ≈ 30.5 (|z| ≤ 5.52).

    j = 2k + 1 converts to float32 exactly; j = 2^e (1 + t) with 1 + t in [√½, √2) (from the
    exponent and mantissa bits, t exact), so -2 ln u₁ = 2 ln 2 (22 - e) - 2 t R(t).
    """
    j = _small_to_float((h >> 10) | jnp.uint32(1))
    bits = jax.lax.bitcast_convert_type(j, jnp.uint32) + jnp.uint32(0x3F800000 - 0x3F3504F3)
    twenty_two_minus_e = _small_to_float(jnp.uint32(127 + 22) - (bits >> 23))
    t = jax.lax.bitcast_convert_type(
        (bits & jnp.uint32(0x007FFFFF)) + jnp.uint32(0x3F3504F3), jnp.float32
    ) - jnp.float32(1.0)
    two_r = [2 * c for c in _LOG_R]
    return twenty_two_minus_e * jnp.float32(2 * np.log(2.0)) - t * _horner(t, two_r)


def _signed_cos(h: jax.Array) -> jax.Array:
    """cos θ for θ uniform on 2048 equally spaced angles: bits 1–10 of the word h pick one of
    1024 angles in (-π/2, π/2) (cell midpoints), bit 0 the half circle (the sign)."""
    a = _small_to_float((h >> 1) & jnp.uint32(0x3FF)) * jnp.float32(np.pi / 1024)
    a = a + jnp.float32(np.pi / 2048 - np.pi / 2)
    c = jax.lax.bitcast_convert_type(_horner(a * a, _COS_C), jnp.uint32)
    return jax.lax.bitcast_convert_type(c ^ (h << 31), jnp.float32)


def _key_words(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two uint32 words from a key (typed or raw), folding in any extra words."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    data = data.reshape(-1).astype(jnp.uint32)
    k0, k1 = data[0], data[1]
    for i in range(2, data.shape[0]):
        if i % 2:
            k1 = _mix32(k1 ^ data[i])
        else:
            k0 = _mix32(k0 ^ data[i])
    return k0, k1


def _leaf_constant(i: int) -> int:
    """A well-mixed 32-bit constant for leaf ``i`` (the same bijection, in Python)."""
    x = (i + 1) * 0x9E3779B9 & 0xFFFFFFFF
    x ^= x >> 16
    x = x * 0x7FEB352D & 0xFFFFFFFF
    x ^= x >> 15
    x = x * 0x846CA68B & 0xFFFFFFFF
    return x ^ (x >> 16)


def _counters(shape: tuple[int, ...], start: jax.Array) -> jax.Array:
    """``start`` + row-major element index (mod 2^32) in ``shape``, from broadcast iotas.

    No reshape, so the counters partition like a leaf of this shape. ``start`` is added to
    the last axis's iota before any broadcast, so no intermediate larger than one axis is
    independent of the key: under ``lax.scan`` over samples XLA would otherwise hoist such an
    index array out of the loop and keep it alive as one more parameter-sized buffer.
    """
    if not shape:
        return start
    index = None
    stride = 1
    for d in reversed(range(len(shape))):
        dims = [1] * len(shape)
        dims[d] = shape[d]
        term = jax.lax.broadcasted_iota(jnp.uint32, tuple(dims), d) * jnp.uint32(stride % 2**32)
        index = term + start if index is None else term + index
        stride *= shape[d]
    return jnp.broadcast_to(index, shape)


def _normal_from_counter(
    counter: jax.Array, k0: jax.Array, k1: jax.Array, precision: jax.Array | None = None
) -> jax.Array:
    """One standard normal per uint32 counter (see the module docstring), in float32; with
    ``precision`` (broadcastable to the counters), the normal divided by its square root, in
    the precision's dtype, as ``sqrt(-2 ln u₁ / precision) cos θ`` (one square root, not two)."""
    h = _mix32(_mix32(counter + k0) ^ k1)
    s, c = _radius_squared(h), _signed_cos(h)
    if precision is None:
        return jnp.sqrt(s) * c
    dt = jnp.result_type(precision)  # float32, or float64 statistics under x64
    return jnp.sqrt(s.astype(dt) / precision) * c.astype(dt)


# Leaves up to this many elements (biases, norm scales) are drawn together in one flat vector
# per dtype: one generator for all of them keeps compile time down with many small leaves.
# Such a leaf's noise is drawn whole on every device if the leaf is sharded over Auto mesh
# axes (negligible at this size). Larger leaves are drawn in their own shape, so the draw
# partitions with their sharding.
SMALL_LEAF = 1 << 12


def _runtime_words(anchor: jax.Array, words: Sequence[tuple[int, int]]) -> list[jax.Array]:
    """Each pair of Python ints as a ``uint32[2]`` array that XLA sees as data, not constants.

    XLA:CPU compiles each distinct kernel separately (about 10–60 ms each) and compiles
    identical kernels once. A leaf's draw differs from another leaf's of the same shape only
    in its two words (counter offset and leaf constant); written into the kernel as constants
    they make every leaf's kernel distinct. Passed through one stable sort on equal runtime
    keys (``anchor``, from the PRNG key), which leaves them unchanged but cannot be
    constant-folded, they arrive as buffers, and same-shape leaves share one compiled kernel
    (the sort itself is one small kernel). ``sample_params`` for 200 leaves of 16x16 compiled
    in 1.1 s instead of 4.6 s with the flat draw sliced at constant offsets.
    """
    if not words:
        return []
    keys = jnp.broadcast_to(anchor, (2,))
    payload = [jnp.asarray(np.asarray(w, np.uint32)) for w in words]
    return list(jax.lax.sort([keys, *payload], num_keys=1, is_stable=True)[1:])


def standard_normal_leaves(
    key: jax.Array,
    shapes_dtypes: Sequence[tuple[tuple[int, ...], jnp.dtype, Any] | None],
    generator: Generator = "fast",
    precisions: Sequence[jax.Array | None] | None = None,
) -> list[jax.Array | None]:
    """Draws ε ~ N(0, I) for each ``(shape, dtype, sharding)`` entry (``None`` gets ``None``).

    The noise is a deterministic function of the key and of the list of shapes: the same
    key gives the same noise, and different leaves are independent. A non-``None`` sharding
    (explicit mesh axes) is passed as ``out_sharding`` to ``jax.random.normal`` so the draw
    happens shard by shard.

    With ``"threefry"`` leaf ``i`` uses ``jax.random.split(key, n)[i]``. With ``"fast"``
    each leaf above ``SMALL_LEAF`` elements is drawn in its own shape, in one kernel with
    whatever consumes it; smaller leaves read their blocks of one flat draw per dtype. Either
    way leaves of the same shape and dtype share one compiled kernel (see ``_runtime_words``).

    With ``precisions`` (one array like each leaf, in its dtype), leaf ``i`` gets
    ``ε_i / sqrt(precisions[i])`` instead (to rounding, the same numbers as dividing
    afterwards).
    """
    check_generator(generator)
    n = len(shapes_dtypes)
    if n == 0:
        return []
    out: list[jax.Array | None] = [None] * n

    def scaled(i: int, z: jax.Array) -> jax.Array:
        return z if precisions is None else z / jnp.sqrt(precisions[i])

    if generator == "threefry":
        keys = jax.random.split(key, n)
        for i, spec in enumerate(shapes_dtypes):
            if spec is not None:
                shape, dtype, sharding = spec
                z = jax.random.normal(keys[i], shape, dtype, out_sharding=sharding)
                out[i] = scaled(i, z)
        return out
    k0, k1 = _key_words(key)
    # Every draw hashes the counters offset + (its row-major element index) under the key
    # words (k0, k1 ^ C), offset being the number of elements drawn before it in this call
    # and C a constant for the leaf or flat group: within a call no two elements share a
    # counter (below 2^32 elements in all), and C keeps the draws apart beyond that.
    large: list[int] = []
    small: dict[Any, list[int]] = {}
    words: list[tuple[int, int]] = []
    offset = 0
    for i, spec in enumerate(shapes_dtypes):
        if spec is None:
            continue
        shape, dtype, sharding = spec
        size = int(np.prod(shape, dtype=np.int64))
        if sharding is not None:
            z = jax.random.normal(jax.random.fold_in(key, i), shape, dtype, out_sharding=sharding)
            out[i] = scaled(i, z)
        elif size > SMALL_LEAF:
            large.append(i)
            words.append((offset % 2**32, _leaf_constant(i)))
            offset += size
        else:
            small.setdefault(jnp.dtype(dtype), []).append(i)
    # Small leaves: one flat draw per dtype, computed once; each leaf reads its block at an
    # offset given as data, so same-shape leaves share one compiled kernel.
    flat_draws = []
    blocks: list[tuple[int, int, int]] = []  # (leaf, its group's flat draw, block size)
    starts: list[tuple[int, int]] = []  # (block start, 0): the sort's words come in pairs
    for group, (dtype, members) in enumerate(small.items()):
        start = 0
        for i in members:
            size = int(np.prod(shapes_dtypes[i][0], dtype=np.int64))
            blocks.append((i, group, size))
            starts.append((start, 0))
            start += size
        z = _normal_from_counter(
            _counters((start,), k0 + jnp.uint32(offset % 2**32)),
            jnp.uint32(0),
            k1 ^ jnp.uint32(_leaf_constant(n + group)),
        )
        offset += start
        flat_draws.append(fusion.materialize(z.astype(dtype)))
    runtime = _runtime_words(k0, words + starts)
    for i, w in zip(large, runtime[: len(large)], strict=True):
        shape, dtype, _ = shapes_dtypes[i]
        precision = None if precisions is None else precisions[i]
        z = _normal_from_counter(
            _counters(tuple(shape), k0 + w[0]), jnp.uint32(0), k1 ^ w[1], precision
        )
        out[i] = z.astype(dtype)
    for (i, group, size), w in zip(blocks, runtime[len(large) :], strict=True):
        block = jax.lax.dynamic_slice(flat_draws[group], (w[0],), (size,))
        out[i] = scaled(i, block.reshape(shapes_dtypes[i][0]))
    return out
