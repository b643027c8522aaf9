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
from ivon_jax._src.state import prior_precision_leaves
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
    - ``frac_h_learned``: the fraction of elements whose h differs from the decayed initial
      value h₀β₂ᵗ by more than a factor of 2 — where the data's ĥ, not h₀, sets σ. Near 0
      after many steps: h only decays (h₀ far above the data's curvature, or β₂ so close to
      1 that the run is too short); see :func:`posterior_health`.
    - ``h_decay_share``: the mean over elements of min(1, h₀β₂ᵗ / h): the share of h that
      is still h₀'s decay (1: none of h comes from the data; 0: all of it does).
    - ``h0_weight``: β₂ᵗ, the weight h's running average still gives h₀ (the largest over
      the states). Near 1 after many steps: β₂ is too close to 1 for the run and h can
      hardly move, whatever the data says. With ``ivon(..., total_steps=T)`` it is
      exp(-2) ≈ 0.14 at the end of the run.
    - ``sigma_prior_ratio_p50``: the median of σ / σ_prior with σ_prior = 1/√(λδ), i.e.
      √(δ / (h + δ)): near 1, σ is the prior's (the data has not narrowed it); 0 when δ = 0.
      With ``hess_init="auto"`` these three read h₀ as calibrated so far during the first
      20 steps.

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
    out.update(_learning(states, dt, stride, n))
    return out


def _learning(states: list, dt: Any, stride: int, n: int) -> dict[str, jax.Array]:
    """Is the posterior learning? h against h₀β₂ᵗ, and σ against the prior's."""
    learned, decay, ratio, count = [], [], [], jnp.zeros([], dt)
    weight = jnp.zeros([], dt)
    for st in states:
        if st.hess_init is None or st.b2 is None:  # a state from before h₀ was kept in it
            continue
        t = posterior._scalar(st.count).astype(dt)
        b2 = posterior._scalar(st.b2).astype(dt)
        weight = jnp.maximum(weight, b2**t)
        deltas = prior_precision_leaves(st)
        for h, h0, wd in zip(jax.tree.leaves(st.hess), jax.tree.leaves(st.hess_init), deltas,
                             strict=True):
            h, wd = h.astype(dt), wd.astype(dt)
            decayed = posterior._scalar(h0).astype(dt) * b2**t
            tiny = jnp.finfo(dt).tiny
            share = jnp.clip(decayed / jnp.maximum(h, tiny), 0, 1)
            moved = (h > 2 * decayed) | (h < 0.5 * decayed)
            learned.append(jnp.sum(moved, dtype=dt))
            decay.append(jnp.nansum(share))
            count = count + h.size
            # σ / σ_prior = sqrt(δ / (h + δ)): 1 where the data has not narrowed σ at all.
            ratio.append(jnp.where(wd > 0, jnp.sqrt(wd / jnp.maximum(h + wd, tiny)), 0))
    if not ratio:
        nan = jnp.asarray(jnp.nan, dt)
        return {"frac_h_learned": nan, "h_decay_share": nan, "h0_weight": nan,
                "sigma_prior_ratio_p50": nan}
    levels = jnp.asarray([0.5], dt)
    return {
        "frac_h_learned": sum(learned) / count,
        "h_decay_share": sum(decay) / count,
        "h0_weight": weight,
        "sigma_prior_ratio_p50": _nan_quantiles(_strided_concat(ratio, stride), levels)[0],
    }


# Thresholds of `posterior_health` (what the defaults study saw in healthy and failing runs).
_MIN_STEPS = 100
_LEARNED_MIN = 0.1
_DECAY_MAX = 0.9
_H0_WEIGHT_MAX = 0.5
_PRIOR_RATIO_MAX = 0.5


def posterior_health(
    opt_state_or_summary: Any, *, warn: bool = True
) -> list[str]:
    r"""Says, in words, whether the posterior is learning; logs a warning for each problem.

    Reads :func:`state_summary` (or takes its output) and reports two failure modes that
    train without an error but leave IVON's σ meaningless:

    - **h cannot move**: after at least 100 steps h's running average still gives h₀ more
      than half its weight (``h0_weight`` = β₂ᵗ > 0.5), fewer than 10 % of the elements' h
      differ from h₀β₂ᵗ by more than a factor of 2 (``frac_h_learned``) and most of h is
      h₀'s (``h_decay_share`` > 0.9). β₂ is too close to 1 for the run: σ stays what h₀
      made it (pass ``total_steps=`` to :func:`ivon`, which sets β₂ = 1 - 2/T).
    - **σ near the prior**: for half of the elements σ is more than half of the prior's
      1/√(λδ) (``sigma_prior_ratio_p50`` > 0.5): the data has not narrowed the posterior
      there, and samples are nearly as wide as the prior (raise ``ess`` or ``weight_decay``).

    Not reported as a problem: h that has decayed as h₀β₂ᵗ to a small ``h0_weight`` while
    the data's ĥ stayed below it (``h_decay_share`` near 1, ``h0_weight`` small). That is
    what the ``total_steps`` path gives small networks at ess = N, and on the benchmarks
    it predicts better than runs whose h is the data's (see the hyper-parameter guide);
    ``state_summary`` shows it for those who want σ to carry the data's curvature (then
    lower ``hess_init`` towards ĥ's scale or raise ``ess``).

    Not jittable (it turns the summary into Python floats): call it every few hundred steps
    or at the end of training, outside ``jit``.

    Args:
      opt_state_or_summary: an optimizer state holding IVON state(s), or the dict returned
        by :func:`state_summary`.
      warn: log each message with ``logging.getLogger("ivon_jax").warning``.

    Returns:
      The messages, empty when neither problem shows.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init({"w": jnp.zeros(3)})
      >>> ivon_jax.posterior_health(state)   # step 0: too early to tell
      []
    """
    import logging

    summary = opt_state_or_summary
    if not (isinstance(summary, dict) and "frac_h_learned" in summary):
        summary = state_summary(opt_state_or_summary)
    value = lambda k: float(summary[k])
    step = int(summary["step"])
    messages = []
    learned, decay = value("frac_h_learned"), value("h_decay_share")
    weight = value("h0_weight")
    if (step >= _MIN_STEPS and weight > _H0_WEIGHT_MAX and learned < _LEARNED_MIN
            and decay > _DECAY_MAX):
        messages.append(
            f"ivon_jax: after {step} steps h is still h₀'s decay h₀β₂ᵗ for "
            f"{100 * (1 - learned):.0f} % of the weights and its running average still "
            f"gives h₀ a weight of β₂ᵗ = {weight:.3f} (frac_h_learned = {learned:.3f}, "
            f"h_decay_share = {decay:.3f}): β₂ is too close to 1 for this run and the "
            "data's curvature cannot enter σ. Pass `total_steps=` to `ivon_jax.ivon` "
            "(β₂ = 1 - 2/T) or a smaller `b2`."
        )
    ratio = value("sigma_prior_ratio_p50")
    if step >= _MIN_STEPS and ratio > _PRIOR_RATIO_MAX:
        messages.append(
            f"ivon_jax: σ is near the prior's 1/√(λδ) for half of the weights (median σ / "
            f"σ_prior = {ratio:.2f}): the data has not narrowed the posterior there. A larger "
            "`ess` (a colder posterior) or `weight_decay` narrows it."
        )
    if warn:
        log = logging.getLogger("ivon_jax")
        for m in messages:
            log.warning(m)
    return messages
