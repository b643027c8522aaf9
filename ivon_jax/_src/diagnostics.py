"""A few scalars that summarise an IVON state, for logging during training."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import posterior
from ivon_jax._src.state import hess_lower_bound
from ivon_jax._src.wrappers import SkipNonFiniteState

# The quantile levels reported for h and σ, with the suffix of their keys.
_QUANTILES = (("min", 0.0), ("p05", 0.05), ("p50", 0.5), ("p95", 0.95), ("max", 1.0))


def _is_skip_state(x: Any) -> bool:
    return isinstance(x, SkipNonFiniteState)


def _strided_concat(leaves: list[jax.Array], stride: int) -> jax.Array:
    # Every stride-th element of the concatenation of the flattened leaves, taken leaf by leaf
    # so that the full concatenation is never built when stride > 1.
    parts, start = [], 0
    for x in leaves:
        parts.append(jnp.ravel(x)[(-start) % stride :: stride])
        start += x.size
    return jnp.concatenate(parts)


def _nan_quantiles(x: jax.Array, levels: jax.Array) -> jax.Array:
    # numpy.nanquantile's "linear" method. jnp.nanquantile interpolates inf with weight 0
    # into NaN (inf * 0), so h_max would read NaN where h holds an inf.
    x = jnp.sort(x)  # NaNs sort last
    k = jnp.sum(~jnp.isnan(x), dtype=jnp.int32)
    pos = levels * (k - 1).astype(x.dtype)
    lo = jnp.floor(pos)
    lo_i = jnp.clip(lo.astype(jnp.int32), 0, x.size - 1)
    hi_i = jnp.clip(lo_i + 1, 0, jnp.maximum(k - 1, 0))
    a, b, frac = x[lo_i], x[hi_i], pos - lo
    values = jnp.where((frac == 0) | (a == b), a, a + (b - a) * frac)
    return jnp.where(k > 0, values, jnp.asarray(jnp.nan, x.dtype))


def state_summary(
    opt_state: optax.OptState,
    params: optax.Params | None = None,
    *,
    max_elements: int | None = None,
) -> dict[str, jax.Array]:
    r"""Summarises an IVON state into a few scalars to log during training.

    Statistics run over every element that an IVON transform manages, across all leaves and
    all IVON states in ``opt_state`` (``optax.chain``, ``masked``, ``multi_transform``,
    ``inject_hyperparams``, :func:`skip_nonfinite`, Flax ``nnx.Optimizer.opt_state``), each
    with its own λ and δ: :math:`\sigma = 1/\sqrt{\lambda (h + \delta)}` as in
    :func:`posterior_std`. Masked-out parameters are not counted.

    The returned keys are always the same, so log schemas are stable:

    - ``step``: IVON's step count (``IVONState.count``), int32. The IVON states of one
      optimizer are updated together, so their counts agree; the largest is reported.
    - ``skipped``: the number of steps skipped for non-finite gradients, by the default
      guard of :func:`ivon` or by the wrapper :func:`skip_nonfinite`, int32; 0 without
      either (``ivon(..., skip_nonfinite=False)``); the largest count if there are several
      (one per parameter group).
    - ``h_min``, ``h_p05``, ``h_p50``, ``h_p95``, ``h_max``, ``h_mean``: quantiles (0, 5, 50,
      95, 100 %, linearly interpolated as ``numpy.quantile``) and mean of h.
    - ``sigma_min`` … ``sigma_mean``: the same for σ.
    - ``frac_h_at_floor``: the fraction of elements where h is at (or below) the lower bound
      the update clamps it to, i.e. h + δ at its numerical floor. Many such elements mean
      ĥ pushed h down as far as it goes (often: ``hess_init`` or δ too small).
    - ``frac_h_negative``: the fraction with h < 0 (allowed: only h + δ > 0 is kept).
    - ``frac_h_nonfinite``: the fraction of NaN or ±inf in h; nonzero means σ is poisoned.

    Quantiles and means ignore NaN elements (they show in ``frac_h_nonfinite``), so one bad
    element does not hide the rest; they are NaN only if every element is NaN. The float
    values are in the widest dtype of the states' h (float32 unless x64 parameters).

    Cost: the fractions and means are reductions over all elements; the quantiles sort a
    float copy of h and of σ, O(n log n) for n managed elements, with two temporary copies of
    n elements. For large models, log every N steps or pass ``max_elements``.

    Args:
      opt_state: an optimizer state containing one or more IVON states.
      params: optional tree like the parameters. With it, the state is checked against it
        as :func:`posterior_std` does (shapes, no missing leaves); the summary is the same.
      max_elements: if given, the quantiles are computed on a deterministic strided subsample
        of at most this many elements (every k-th element of all leaves flattened and
        concatenated in tree order), which bounds the sort's cost. Means and fractions always
        use every element.

    Returns:
      A flat ``dict`` from the names above to scalar arrays. Pure ``jnp``: works under
      ``jax.jit``.

    Raises:
      ValueError: if ``opt_state`` holds no IVON state, no managed element, or ``max_elements``
        is not a positive integer.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=1.0, weight_decay=0.0)
      >>> summary = ivon_jax.state_summary(opt.init({"w": jnp.zeros(3)}))
      >>> float(summary["h_p50"]), round(float(summary["sigma_p50"]), 6), int(summary["step"])
      (1.0, 0.1, 0)
    """
    if max_elements is not None and (
        isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1
    ):
        raise ValueError(
            f"ivon_jax: `max_elements` must be a positive integer or None, got {max_elements!r}."
        )
    states = posterior.find_ivon_states(opt_state)
    if params is not None:
        managed = [m for m in posterior.managed_leaves(params, opt_state)[1] if m is not None]
    else:
        managed = []
        for st in states:
            managed += [m for _, m in posterior.state_managed(st)]
    n = sum(m.hess.size for m in managed)
    if n == 0:
        raise ValueError(
            "ivon_jax: the IVON state(s) manage no parameter element (everything masked out?); "
            "there is nothing to summarise."
        )
    dt = functools.reduce(jnp.promote_types, [m.hess.dtype for m in managed])

    step = jnp.max(jnp.stack([posterior._scalar(st.count) for st in states]))
    skips = [
        posterior._scalar(s.skipped)
        for s in jax.tree.leaves(opt_state, is_leaf=_is_skip_state)
        if _is_skip_state(s)
    ]
    skipped = jnp.max(jnp.stack(skips)) if skips else jnp.zeros([], jnp.int32)

    hs, sigmas = [], []
    at_floor, negative, nonfinite = [], [], []
    for m in managed:
        h = m.hess
        h_min = hess_lower_bound(m.weight_decay.astype(h.dtype), h.dtype)
        # The same comparison the update's clamp makes, so a clamped h counts exactly.
        at_floor.append(jnp.sum(h <= h_min, dtype=jnp.int32))
        negative.append(jnp.sum(h < 0, dtype=jnp.int32))
        nonfinite.append(jnp.sum(~jnp.isfinite(h), dtype=jnp.int32))
        hs.append(h.astype(dt))
        sigmas.append(jax.lax.rsqrt(m.precision()).astype(dt))

    def fraction(counts: list[jax.Array]) -> jax.Array:
        # Summed in float: an int32 count could overflow on a model with > 2^31 elements.
        return sum((c.astype(dt) for c in counts), jnp.zeros([], dt)) / jnp.asarray(n, dt)

    def nanmean(leaves: list[jax.Array]) -> jax.Array:
        total = sum((jnp.nansum(x) for x in leaves), jnp.zeros([], dt))
        count = sum((jnp.sum(~jnp.isnan(x), dtype=dt) for x in leaves), jnp.zeros([], dt))
        return total / count

    stride = 1 if max_elements is None else math.ceil(n / max_elements)
    levels = jnp.asarray([q for _, q in _QUANTILES], dt)
    out: dict[str, jax.Array] = {"step": step, "skipped": skipped}
    for name, leaves in (("h", hs), ("sigma", sigmas)):
        values = _nan_quantiles(_strided_concat(leaves, stride), levels)
        for i, (suffix, _) in enumerate(_QUANTILES):
            out[f"{name}_{suffix}"] = values[i]
        out[f"{name}_mean"] = nanmean(leaves)
    out["frac_h_at_floor"] = fraction(at_floor)
    out["frac_h_negative"] = fraction(negative)
    out["frac_h_nonfinite"] = fraction(nonfinite)
    return out
