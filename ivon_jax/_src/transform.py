"""IVON as an optax transform: ``scale_by_ivon`` and the ``ivon`` alias (the state is in
``state.py``)."""

from __future__ import annotations

import math
import sys
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from numpy import integer as np_integer
import optax
from optax._src import numerics

from ivon_jax._src import checks
from ivon_jax._src import fusion
from ivon_jax._src import noise
from ivon_jax._src.state import IVONState
from ivon_jax._src.state import hess_lower_bound
from ivon_jax._src.state import scalar_dtype
from ivon_jax._src.state import stats_dtype
from ivon_jax._src.wrappers import SkipNonFiniteState

# `hess_init="auto"`: h holds AUTO_PLACEHOLDER for the first AUTO_STEPS updates while the
# leaf means of ĥ are averaged; then each leaf's h₀ is that average and h starts from it. A
# leaf of fewer than AUTO_SMALL elements (a bias, a norm's scale: its mean is noisy) gets at
# least AUTO_SHARE of the average over all elements. See `ivon`'s docstring.
AUTO = "auto"
AUTO_STEPS = 20
AUTO_PLACEHOLDER = 1.0
AUTO_SHARE = 0.5
AUTO_SMALL = 1024

# `ivon(..., total_steps=T)` with `b2=None`: β₂ = 1 - B2_HORIZONS / T, so that h₀'s share of h
# at the end of the run is β₂ᵀ ≈ exp(-B2_HORIZONS) (benchmarks/defaults_study.py: of
# k = 1, 2, 3, 5, 10, k = 2 had the best validation NLL on 2 of 3 tasks).
B2_HORIZONS = 2.0
B2_LEGACY = 0.99999
# δ's default: with total_steps (best with β₂ = 1 - 2/T on the study's tasks), and without.
WD_WITH_STEPS = 1e-3
WD_LEGACY = 1e-4


def b2_for(total_steps: int | None) -> float:
    """β₂ for a run of ``total_steps`` optimizer steps: ``1 - B2_HORIZONS / total_steps``
    (the paper's 0.99999 without a step count)."""
    if total_steps is None:
        return B2_LEGACY
    if isinstance(total_steps, bool) or not isinstance(total_steps, int | np_integer):
        raise TypeError(
            f"ivon_jax: `total_steps` must be a positive int (the run's number of optimizer "
            f"steps), got {total_steps!r}"
        )
    if total_steps <= B2_HORIZONS:
        raise ValueError(
            f"ivon_jax: `total_steps` must be more than {B2_HORIZONS:g} (β₂ = 1 - "
            f"{B2_HORIZONS:g} / total_steps must be in (0, 1)), got {total_steps}"
        )
    return 1.0 - B2_HORIZONS / int(total_steps)


# The keyword under which `ivon(..., skip_nonfinite=True)` hands its verdict on the gradients
# (a boolean scalar) to the transforms of its chain.
STEP_OK = "_ivon_jax_gradients_finite"


