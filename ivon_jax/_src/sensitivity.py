r"""Sensitivity to training data and leave-one-out estimates from IVON's posterior.

The memory-perturbation equation (Nickl et al., 2023) predicts how a model's output on a
training example moves when that example is removed and the model retrained:

.. math::
    f_i^{\setminus i} \approx f_i + V_i e_i, \qquad
    V_i = J_i \,\mathrm{diag}(\sigma^2)\, J_i^\top, \qquad e_i = \nabla_f \ell(y_i, f_i),

with :math:`f_i` the network output (logits) at the posterior mean m, :math:`J_i = \partial
f_i / \partial\theta` at m (``C × P``), σ² IVON's posterior variance and :math:`e_i` the residual
(``softmax(f_i) − onehot(y_i)`` for cross-entropy, ``f_i − y_i`` for the squared loss
:math:`\tfrac12 (f - y)^2`). Evaluating the loss at the shifted outputs estimates the
leave-one-out (LOO) loss, i.e. the test loss, without a validation set:

.. math:: \mathrm{LOO} \approx \frac1N \sum_i \ell(y_i, f_i + V_i e_i).

Nothing here materialises a Jacobian larger than one example's ``C × P``: :func:`sensitivity`
needs one VJP and one JVP per example (:math:`V_i e_i = J_i(\sigma^2 \odot J_i^\top e_i)`),
:func:`prediction_variance` ``C`` VJPs per example; examples are vectorised ``batch_size`` at a
time.

Units: IVON's σ² = 1/(λ(h+δ)) is the posterior of λ·(mean loss), so each example's loss carries
weight λ/N. The formulas above assume ``ess`` λ = N (the training-set size), the usual choice;
for another λ the predicted shift scales by λ/N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import checks
from ivon_jax._src import posterior
from ivon_jax._src.state import stats_dtype

LOSSES = ("cross_entropy", "squared")


class Sensitivity(NamedTuple):
    """Per-example sensitivities and the leave-one-out estimate (see :func:`sensitivity`).

    ``C`` is the number of outputs per example (classes; 1 for scalar regression).

    Attributes:
      loo: shape (): the leave-one-out estimate (1/N) Σ ℓ(y_i, f_i + V_i e_i).
      loss: shape (): the training loss at the mean, (1/N) Σ ℓ(y_i, f_i).
      scores: shape (N,): each example's sensitivity score ‖V_i e_i‖₂.
      shifts: shape (N, C): V_i e_i, the predicted change of f_i when example i is removed.
      residuals: shape (N, C): e_i = ∂ℓ/∂f at f_i.
      outputs: shape (N, C): the outputs f_i at the mean.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax.sensitivity import Sensitivity
      >>> s = Sensitivity(*(jnp.zeros(()),) * 2, jnp.zeros(4), *(jnp.zeros((4, 1)),) * 3)
      >>> s.scores.shape, s.shifts.shape
      ((4,), (4, 1))
    """

    loo: jax.Array  # shape=(): LOO estimate (1/N) Σ ℓ(y_i, f_i + V_i e_i)
    loss: jax.Array  # shape=(): training loss at the mean, (1/N) Σ ℓ(y_i, f_i)
    scores: jax.Array  # shape=(N,): sensitivity score ‖V_i e_i‖₂
    shifts: jax.Array  # shape=(N, C): V_i e_i, the predicted change of f_i on removing i
    residuals: jax.Array  # shape=(N, C): e_i = ∂ℓ/∂f at f_i
    outputs: jax.Array  # shape=(N, C): f_i at the mean


# ----------------------------------------------------------------------------- helpers


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"ivon_jax.sensitivity: `loss` must be one of {LOSSES}, got {loss!r}.")


def _num_examples(inputs: Any) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError("ivon_jax.sensitivity: `inputs` holds no arrays.")
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "ivon_jax.sensitivity: every array in `inputs` needs the same leading (example) "
            f"axis; got leading sizes {sorted(str(s) for s in sizes)}."
        )
    (num,) = sizes
    if num == 0:
        raise ValueError("ivon_jax.sensitivity: `inputs` holds no examples (N = 0).")
    return int(num)


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"ivon_jax.sensitivity: `batch_size` must be an int >= 1 or None, got "
            f"{batch_size!r}."
        )


def _check_sigma(sigma: Any, params: Any) -> None:
    checks.check_same_tree(
        "sigma", sigma, "params", params,
        hint="Get it with `ivon_jax.posterior_std(opt_state, params)`.",
    )


def _per_example_fn(
    apply_fn: Callable[[Any, Any], jax.Array], loss: str
) -> Callable[[Any, Any], jax.Array]:
    """``(params, x_i) -> f_i`` of shape (C,), from a batched ``apply_fn``."""

    def fn(params: Any, x: Any) -> jax.Array:
        out = apply_fn(params, jax.tree.map(lambda a: a[None], x))
        shape = jnp.shape(out)
        if loss == "cross_entropy" and len(shape) != 2:
            raise ValueError(
                "ivon_jax.sensitivity: with loss='cross_entropy', `apply_fn(params, inputs)` "
                f"must return logits of shape (batch, C); got shape {shape} for a batch of one."
            )
        if loss == "squared" and not (shape == (1,) or shape == (1, 1)):
            raise ValueError(
                "ivon_jax.sensitivity: with loss='squared', `apply_fn(params, inputs)` must "
                f"return one scalar per example, shape (batch,) or (batch, 1); got {shape} for "
                "a batch of one."
            )
        return jnp.reshape(out, (-1,))

    return fn


def _residual(f: jax.Array, y: jax.Array, loss: str) -> jax.Array:
    """e = ∂ℓ/∂f for one example, f of shape (C,) in a float32-or-wider dtype."""
    if loss == "cross_entropy":
        return jax.nn.softmax(f) - jax.nn.one_hot(y, f.shape[0], dtype=f.dtype)
    return f - jnp.reshape(y, (1,)).astype(f.dtype)


def _loss(f: jax.Array, y: jax.Array, loss: str) -> jax.Array:
    """ℓ(y, f) for one example: cross-entropy of logits f, or ½ (f − y)²."""
    if loss == "cross_entropy":
        return jax.nn.logsumexp(f) - jnp.take(f, y)
    return 0.5 * jnp.sum(jnp.square(f - jnp.reshape(y, (1,)).astype(f.dtype)))


def _map(fn: Callable[..., Any], xs: Any, batch_size: int | None) -> Any:
    """``fn`` over the leading axis of ``xs``, ``batch_size`` examples vectorised at a time."""
    if batch_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=batch_size)


# ----------------------------------------------------------------------------- public


def prediction_variance(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: optax.Params,
    sigma: optax.Params,
    inputs: Any,
    batch_size: int | None = None,
) -> jax.Array:
    r"""Per-example prediction variance :math:`V_i = J_i\,\mathrm{diag}(\sigma^2)\,J_i^\top`.

    :math:`J_i = \partial f(x_i; \theta)/\partial\theta` at ``params`` has one row per output;
    the rows come from ``C`` vector-Jacobian products per example (``jax.vmap`` over the
    basis vectors), so memory holds ``batch_size × C × P`` numbers at most, never the
    ``N × C × P`` Jacobian. :math:`V_i` is the covariance of the linearised output under
    :math:`\theta \sim N(m, \mathrm{diag}(\sigma^2))`.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` on a batch: shape ``(B, C)``
        (logits) or ``(B,)`` (scalar regression, C = 1).
      params: the posterior mean m.
      sigma: posterior standard deviations σ, a tree like ``params`` (e.g.
        ``ivon_jax.posterior_std(opt_state, params)``).
      inputs: an array (or pytree of arrays) with a leading example axis of size N.
      batch_size: examples vectorised at a time; ``None`` does all N at once.

    Returns:
      ``V`` of shape ``(N, C, C)``, float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import sensitivity
      >>> apply_fn = lambda p, x: x @ p["w"]                       # (B, 2) -> (B, 3)
      >>> params, sigma = {"w": jnp.ones((2, 3))}, {"w": jnp.full((2, 3), 0.1)}
      >>> v = sensitivity.prediction_variance(apply_fn, params, sigma, jnp.ones((4, 2)))
      >>> v.shape, round(float(v[0, 0, 0]), 6)                    # 0.1² · (1 + 1)
      ((4, 3, 3), 0.02)

    References:
      Nickl, Xu, Tailor, Möllenhoff, Khan, "The Memory-Perturbation Equation: Understanding
      Model's Sensitivity to Data", NeurIPS 2023.
    """
    _check_sigma(sigma, params)
    _check_batch_size(batch_size)
    _num_examples(inputs)
    out_shape = jax.eval_shape(apply_fn, params, jax.tree.map(lambda a: a[:1], inputs)).shape
    g = _per_example_fn(apply_fn, "cross_entropy" if len(out_shape) == 2 else "squared")
    sigma_leaves = jax.tree.leaves(sigma)

    def one(x: Any) -> jax.Array:
        f, vjp_fn = jax.vjp(lambda p: g(p, x), params)
        num_out = f.shape[0]
        (rows,) = jax.vmap(vjp_fn)(jnp.eye(num_out, dtype=f.dtype))
        dt = stats_dtype(f.dtype)
        v = jnp.zeros((num_out, num_out), dt)
        for r, s in zip(jax.tree.leaves(rows), sigma_leaves, strict=True):
            r2 = jnp.reshape(r, (num_out, -1)).astype(dt)
            s2 = jnp.reshape(jnp.square(s.astype(dt)), (1, -1))
            v = v + (r2 * s2) @ r2.T
        return v

    return _map(one, inputs, batch_size)


def sensitivity(
    apply_fn: Callable[[Any, Any], jax.Array],
    params: optax.Params,
    sigma: optax.Params,
    inputs: Any,
    labels: jax.Array,
    loss: Literal["cross_entropy", "squared"] = "cross_entropy",
    batch_size: int | None = None,
) -> Sensitivity:
    r"""Per-example sensitivity :math:`V_i e_i`, its score, and the leave-one-out estimate.

    For each example, at the posterior mean m,

    .. math::
        e_i = \nabla_f \ell(y_i, f_i), \quad
        V_i e_i = J_i \big(\sigma^2 \odot J_i^\top e_i\big), \quad
        s_i = \|V_i e_i\|_2, \quad
        \mathrm{LOO} = \frac1N \sum_i \ell(y_i, f_i + V_i e_i),

    one VJP and one JVP per example. :math:`f_i + V_i e_i` approximates the output after
    retraining without example i (the memory-perturbation equation; exact up to a factor
    :math:`1/(1 - v_i)` for Bayesian linear regression with unit noise). High scores flag
    examples the model could only fit by memorising them: mislabeled or unusual ones.

    Losses: ``"cross_entropy"`` (``f`` logits of shape ``(C,)``, integer labels,
    :math:`e = \mathrm{softmax}(f) - \mathrm{onehot}(y)`) or ``"squared"`` (scalar ``f``,
    :math:`\ell = \tfrac12 (f - y)^2`, :math:`e = f - y`). σ must be the posterior of the
    sum of these per-example losses (IVON with ``ess`` = N and this loss as the mean loss).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` on a batch: ``(B, C)`` logits for
        cross-entropy; ``(B,)`` or ``(B, 1)`` for the squared loss.
      params: the posterior mean m.
      sigma: posterior standard deviations, a tree like ``params``
        (``ivon_jax.posterior_std(opt_state, params)``).
      inputs: array (or pytree of arrays) with a leading example axis of size N.
      labels: shape ``(N,)``: integer classes for cross-entropy, real targets for squared.
      loss: ``"cross_entropy"`` or ``"squared"``.
      batch_size: examples vectorised at a time (bounds memory); ``None`` does all at once.

    Returns:
      A :class:`Sensitivity` (``loo``, ``loss``, ``scores``, ``shifts``, ``residuals``,
      ``outputs``), float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import sensitivity
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params, sigma = {"w": jnp.zeros((2, 3))}, {"w": jnp.full((2, 3), 0.1)}
      >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
      >>> res = sensitivity.sensitivity(apply_fn, params, sigma, x, y)
      >>> res.scores.shape, bool(res.loo > res.loss)
      ((4,), True)

    References:
      Nickl, Xu, Tailor, Möllenhoff, Khan, "The Memory-Perturbation Equation: Understanding
      Model's Sensitivity to Data", NeurIPS 2023. Shen et al., "Variational Learning is
      Effective for Large Deep Networks", ICML 2024, §4.4 and App. C.6.
    """
    _check_loss(loss)
    _check_sigma(sigma, params)
    _check_batch_size(batch_size)
    num = _num_examples(inputs)
    labels = jnp.asarray(labels)
    if labels.shape != (num,):
        raise ValueError(
            f"ivon_jax.sensitivity: `labels` must have shape (N,) = ({num},), got "
            f"{labels.shape}."
        )
    if loss == "cross_entropy" and not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            "ivon_jax.sensitivity: with loss='cross_entropy', `labels` must be integer class "
            f"indices, got dtype {labels.dtype}."
        )
    g = _per_example_fn(apply_fn, loss)

    def one(example: tuple[Any, jax.Array]) -> tuple[jax.Array, ...]:
        x, y = example
        f, vjp_fn = jax.vjp(lambda p: g(p, x), params)
        dt = stats_dtype(f.dtype)
        f32 = f.astype(dt)
        e = _residual(f32, y, loss)
        (u,) = vjp_fn(e.astype(f.dtype))
        # σ² ⊙ Jᵀe in each parameter's dtype (a JVP tangent must match its primal).
        tangent = jax.tree.map(
            lambda u_, s, p: (u_.astype(dt) * jnp.square(s.astype(dt))).astype(p.dtype),
            u, sigma, params,
        )
        _, shift = jax.jvp(lambda p: g(p, x), (params,), (tangent,))
        shift = shift.astype(dt)
        return (
            f32, e, shift, _loss(f32, y, loss), _loss(f32 + shift, y, loss),
        )

    outputs, residuals, shifts, losses, loo_losses = _map(one, (inputs, labels), batch_size)
    return Sensitivity(
        loo=jnp.mean(loo_losses),
        loss=jnp.mean(losses),
        scores=jnp.linalg.norm(shifts, axis=-1),
        shifts=shifts,
        residuals=residuals,
        outputs=outputs,
    )


def loo_estimator(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Literal["cross_entropy", "squared"] = "cross_entropy",
    batch_size: int | None = None,
) -> Callable[[optax.Params, optax.OptState, tuple[Any, jax.Array]], tuple[jax.Array, jax.Array]]:
    r"""A callback for training loops: ``(params, opt_state, data) -> (loo, scores)``.

    The returned function is pure (jit it, call it every k steps): it reads σ from the IVON
    state with ``ivon_jax.posterior_std(opt_state, params)`` (σ = 0, no sensitivity, for
    parameters no IVON transform manages) and runs :func:`sensitivity` on ``data = (inputs,
    labels)``, usually the training set or a fixed subset of it.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs`` on a batch (see :func:`sensitivity`).
      loss: ``"cross_entropy"`` or ``"squared"``.
      batch_size: examples vectorised at a time; ``None`` does all at once.

    Returns:
      ``fn(params, opt_state, (inputs, labels)) -> (loo, scores)``: the LOO estimate
      :math:`\frac1N\sum_i \ell(y_i, f_i + V_i e_i)` (shape ``()``) and the scores
      :math:`\|V_i e_i\|_2` (shape ``(N,)``).

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import sensitivity
      >>> apply_fn = lambda p, x: x @ p["w"]
      >>> params = {"w": jnp.zeros((2, 3))}
      >>> state = ivon_jax.ivon(0.1, ess=4.0).init(params)
      >>> loo_fn = jax.jit(sensitivity.loo_estimator(apply_fn, batch_size=2))
      >>> loo, scores = loo_fn(params, state, (jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])))

    References:
      Nickl et al., "The Memory-Perturbation Equation", NeurIPS 2023. Shen et al.,
      "Variational Learning is Effective for Large Deep Networks", ICML 2024, §4.4.1.
    """
    _check_loss(loss)
    _check_batch_size(batch_size)

    def fn(
        params: optax.Params, opt_state: optax.OptState, data: tuple[Any, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        if not (isinstance(data, tuple) and len(data) == 2):
            raise TypeError(
                "ivon_jax.sensitivity: `data` must be a tuple `(inputs, labels)`, got "
                f"{type(data).__name__}."
            )
        sigma = posterior.posterior_std(opt_state, params)
        res = sensitivity(apply_fn, params, sigma, data[0], data[1], loss, batch_size)
        return res.loo, res.scores

    return fn
