"""Keys to standard-normal noise, one draw per parameter leaf, sharded like the leaf.

Two generators:

``"fast"`` (default)
  A counter-based generator written for IVON's perturbation: one 32-bit word per element,
  ``H(c) = mix(mix(c + k₀) ^ k₁)``, where ``mix`` is a full-avalanche 32-bit integer bijection
  (xor-shifts and two multiplications), ``c`` the element's counter (its row-major index plus
  the number of elements drawn before its leaf in the same call, so no two elements of a call
  share one) and ``(k₀, k₁)`` the key's two words, ``k₁`` xor-ed with a constant for the leaf.
  The word becomes ``r cos θ``, one coordinate of a Box–Muller pair: ``r = sqrt(-2 ln u₁)``
  with u₁ from 21 bits (at cell midpoints, so ``|z| ≤ 5.52``: a normal exceeds that with
  probability 3e-8), ``ln`` by exponent plus mantissa polynomial (relative error < 1.5e-7),
  and θ from the other 11 bits: 2048 equally spaced angles, for which every moment of ``cos θ``
  below order 2048 equals the continuous one; ``cos`` by a polynomial on [-π/2, π/2] (error
  < 1e-7) and a sign bit. For a leaf above ``SMALL_LEAF`` elements everything is elementwise
  on an iota in the leaf's shape, so it fuses into the pass that forms θ = m + σε and
  partitions with the leaf's sharding; smaller leaves share one flat draw. The same key
  gives the same noise, and no state is carried. On CPU it is several times cheaper than
  threefry plus the inverse error function (the cost is arithmetic, not memory).
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


def _cos_pi(x: jax.Array) -> jax.Array:
    """cos(πx) for x in [-1/2, 1/2] by its Taylor polynomial (error < 1e-7)."""
    a = jnp.float32(np.pi) * x
    a2 = a * a
    return 1 + a2 * (-1 / 2 + a2 * (1 / 24 + a2 * (-1 / 720 + a2 * (1 / 40320 + a2 * (
        -1 / 3628800 + a2 * (1 / 479001600))))))


def _small_to_float(x: jax.Array) -> jax.Array:
    """float32 of a uint32 below 2^31, converted as int32: x86 has no vector instruction for
    unsigned conversion below AVX-512, and LLVM then falls back to scalar code (slow to run and,
    in the small unrolled kernels of small leaves, very slow to compile)."""
    return jax.lax.bitcast_convert_type(x, jnp.int32).astype(jnp.float32)


# ln(1+t) ≈ t - t²/2 + t³ Q(t) on [√½ - 1, √2 - 1]: Q's coefficients were fitted here by
# weighted least squares on Chebyshev nodes (relative error of ln < 1.5e-7 in float32).
_LOG_Q = (
    0.33333972564698333, -0.25000969371180115, 0.19960596533933192, -0.16587949064471846,
    0.14950979494179997, -0.1419747179648397, 0.08506953377737567,
)


def _log_unit(u: jax.Array) -> jax.Array:
    """ln u for normal float32 u > 0 (here u in (0, 1)): the exponent plus a polynomial in
    the mantissa, reduced to [√½, √2). About half the cost of ``jnp.log`` on CPU, which also
    handles zeros, subnormals, negatives and infinities."""
    bits = jax.lax.bitcast_convert_type(u, jnp.uint32) + jnp.uint32(0x3F800000 - 0x3F3504F3)
    e = _small_to_float(bits >> 23) - jnp.float32(127.0)
    m = jax.lax.bitcast_convert_type(
        (bits & jnp.uint32(0x007FFFFF)) + jnp.uint32(0x3F3504F3), jnp.float32
    )
    t = m - jnp.float32(1.0)
    q = jnp.float32(_LOG_Q[-1])
    for coefficient in _LOG_Q[-2::-1]:
        q = q * t + jnp.float32(coefficient)
    t2 = t * t
    return e * jnp.float32(np.log(2.0)) + (t - jnp.float32(0.5) * t2 + t2 * t * q)


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


def _normal_from_counter(counter: jax.Array, k0: jax.Array, k1: jax.Array) -> jax.Array:
    """One float32 standard normal per uint32 counter (see the module docstring)."""
    h = _mix32(_mix32(counter + k0) ^ k1)
    # u₁ in (0, 1) from the top 21 bits, at the midpoints of 2^21 cells: -2 log u₁ ≤ 30.5.
    u1 = _small_to_float(h >> 11) * jnp.float32(2.0**-21) + jnp.float32(2.0**-22)
    s = jnp.float32(-2.0) * _log_unit(u1)
    # θ/π - 1/2 in (-1/2, 1/2) from 10 more bits (again at midpoints), the lowest bit picks
    # the half circle: θ takes 2048 equally spaced values, which reproduces every moment of
    # cos θ below order 2048 exactly.
    t = _small_to_float((h >> 1) & jnp.uint32(0x3FF)) * jnp.float32(2.0**-10)
    c = _cos_pi(t + jnp.float32(2.0**-11 - 0.5))
    c = jnp.where((h & jnp.uint32(1)) == 1, c, -c)
    return jnp.sqrt(s) * c


# Leaves up to this many elements (biases, norm scales) are drawn together in one flat vector
# per dtype: one generator instead of one per leaf keeps compile time down with many small
# leaves. Such a leaf's noise is drawn whole on every device if the leaf is sharded over Auto
# mesh axes (negligible at this size). Larger leaves are drawn in their own shape, so the
# draw partitions with their sharding.
SMALL_LEAF = 1 << 12
# With more small leaves than this in a dtype, their draw is scaled by 1/σ in one flat kernel
# (faster to compile with many leaves); with fewer, each leaf scales its own slice (two fewer
# kernels per step, which matters for tiny models).
FLAT_SCALE_MIN = 16


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
    each leaf above ``SMALL_LEAF`` elements has its own draw, and smaller leaves share one
    flat draw per dtype.

    With ``precisions`` (one array like each leaf, in its dtype), leaf ``i`` gets
    ``ε_i / sqrt(precisions[i])`` instead (to rounding, the same numbers as dividing
    afterwards). With more than ``FLAT_SCALE_MIN`` small leaves their flat draw is then scaled
    in one flat kernel and computed once: each leaf's kernel only reads its slice, which on
    CPU compiles several times faster than a per-leaf copy of the generator and the square
    root (200 small leaves: the whole IVON step compiled in 5.0 s instead of 7.1 s).
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
    # Every draw below hashes the counters offset + (its row-major element index), offset
    # being the number of elements drawn before it in this call, under the key words
    # (k0, k1 ^ C), C a constant for the leaf or flat group: within a call no two elements
    # share a counter (below 2^32 elements in all), and C keeps the draws apart beyond that.
    small: dict[Any, list[int]] = {}
    offset = 0

    def draw(shape: tuple[int, ...], constant: int) -> jax.Array:
        nonlocal offset
        z = _normal_from_counter(
            _counters(shape, k0 + jnp.uint32(offset % 2**32)),
            jnp.uint32(0),
            k1 ^ jnp.uint32(_leaf_constant(constant)),
        )
        offset += int(np.prod(shape, dtype=np.int64))
        return z

    for i, spec in enumerate(shapes_dtypes):
        if spec is None:
            continue
        shape, dtype, sharding = spec
        shape = tuple(shape)
        size = int(np.prod(shape, dtype=np.int64))
        if sharding is not None:
            z = jax.random.normal(jax.random.fold_in(key, i), shape, dtype, out_sharding=sharding)
            out[i] = scaled(i, z)
        elif size <= SMALL_LEAF:
            small.setdefault(jnp.dtype(dtype), []).append(i)
        else:
            out[i] = scaled(i, draw(shape, i).astype(dtype))
    # Small leaves share one flat draw per dtype. By default XLA fuses each leaf's slice of
    # it, with the generator, into the leaf's own kernel (every element is still computed
    # once). With many leaves the division by sqrt(precision) happens on the flat draw, which
    # is then materialised: a kernel that slices a materialised array *and* takes a square
    # root compiles slowly on CPU, one that only slices does not.
    for group, (dtype, members) in enumerate(small.items()):
        sizes = [int(np.prod(shapes_dtypes[i][0], dtype=np.int64)) for i in members]
        flat = draw((sum(sizes),), n + group).astype(dtype)
        flat_scaled = precisions is not None and len(members) > FLAT_SCALE_MIN
        if flat_scaled:
            flat_precision = jnp.concatenate([precisions[i].reshape(-1) for i in members])
            flat = fusion.materialize(flat / jnp.sqrt(flat_precision))
        start = 0
        for i, size in zip(members, sizes, strict=True):
            z = flat[start : start + size].reshape(shapes_dtypes[i][0])
            out[i] = z if flat_scaled else scaled(i, z)
            start += size
    return out