def _equinox_hint(tree: Any) -> str:
    """The Equinox spelling of the fix, when the tree is (or holds) an ``eqx.Module`` or
    Equinox has been imported; equinox itself is never imported here."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return ""
    module = any(
        isinstance(x, eqx.Module)
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, eqx.Module))
    )
    where = "an Equinox model" if module else "Equinox code"
    return (
        f" For {where}, initialise with `opt.init(eqx.filter(model, eqx.is_inexact_array))` "
        "(ivon_jax.equinox.value_and_grad returns grads and hess filtered the same way)."
    )


def _is_array_like(x: Any) -> bool:
    # Arrays, tracers, NumPy scalars and Python numbers; not functions or other objects.
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype")


PriorMean = Literal["zero", "init"]


def _check_prior_mean(prior_mean: Any) -> None:
    if not isinstance(prior_mean, str) or prior_mean not in ("zero", "init"):
        raise ValueError(
            f"ivon_jax: `prior_mean` must be 'zero' or 'init', got {prior_mean!r}. For any "
            "other centre, call `ivon_jax.set_prior(opt_state, mean=tree)` after `init`."
        )


def _check_float_leaves(params: Any) -> None:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    # Objects first (functions, strings): they say the tree is a whole model, not its arrays.
    for path, p in sorted(flat, key=lambda leaf: _is_array_like(leaf[1])):
        if not _is_array_like(p):
            raise TypeError(
                f"ivon_jax: IVON's parameters must be arrays, but `params{checks.path_str(path)}` "
                f"is a {type(p).__name__} ({p!r:.80}). Pass only the trainable arrays to "
                "`opt.init` (a model's functions and other non-array fields must stay out of "
                "the parameter tree)." + _equinox_hint(params)
            )
        if not jnp.issubdtype(jnp.result_type(p), jnp.floating):
            raise TypeError(
                f"ivon_jax: IVON manages floating-point parameters only, but "
                f"`params{checks.path_str(path)}` has dtype {jnp.result_type(p)}. Exclude "
                "such leaves with `optax.masked`/`optax.multi_transform`, or keep them out of "
                "the parameter tree." + _equinox_hint(params)
            )


MISSING_HESS = (
    "ivon_jax: IVON's update needs the Hessian estimate: call "
    "`tx.update(grads, state, params, hess=hess)` with `hess` from "
    "`ivon_jax.estimate_hessian` or `ivon_jax.value_and_grad`. "
    "Flax NNX: `loss, grads, hess = ivon_jax.flax.nnx.value_and_grad(loss_fn)(key, model, "
    "optimizer, ...)`, then `optimizer.update(model, grads, hess=hess)`. "
    "Flax Linen: `state.apply_gradients(grads=grads, hess=hess)` on an "
    "`ivon_jax.flax.linen.TrainState` (Flax's own `flax.training.train_state.TrainState` "
    "does not pass `hess` to the optimizer). "
    "Equinox: `loss, grads, hess = ivon_jax.equinox.value_and_grad(loss_fn)(key, model, "
    "opt_state, ...)`, then `opt.update(grads, opt_state, eqx.filter(model, "
    "eqx.is_inexact_array), hess=hess)`."
)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _mask_like(hess: Any, params: Any) -> Any:
    """``hess`` with ``optax.MaskedNode`` wherever ``params`` has one.

    A mask above IVON (``optax.masked`` without ``mask_compatible_extra_args``,
    ``optax.transforms.selective_transform``, ``optax.partition``) hands IVON masked
    ``grads`` and ``params`` but the full ``hess``; masking it the same way is what
    ``mask_compatible_extra_args=True`` would do. Any other mismatch is left to the checks.
    """
    if jax.tree.structure(hess) == jax.tree.structure(params):
        return hess
    if not any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked)):
        return hess
    try:
        return jax.tree.map(
            lambda p, h: optax.MaskedNode() if _is_masked(p) else h,
            params, hess, is_leaf=_is_masked,
        )
    except (ValueError, TypeError):  # not a tree with params' structure; the checks name the difference
        return hess


def _check_common(ess: Any, hess_init: Any, b1: Any, b2: Any, weight_decay: Any) -> None:
    checks.check_hyperparam(
        "ess", ess, lambda x: 0 < x < math.inf, "> 0 and finite (usually the training-set size)"
    )
    if isinstance(hess_init, str):
        if hess_init != AUTO:
            raise ValueError(
                f"ivon_jax: `hess_init` must be a number > 0 or {AUTO!r}, got {hess_init!r}"
            )
    else:
        checks.check_hyperparam(
            "hess_init", hess_init, lambda x: 0 < x < math.inf, f"> 0 and finite, or {AUTO!r}"
        )
    rounded_hint = (
        "in [0, 1) (under `optax.inject_hyperparams` with bfloat16 parameters, pass "
        "`hyperparam_dtype=jnp.float32`: in bfloat16 a decay such as 0.99999 rounds to 1)"
    )
    checks.check_hyperparam("b1", b1, lambda x: 0 <= x < 1, rounded_hint)
    checks.check_hyperparam("b2", b2, lambda x: 0 <= x < 1, rounded_hint)
    checks.check_hyperparam(
        "weight_decay", weight_decay, lambda x: 0 <= x < math.inf, ">= 0 and finite"
    )


def scale_by_ivon(
    ess: float | jax.Array,
    hess_init: float | jax.Array = 1.0,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99999,
    weight_decay: float | jax.Array = 1e-4,
    debias: bool = True,
    *,
    rescale_auto: bool = False,
    prior_mean: PriorMean = "zero",
) -> optax.GradientTransformationExtraArgs:
    r"""IVON's preconditioning: momentum, the Hessian update and the natural-gradient step.

    Given the averaged minibatch gradient :math:`\hat g` (the ``updates``) and the matching
    Hessian estimate :math:`\hat h` (the ``hess`` keyword, see :func:`estimate_hessian`), one
    update is, elementwise,

    .. math::
        g &\leftarrow \beta_1 g + (1-\beta_1)\hat g \\
        h &\leftarrow \beta_2 h + (1-\beta_2)\hat h
              + \tfrac12 (1-\beta_2)^2 (h-\hat h)^2 / (h+\delta) \\
        u &= (g / (1-\beta_1^t) + \delta \odot (m - m_0)) / (h + \delta)

    and ``u`` is returned (no learning rate, no sign flip: chain it with
    ``optax.scale_by_learning_rate``, as :func:`ivon` does). The third term of the h-update
    keeps :math:`h+\delta > 0` for any :math:`\hat h`.

    Args:
      ess: effective sample size λ (> 0), usually the training-set size. No default: a
        value of 1 gives enormous noise.
      hess_init: initial Hessian estimate h₀ (> 0), or ``"auto"``: h₀ calibrated per leaf
        from the first 20 steps' ĥ (see :func:`ivon`).
      b1: momentum decay β₁ in [0, 1).
      b2: Hessian decay β₂ in [0, 1).
      weight_decay: prior precision δ (≥ 0); enters as the prior, not as decoupled decay.
      debias: divide the momentum by 1 - β₁ᵗ.
      rescale_auto: with ``hess_init="auto"``, multiply each leaf's step by h₀ + δ with that
        leaf's h₀ (the per-leaf form of :func:`ivon`'s ``rescale_lr``, which ``ivon`` turns
        on here). Ignored for a numeric ``hess_init``.
      prior_mean: the prior's centre m₀: ``"zero"`` (the paper's prior, nothing stored) or
        ``"init"``, the parameters given to ``init`` (kept in the state, one more buffer like
        the parameters, sharded like them): the step then pulls towards the initial weights
        (e.g. pretrained ones) instead of zero. :func:`set_prior` sets m₀ and a per-element
        δ on any state.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params,
      *, hess)`` requires ``params`` and ``hess``; other keyword arguments are ignored.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> tx = ivon_jax.scale_by_ivon(ess=100.0)
      >>> state = tx.init({"w": jnp.ones(3)})

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """
    _check_common(ess, hess_init, b1, b2, weight_decay)
    auto = isinstance(hess_init, str)
    h_start = AUTO_PLACEHOLDER if auto else hess_init
    _check_prior_mean(prior_mean)

    def init_fn(params: optax.Params) -> IVONState:
        _check_float_leaves(params)
        sd = scalar_dtype()

        # *_like keeps each parameter's sharding: the state is sharded like the parameters.
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros_like(p, dtype=stats_dtype(jnp.result_type(p)))

        def full(p: jax.Array) -> jax.Array:
            return jnp.full_like(p, h_start, dtype=stats_dtype(jnp.result_type(p)))

        def h0(p: jax.Array) -> jax.Array:
            # With "auto": the running average of ĥ's leaf mean until the calibration ends.
            return jnp.asarray(h_start, stats_dtype(jnp.result_type(p)))

        return IVONState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(zeros, params),
            hess=jax.tree.map(full, params),
            ess=jnp.asarray(ess, sd),
            weight_decay=jnp.asarray(weight_decay, sd),
            # A copy, not the caller's buffers: donating params and state together must work.
            prior_mean=jax.tree.map(jnp.copy, params) if prior_mean == "init" else None,
            hess_init=jax.tree.map(h0, params),
            b2=jnp.asarray(b2, sd),
        )

    def update_fn(
        updates: optax.Updates,
        state: IVONState,
        params: optax.Params | None = None,
        *,
        hess: optax.Updates | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, IVONState]:
        # The guard of `ivon(..., skip_nonfinite=True)` passes its verdict on the gradients
        # here; other unknown keyword arguments are ignored, as optax does.
        ok = extra_args.get(STEP_OK)
        if params is None:
            raise ValueError(
                "ivon_jax: IVON's update needs `params` (the posterior mean m enters the "
                "weight-decay term): call `tx.update(grads, state, params, hess=hess)`."
            )
        if hess is None:
            raise ValueError(MISSING_HESS)
        hess = _mask_like(hess, params)
        checks.check_same_tree("grads", updates, "params", params)
        checks.check_same_tree(
            "hess", hess, "params", params,
            hint="`hess` must be estimated for the same parameters as `grads` "
            "(`ivon_jax.estimate_hessian(grads, noise, opt_state)` or the third output of "
            "`ivon_jax.value_and_grad`).",
        )
        checks.check_same_tree(
            "opt_state.hess", state.hess, "params", params,
            hint="Was the optimizer initialised with these parameters?",
        )

        treedef = jax.tree.structure(params)
        # The prior N(m₀, 1/(λδ)): None for m₀ = 0 and δ = weight_decay (then the arithmetic
        # is exactly the paper's); else one entry per parameter leaf.
        n_leaves = treedef.num_leaves
        means = (
            [None] * n_leaves if state.prior_mean is None
            else treedef.flatten_up_to(state.prior_mean)
        )
        deltas = (
            [None] * n_leaves if state.prior_precision is None
            else treedef.flatten_up_to(state.prior_precision)
        )

        count = numerics.safe_increment(state.count)
        if ok is not None:
            count = jnp.where(ok, count, state.count)
        h0_tree = state.hess_init
        if h0_tree is None:  # a state made before h₀ was kept in it
            h0_tree = jax.tree.map(lambda h: jnp.asarray(h_start, h.dtype), state.hess)
        if auto:
            h0_tree, calibrating, finishing = _auto_calibrate(
                hess, h0_tree, state.count, count, weight_decay
            )

        scalars: dict[Any, tuple[jax.Array, ...]] = {}

        def constants(dt: Any) -> tuple[jax.Array, ...]:
            # Scalar coefficients, computed once per statistics dtype rather than per leaf.
            if dt not in scalars:
                b1_, b2_ = jnp.asarray(b1, dt), jnp.asarray(b2, dt)
                correction = 1 - b1_ ** count.astype(dt)  # used only when debiasing
                wd = jnp.asarray(weight_decay, dt)
                h_min = hess_lower_bound(wd, dt)
                scalars[dt] = (
                    b1_, 1 - b1_, b2_, 1 - b2_, 0.5 * (1 - b2_) ** 2, wd, h_min, correction,
                )
            return scalars[dt]

        def leaf_update(
            g_hat: jax.Array, h_hat: jax.Array, p: jax.Array, g: jax.Array, h: jax.Array,
            h0: jax.Array, m0: jax.Array | None, delta: jax.Array | None,
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            b1_, one_b1, b2_, one_b2, half_sq, wd, h_min, correction = constants(h.dtype)
            dt = h.dtype
            if delta is not None:
                wd = jnp.asarray(delta).astype(dt)  # a per-element (or per-leaf) δ
                h_min = hess_lower_bound(wd, dt)
            p = jnp.asarray(p)
            g_hat, h_hat, m = g_hat.astype(dt), h_hat.astype(dt), p.astype(dt)
            g_new = b1_ * g + one_b1 * g_hat
            h_new = b2_ * h + one_b2 * h_hat + half_sq * jnp.square(h - h_hat) / (h + wd)
            if auto:
                # While calibrating h stays at the placeholder; on the last calibration step
                # it starts from the leaf's h₀.
                h_new = jnp.where(
                    calibrating, h, jnp.where(finishing, jnp.broadcast_to(h0, h.shape), h_new)
                )
            # In exact arithmetic h + δ only shrinks by half per step; in floating point it
            # can underflow or cancel to 0 (then 0/0). Keep it at a floor; NaN still passes.
            h_new = jnp.maximum(h_new, h_min)
            if ok is not None:
                # The guard. A step with non-finite gradients keeps g and h and returns a zero
                # step; on a good step an element whose new h would not be finite (a NaN or
                # inf in ĥ alone, an overflow) keeps its old h. Selects inside this kernel,
                # no extra pass; on a finite step the same arithmetic as without the guard
                # (compiled apart, XLA may still round an ulp differently).
                g_new = jnp.where(ok, g_new, g)
                h_new = jnp.where(ok & jnp.isfinite(h_new), h_new, h)
            # No bit changes; h' is computed once, straight into the state's buffer, and the
            # step reads it (otherwise XLA keeps a temporary that every consumer re-reads and,
            # on CPU, copies h and the parameters each step).
            h_new = fusion.materialize(h_new)
            g_bar = g_new / correction if debias else g_new
            pull = m if m0 is None else m - jnp.asarray(m0).astype(dt)
            u = (g_bar + wd * pull) / (h_new + wd)
            if auto and rescale_auto:
                scale = jnp.where(calibrating, jnp.asarray(AUTO_PLACEHOLDER, dt), h0) + wd
                u = u * scale
            if ok is not None:
                u = jnp.where(ok, u, jnp.zeros((), dt))
            return u.astype(p.dtype), g_new, h_new

        columns = [
            treedef.flatten_up_to(t)
            for t in (updates, hess, params, state.momentum, state.hess, h0_tree)
        ]
        triples = [leaf_update(*row) for row in zip(*columns, means, deltas, strict=True)]
        u, g_new, h_new = (treedef.unflatten([t[i] for t in triples]) for i in range(3))
        sd = scalar_dtype()
        return u, IVONState(
            count=count,
            momentum=g_new,
            hess=h_new,
            ess=jnp.asarray(ess, sd),
            weight_decay=jnp.asarray(weight_decay, sd),
            prior_mean=state.prior_mean,
            prior_precision=state.prior_precision,
            hess_init=h0_tree,
            b2=jnp.asarray(b2, sd),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _auto_calibrate(
    hess: optax.Updates, h0_tree: optax.Updates, old_count: jax.Array, count: jax.Array,
    weight_decay: Any,
) -> tuple[optax.Updates, jax.Array, jax.Array]:
    """One step of ``hess_init="auto"``'s calibration.

    For the first ``AUTO_STEPS`` updates ``h0_tree`` holds the running average of each leaf's
    mean ĥ (non-finite elements count as 0); the update that completes them sets each leaf's
    h₀ = max(that average, max(δ, 1e-8)), and for a leaf of fewer than AUTO_SMALL elements
    at least AUTO_SHARE x the average over all elements.
    Returns the new tree and two flags: ``calibrating`` (this update is one of the first
    ``AUTO_STEPS - 1``: h keeps its placeholder) and ``finishing`` (this update completes the
    calibration: h starts from h₀). A skipped step (``count`` not advanced) changes nothing.
    """
    advanced = count > old_count
    in_window = advanced & (count <= AUTO_STEPS)
    finishing = advanced & (count == AUTO_STEPS)
    calibrating = count < AUTO_STEPS

    def running_mean(h_hat: jax.Array, h0: jax.Array) -> jax.Array:
        h_hat = jnp.asarray(h_hat).astype(h0.dtype)
        x = jnp.mean(jnp.where(jnp.isfinite(h_hat), h_hat, 0)) if h_hat.size else h0
        step = (x - h0) / jnp.maximum(count, 1).astype(h0.dtype)
        return jnp.where(in_window, h0 + step, h0)

    means = jax.tree.map(running_mean, hess, h0_tree)
    leaves, treedef = jax.tree.flatten(means)
    sizes = [int(jnp.size(h)) for h in jax.tree.leaves(hess)]
    total = max(sum(sizes), 1)
    overall = sum(
        (m.astype(jnp.float32) * n for m, n in zip(leaves, sizes, strict=True)),
        jnp.zeros([], jnp.float32),
    ) / total

    def finish(m: jax.Array, size: int) -> jax.Array:
        floor = jnp.maximum(jnp.asarray(weight_decay, m.dtype), jnp.asarray(1e-8, m.dtype))
        if size < AUTO_SMALL:
            floor = jnp.maximum(floor, AUTO_SHARE * overall.astype(m.dtype))
        return jnp.where(finishing, jnp.maximum(m, floor), m)

    new = [finish(m, n) for m, n in zip(leaves, sizes, strict=True)]
    return treedef.unflatten(new), calibrating, finishing


def ivon(
    learning_rate: optax.ScalarOrSchedule,
    ess: float | jax.Array,
    hess_init: float | jax.Array = 1.0,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array | None = None,
    weight_decay: float | jax.Array | None = None,
    clip_radius: float | jax.Array | None = None,
    rescale_lr: bool = True,
    debias: bool = True,
    *,
    total_steps: int | None = None,
    skip_nonfinite: bool = True,
    prior_mean: PriorMean = "zero",
) -> optax.GradientTransformationExtraArgs:
    r"""The IVON optimizer (Improved Variational Online Newton) as an optax transform.

    IVON learns a diagonal Gaussian posterior :math:`q(\theta) = N(m, \mathrm{diag}(\sigma^2))`
    with :math:`\sigma = 1/\sqrt{\lambda (h + \delta)}`. The parameters passed to ``update``
    are the mean m; σ lives in the state (:func:`posterior_std`). One step is

    .. math::
        m \leftarrow m - \alpha_t\, \mathrm{clip}\big((\bar g + \delta m)/(h + \delta),
        -\xi, \xi\big)

    after :func:`scale_by_ivon`'s update of g and h; with ``rescale_lr`` the learning rate is
    :math:`\alpha_t (h_0 + \delta)` so early steps have size ≈ α_t.

    Typical loop::

        sampled, noise = ivon_jax.sample_params(key, params, opt_state)
        grads = jax.grad(loss_fn)(sampled, batch)          # loss = *mean* over the batch
        hess = ivon_jax.estimate_hessian(grads, noise, opt_state)
        updates, opt_state = opt.update(grads, opt_state, params, hess=hess)
        params = optax.apply_updates(params, updates)

    Args:
      learning_rate: α, a float ≥ 0 or an optax schedule.
      ess: effective sample size λ > 0 (usually the training-set size N).
      hess_init: h₀ > 0 (0.01 – 1; 0.1 is typical for CNNs).
      b1: momentum decay β₁ in [0, 1).
      b2: Hessian decay β₂ in [0, 1). ``None`` (the default): ``1 - 2 /
        total_steps`` when ``total_steps`` is given (see there), else 0.99999 (the paper's
        value, meant for runs of 10⁵ steps and more).
      weight_decay: δ ≥ 0, the prior precision divided by λ. ``None`` (the default): 1e-3
        with ``total_steps`` (the study's rule, with β₂ = 1 - 2/T), else 1e-4 (the paper's).
      clip_radius: ξ > 0 for an element-wise clip of the preconditioned step (1e-3 for
        transformers), or ``None`` for no clipping.
      rescale_lr: scale the learning rate by h₀ + δ (as the reference implementation).
      debias: debias the momentum by 1 - β₁ᵗ.
      total_steps: the number of optimizer steps the run will take (as for a learning-rate
        schedule). With ``b2=None`` it sets β₂ = 1 - 2 / ``total_steps``, so that
        h forgets its initial value h₀ over the run (h₀'s share of h is
        β₂ᵀ ≈ e⁻² at the end) and holds the data's curvature instead; see the
        hyper-parameter guide for the study behind it. Ignored when ``b2`` is given.
      skip_nonfinite: the guard against non-finite values, on by default. A step whose
        gradients hold a NaN or an infinity (one bad batch, micro-batch or device) is a
        no-op: zero updates, g, h, IVON's count and the schedule's count unchanged, and
        ``opt_state.skipped`` + 1. On an otherwise good step, an element whose new h would
        not be finite (a NaN or infinity only in ``hess``, an h-update that overflows)
        keeps its previous h. h and σ therefore stay finite whatever the inputs. The check
        is one sum per gradient leaf and the no-op is a select inside the update's
        kernels; measured on 2-core CPUs it costs 2–6 % of an MLP train step with 0.55M
        parameters and 6–26 % with 10M (medians of six runs on one machine: 2 % and 11 %;
        ``benchmarks/perf.py``, and the docs' page on non-finite steps says why). ``False``
        removes it (and ``skipped`` from the state). For a whole-step skip on *any*
        non-finite value, wrap a chain in
        :func:`skip_nonfinite`.
      prior_mean: the centre m₀ of the prior N(m₀, 1/(λδ)): ``"zero"`` (default) or
        ``"init"``, the parameters passed to ``init`` (for fine-tuning: the pretrained
        weights; one more parameter-sized buffer in the state). The step becomes
        (ḡ + δ ⊙ (m − m₀)) / (h + δ). :func:`set_prior` sets m₀ and a per-element δ later,
        e.g. the posterior of a finished task (:func:`posterior_as_prior`). ``rescale_lr``
        always uses this constructor's h₀ + ``weight_decay``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and ``hess``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, ivon_jax
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = ivon_jax.ivon(0.1, ess=1000.0)
      >>> state = opt.init(params)
      >>> key = jax.random.key(0)
      >>> loss_fn = lambda p: jnp.mean((p["w"] - 1.0) ** 2)
      >>> sampled, noise = ivon_jax.sample_params(key, params, state)
      >>> grads = jax.grad(loss_fn)(sampled)
      >>> hess = ivon_jax.estimate_hessian(grads, noise, state)
      >>> updates, state = opt.update(grads, state, params, hess=hess)
      >>> params = optax.apply_updates(params, updates)

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024.
    """
    if not callable(learning_rate):
        checks.check_hyperparam(
            "learning_rate", learning_rate, lambda x: 0 <= x < math.inf, ">= 0 and finite"
        )
    b2 = b2_for(total_steps) if b2 is None else b2
    if weight_decay is None:
        weight_decay = WD_WITH_STEPS if total_steps is not None else WD_LEGACY
    if clip_radius is not None:
        checks.check_hyperparam("clip_radius", clip_radius, lambda x: x > 0, "> 0 or None")
    _check_common(ess, hess_init, b1, b2, weight_decay)

    lr: optax.ScalarOrSchedule = learning_rate
    auto = isinstance(hess_init, str)
    if rescale_lr and not auto:
        scale = hess_init + weight_decay
        if callable(learning_rate):
            schedule = learning_rate
            lr = lambda count: schedule(count) * scale
        else:
            lr = learning_rate * scale
    parts = [
        scale_by_ivon(ess, hess_init, b1, b2, weight_decay, debias, rescale_auto=rescale_lr,
                      prior_mean=prior_mean)
    ]
    if clip_radius is not None:
        parts.append(optax.clip(clip_radius))
    parts.append(_scale_by_negative_lr(lr))
    tx = optax.chain(*parts)
    return _guard(tx) if skip_nonfinite else tx


def _leaf_sum(g: jax.Array) -> jax.Array:
    """The sum of a gradient leaf's elements, in the statistics' dtype.

    A matrix (or higher-rank) leaf is summed as ``ones @ g`` — a matrix-vector product
    summing over the first axis — then the resulting vector: XLA:CPU runs the product on
    all cores, while it reduces a large array on one. On the 10M-parameter MLP's train step
    the guard cost 1.155x with ``jnp.sum`` and 1.055–1.11x with the product (same runs).
    """
    dt = stats_dtype(jnp.result_type(g))
    if g.ndim < 2 or g.size == 0:
        return jnp.sum(g, dtype=dt)
    rows = g.reshape(g.shape[0], -1)
    col_sums = jnp.matmul(jnp.ones((g.shape[0],), g.dtype), rows, preferred_element_type=dt)
    return jnp.sum(col_sums)


def _gradients_finite(grads: optax.Updates) -> jax.Array:
    """True (a boolean scalar) when every gradient element is finite.

    One sum per leaf: a NaN or an infinity survives any sum (inf - inf is NaN), so the sums
    are finite exactly when the elements are, except that gradients so large that a sum
    overflows (|g| ~ 1e38 / size in float32) count as non-finite too. Leaves up to
    ``noise.SMALL_LEAF`` elements (unless sharded over explicit mesh axes) are summed
    together, one flat vector per dtype: fewer kernels to compile with many small leaves
    (200 leaves of 16x16 compiled in 4.9 s instead of 6.4 s, against 4.0 s without the
    guard). The verdict is computed once, in a kernel of its own: left to XLA, the test of
    all leaves was fused into each of the update's kernels, and compiling grew with the
    square of the number of leaves (30 s for those 200 leaves).
    """
    flags = []
    small: dict[Any, list[jax.Array]] = {}
    for g in map(jnp.asarray, jax.tree.leaves(grads)):
        # Leaves sharded over explicit mesh axes cannot be concatenated with others.
        if g.size > noise.SMALL_LEAF or noise.explicit_sharding(g) is not None:
            flags.append(jnp.isfinite(_leaf_sum(g)))
        elif g.size:
            dt = stats_dtype(jnp.result_type(g))
            small.setdefault(dt, []).append(g.reshape(-1).astype(dt))
    for group in small.values():
        flags.append(jnp.isfinite(jnp.sum(jnp.concatenate(group))))
    if not flags:
        return jnp.asarray(True)
    ok = jnp.all(jnp.stack(flags)).astype(jnp.float32)
    return fusion.materialize(ok) == 1


def _guard(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """``ivon``'s default guard around its chain ``tx``: the state of :func:`skip_nonfinite`,
    the check of the gradients done once here and applied inside the chain's kernels."""

    def init_fn(params: optax.Params) -> SkipNonFiniteState:
        return SkipNonFiniteState(tx.init(params), jnp.zeros([], jnp.int32))

    def update_fn(
        updates: optax.Updates,
        state: SkipNonFiniteState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SkipNonFiniteState]:
        ok = _gradients_finite(updates)
        new_updates, inner = tx.update(
            updates, state.inner_state, params, **extra_args, **{STEP_OK: ok}
        )
        skipped = jnp.where(ok, state.skipped, numerics.safe_increment(state.skipped))
        return new_updates, SkipNonFiniteState(inner, skipped)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _scale_by_negative_lr(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Multiplies by -lr, keeping each update's dtype (``optax.scale_by_learning_rate`` lets
    a float32 learning rate promote bfloat16 updates); the state matches optax's. A schedule's
    count stays where it is on a step the guard skips."""
    if callable(lr):
        schedule = lr

        def init_fn(params: optax.Params) -> optax.ScaleByScheduleState:
            del params
            return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

        def update_fn(updates, state, params=None, **extra_args):
            del params
            step = schedule(state.count)
            new = jax.tree.map(lambda u: jnp.asarray(-step, u.dtype) * u, updates)
            count = numerics.safe_increment(state.count)
            ok = extra_args.get(STEP_OK)
            if ok is not None:
                count = jnp.where(ok, count, state.count)
            return new, optax.ScaleByScheduleState(count=count)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def scale_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.asarray(-lr, u.dtype) * u, updates), state

    return optax.GradientTransformation(optax.init_empty_state, scale_fn)
