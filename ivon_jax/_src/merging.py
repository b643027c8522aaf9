r"""Uncertainty-guided model merging with IVON's Hessians (Daheim et al., 2024).

From a base model :math:`\theta_0` and ``T`` models :math:`\theta_t` fine-tuned from it, each
with a diagonal Hessian (precision) :math:`h_t`, the merged model is, elementwise,

.. math::
    \bar\theta = \theta_0 + \sum_t \frac{\alpha_t h_t}{h_0' + \sum_{t'} \alpha_{t'} h_{t'}}
                 \odot (\theta_t - \theta_0),

the diagonal form of :math:`(H_0 + \sum_t \alpha_t H_t)^{-1} \alpha_t H_t`. It is the exact
minimiser of :math:`\tfrac12 \|\theta - \theta_0\|^2_{h_0'} + \sum_t \tfrac{\alpha_t}{2}
\|\theta - \theta_t\|^2_{h_t}`, i.e. of the sum of the quadratic approximations of the task
objectives around their fine-tuned solutions plus a base quadratic. Equal Hessians and
:math:`h_0' = 0` give task arithmetic with weights :math:`\alpha_t / \sum_{t'} \alpha_{t'}`.

Units. IVON's state holds ``h`` in *per-example* units: the posterior precision is
:math:`\lambda (h + \delta)` (``ess`` λ, ``weight_decay`` δ). The Hessians passed to
:func:`merge` and the base precision :math:`h_0'` must share one unit; the ``units`` argument of
:func:`hessian_from_state` and the ``ess`` argument of :func:`squared_gradient_hessian` make the
choice explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ivon_jax._src import checks
from ivon_jax._src import posterior
from ivon_jax._src.state import stats_dtype

UNITS = ("precision", "data", "per_example")


# ----------------------------------------------------------------------------- input checks


def _check_models(base: Any, finetuned: Sequence[Any], name: str = "finetuned") -> int:
    if isinstance(finetuned, dict) or not isinstance(finetuned, Sequence):
        raise TypeError(
            f"ivon_jax.merging: `{name}` must be a sequence (list or tuple) of parameter trees, "
            f"one per task, got {type(finetuned).__name__}."
        )
    num_tasks = len(finetuned)
    if num_tasks < 1:
        raise ValueError(f"ivon_jax.merging: `{name}` must hold at least one model (T >= 1).")
    for t, tree in enumerate(finetuned):
        checks.check_same_tree(f"{name}[{t}]", tree, "base", base)
    for path, x in jax.tree_util.tree_flatten_with_path(base)[0]:
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(
                f"ivon_jax.merging: `base{checks.path_str(path)}` has dtype "
                f"{jnp.result_type(x)}; only floating-point parameters can be merged."
            )
    return num_tasks


def _check_weights(weights: Any, num_tasks: int, default: float) -> jax.Array:
    """The task weights α as a float array of shape (T,), checked when concrete."""
    if weights is None:
        return jnp.full((num_tasks,), default, stats_dtype(jnp.float32))
    if not isinstance(weights, jax.core.Tracer):
        w = np.asarray(weights)
        if w.shape != (num_tasks,):
            raise ValueError(
                f"ivon_jax.merging: `weights` must have one entry per task, shape "
                f"({num_tasks},), got shape {w.shape}."
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(
                f"ivon_jax.merging: `weights` must be finite and nonnegative, got {w.tolist()}."
            )
    weights = jnp.asarray(weights)
    if weights.shape != (num_tasks,):
        raise ValueError(
            f"ivon_jax.merging: `weights` must have shape ({num_tasks},), got {weights.shape}."
        )
    return weights.astype(stats_dtype(weights.dtype))


def _base_precision_leaves(base_precision: Any, base: Any) -> list[jax.Array]:
    leaves = jax.tree.leaves(base)
    if isinstance(base_precision, (int, float)) or (
        hasattr(base_precision, "shape") and jnp.shape(base_precision) == ()
    ):
        x = checks.concrete_float(base_precision)
        if x is not None and not (x >= 0 and np.isfinite(x)):
            raise ValueError(
                f"ivon_jax.merging: `base_precision` must be finite and >= 0, got {x!r}."
            )
        return [jnp.asarray(base_precision) for _ in leaves]
    checks.check_same_tree("base_precision", base_precision, "base", base)
    return jax.tree.leaves(base_precision)


def _wide_dtype(*arrays: jax.Array) -> jnp.dtype:
    # float64 if any input is, else float32 (explicit: strict promotion forbids mixing).
    dtypes = [stats_dtype(jnp.result_type(a)) for a in arrays]
    return max(dtypes, key=lambda d: d.itemsize)


# ----------------------------------------------------------------------------- merging


def task_arithmetic(
    base: optax.Params,
    finetuned: Sequence[optax.Params],
    weights: Sequence[float] | jax.Array | None = None,
) -> optax.Params:
    r"""Task arithmetic: :math:`\bar\theta = \theta_0 + \sum_t \alpha_t (\theta_t - \theta_0)`.

    With the default weights :math:`\alpha_t = 1/T` this is the plain average of the
    fine-tuned models. It is :func:`merge` with equal Hessians, zero base precision and
    weights normalised to sum to one.

    Args:
      base: the base (pretrained) parameters :math:`\theta_0`, any pytree of float arrays.
      finetuned: a sequence of ``T >= 1`` trees like ``base``, the fine-tuned models.
      weights: ``T`` nonnegative scaling factors :math:`\alpha_t`; ``None`` means
        :math:`1/T` each (averaging).

    Returns:
      The merged parameters, a tree like ``base`` in its dtypes.

    Raises:
      ValueError: if ``T < 1``, a tree differs from ``base`` in structure or shapes, or the
        weights have the wrong length or a negative entry.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> merged = merging.task_arithmetic(base, [{"w": jnp.ones(2)}, {"w": -jnp.ones(2)}])
      >>> merged["w"].tolist()
      [0.0, 0.0]

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    num_tasks = _check_models(base, finetuned)
    alphas = _check_weights(weights, num_tasks, 1.0 / num_tasks)
    base_leaves, treedef = jax.tree.flatten(base)
    task_leaves = [jax.tree.leaves(t) for t in finetuned]
    out = []
    for i, b in enumerate(base_leaves):
        dt = stats_dtype(b.dtype)
        b32 = b.astype(dt)
        delta = sum(
            alphas[t].astype(dt) * (task_leaves[t][i].astype(dt) - b32) for t in range(num_tasks)
        )
        out.append((b32 + delta).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


def merge(
    base: optax.Params,
    finetuned: Sequence[optax.Params],
    hessians: Sequence[optax.Params],
    weights: Sequence[float] | jax.Array | None = None,
    base_precision: float | jax.Array | optax.Params = 0.0,
) -> optax.Params:
    r"""Hessian-weighted (uncertainty-guided) merging of fine-tuned models.

    .. math::
        \bar\theta = \theta_0 + \sum_{t=1}^T \frac{\alpha_t h_t}
            {h_0' + \sum_{t'} \alpha_{t'} h_{t'}} \odot (\theta_t - \theta_0)

    elementwise. It is the exact minimiser of
    :math:`\tfrac12\|\theta-\theta_0\|^2_{h_0'} + \sum_t \tfrac{\alpha_t}{2}
    \|\theta-\theta_t\|^2_{h_t}`: each task pulls a parameter towards its fine-tuned value in
    proportion to how certain that task is about it. Where the denominator is not positive
    (no task and no base precision constrains a parameter) the parameter keeps its base
    value.

    All ``hessians`` and ``base_precision`` must be in the same unit (see
    :func:`hessian_from_state`): with ``units="precision"`` (:math:`\lambda(h+\delta)`), a
    natural base precision is the fine-tuning prior :math:`\lambda\delta`, or the base model's
    own precision if it was trained with IVON; with ``units="per_example"`` (IVON's ``h``), it
    is δ or the base model's ``h``.

    Args:
      base: base parameters :math:`\theta_0`, any pytree of float arrays.
      finetuned: sequence of ``T >= 1`` fine-tuned parameter trees like ``base``.
      hessians: sequence of ``T`` trees like ``base``, the diagonal Hessians :math:`h_t`
        (nonnegative; e.g. from :func:`hessian_from_state` or
        :func:`squared_gradient_hessian`).
      weights: ``T`` nonnegative :math:`\alpha_t`; ``None`` means 1 each.
      base_precision: :math:`h_0' \ge 0`, a scalar or a tree like ``base``.

    Returns:
      The merged parameters, a tree like ``base`` in its dtypes (computed in float32 or
      wider).

    Raises:
      ValueError: if ``T < 1``, ``len(hessians) != T``, a tree differs from ``base``, the
        weights have the wrong length or a negative entry, or a concrete scalar
        ``base_precision`` is negative.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import merging
      >>> base = {"w": jnp.zeros(2)}
      >>> tasks = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([-1.0, -1.0])}]
      >>> hess = [{"w": jnp.array([3.0, 1.0])}, {"w": jnp.array([1.0, 1.0])}]
      >>> merging.merge(base, tasks, hess)["w"].tolist()  # task 1 is surer of w[0]
      [0.5, 0.0]

    References:
      Daheim, Möllenhoff, Ponti, Gurevych, Khan, "Model Merging by Uncertainty-Based Gradient
      Matching", ICLR 2024. Shen et al., "Variational Learning is Effective for Large Deep
      Networks", ICML 2024, §4.3 and App. C.5.
    """
    num_tasks = _check_models(base, finetuned)
    if isinstance(hessians, dict) or not isinstance(hessians, Sequence):
        raise TypeError(
            "ivon_jax.merging: `hessians` must be a sequence of trees, one per fine-tuned "
            f"model, got {type(hessians).__name__}."
        )
    if len(hessians) != num_tasks:
        raise ValueError(
            f"ivon_jax.merging: got {num_tasks} fine-tuned models but {len(hessians)} "
            "Hessians; pass one Hessian tree per model."
        )
    _check_models(base, hessians, "hessians")
    alphas = _check_weights(weights, num_tasks, 1.0)
    h0_leaves = _base_precision_leaves(base_precision, base)
    base_leaves, treedef = jax.tree.flatten(base)
    task_leaves = [jax.tree.leaves(t) for t in finetuned]
    hess_leaves = [jax.tree.leaves(h) for h in hessians]
    out = []
    for i, b in enumerate(base_leaves):
        dt = _wide_dtype(b, *(h[i] for h in hess_leaves))
        b32 = b.astype(dt)
        scaled = [alphas[t].astype(dt) * hess_leaves[t][i].astype(dt) for t in range(num_tasks)]
        denom = h0_leaves[i].astype(dt) + sum(scaled)
        numer = sum(s * (task_leaves[t][i].astype(dt) - b32) for t, s in enumerate(scaled))
        positive = denom > 0
        # Nothing constrains the parameter (0/0): keep the base value.
        step = jnp.where(positive, numer / jnp.where(positive, denom, jnp.ones_like(denom)), 0)
        out.append((b32 + step.astype(dt)).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- Hessians


def hessian_from_state(
    opt_state: optax.OptState,
    params: optax.Params | None = None,
    units: Literal["precision", "data", "per_example"] = "precision",
) -> optax.Params:
    r"""The diagonal Hessian that IVON learned, read from its optimizer state (no extra cost).

    IVON keeps ``h`` in per-example units; its posterior precision is
    :math:`1/\sigma^2 = \lambda (h + \delta)`. ``units`` selects

    * ``"precision"`` (default): :math:`\lambda (h + \delta) = 1/\sigma^2`, the posterior
      precision, prior included. Always positive, and comparable between runs with different
      ``ess`` λ (e.g. tasks of different sizes). Use base precision :math:`\lambda\delta`.
    * ``"data"``: :math:`\lambda h`, the data term alone (``h`` may be slightly negative
      elementwise; such entries are returned as they are).
    * ``"per_example"``: :math:`h` as stored; comparable only between runs with equal λ.

    Args:
      opt_state: an optimizer state containing one or more IVON states (any nesting).
      params: optional tree like the parameters; with it the result has exactly its structure
        and zeros where no IVON transform manages a leaf (masked or frozen). Without it the
        state must hold a single IVON state and the result has the structure of its ``hess``.
      units: ``"precision"``, ``"data"`` or ``"per_example"``.

    Returns:
      A tree of Hessians in the statistics' dtype (float32 or wider).

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> from ivon_jax import merging
      >>> opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=0.5, weight_decay=1e-2)
      >>> state = opt.init({"w": jnp.zeros(2)})
      >>> merging.hessian_from_state(state)["w"].tolist()  # 100 * (0.5 + 0.01)
      [51.0, 51.0]

    References:
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024,
      App. C.5.
    """
    if units not in UNITS:
        raise ValueError(f"ivon_jax.merging: `units` must be one of {UNITS}, got {units!r}.")

    def convert(m: posterior.Managed) -> jax.Array:
        dt = m.hess.dtype
        if units == "precision":
            return m.precision()
        if units == "data":
            return m.ess.astype(dt) * m.hess
        return m.hess

    if params is not None:
        leaves, managed, treedef = posterior.managed_leaves(params, opt_state)
        out = [
            jnp.zeros(jnp.shape(x), stats_dtype(jnp.result_type(x))) if m is None else convert(m)
            for x, m in zip(leaves, managed, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)
    states = posterior.find_ivon_states(opt_state)
    if len(states) > 1:
        raise ValueError(
            "ivon_jax.merging: the optimizer state holds several IVON states; pass `params=` "
            "to get one tree of Hessians for all parameters."
        )
    (st,) = states
    out = [convert(m) for _, m in posterior.state_managed(st)]
    return jax.tree.unflatten(jax.tree.structure(st.hess), out)


def squared_gradient_hessian(
    loss_fn: Callable[..., jax.Array],
    params: optax.Params,
    data: Any,
    batch_size: int | None = None,
    ess: float | None = None,
    weight_decay: float = 0.0,
) -> optax.Params:
    r"""The squared-gradient (empirical Fisher, Laplace-style) diagonal Hessian: one data pass.

    .. math:: F = \frac1N \sum_{i=1}^N \nabla\ell_i(\theta) \odot \nabla\ell_i(\theta)

    with :math:`\ell_i` the loss on example ``i`` alone; per-example gradients are computed with
    ``jax.vmap`` over examples, ``batch_size`` at a time (memory grows with ``batch_size``,
    not ``N``). ``F`` is in IVON's per-example units (comparable to the ``h`` in its state);
    with ``ess`` λ given the result is the precision :math:`\lambda (F + \delta)`, in the units
    of ``hessian_from_state(..., units="precision")``. The paper evaluates it at a sample
    from the posterior: pass ``ivon_jax.sample_params(key, params, opt_state)[0]`` as
    ``params`` for that.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar``, the *mean* loss over a batch whose
        arrays have a leading example axis (the usual training loss); it is called on batches
        of one example.
      params: where to take the gradients (the fine-tuned model).
      data: a tuple of arrays (or pytrees) with a common leading axis of size ``N``, passed to
        ``loss_fn`` as ``*data`` (e.g. ``(inputs, labels)``).
      batch_size: examples per vectorised chunk; ``None`` does all ``N`` at once.
      ess: optional λ > 0; if given, return :math:`\lambda (F + \delta)` instead of F.
      weight_decay: δ ≥ 0, used only with ``ess``.

    Returns:
      A tree like ``params`` in float32 or wider.

    Example:
      >>> import jax.numpy as jnp
      >>> from ivon_jax import merging
      >>> loss = lambda p, x, y: jnp.mean(0.5 * (x * p["w"] - y) ** 2)
      >>> x, y = jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])
      >>> merging.squared_gradient_hessian(loss, {"w": jnp.array(1.0)}, (x, y))["w"].tolist()
      8.5

    References:
      Daheim et al., "Model Merging by Uncertainty-Based Gradient Matching", ICLR 2024.
      Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024,
      §4.3.2.
    """
    if not isinstance(data, tuple):
        raise TypeError(
            "ivon_jax.merging: `data` must be a tuple of arrays passed to `loss_fn(params, "
            f"*data)`, e.g. `(inputs, labels)`; got {type(data).__name__}."
        )
    num = _num_examples(data)
    if batch_size is None:
        batch_size = num
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"ivon_jax.merging: `batch_size` must be an int >= 1 or None, got {batch_size!r}."
        )
    if ess is not None:
        checks.check_hyperparam("ess", ess, lambda x: x > 0, "> 0")
    checks.check_hyperparam("weight_decay", weight_decay, lambda x: x >= 0, ">= 0")
    batch_size = min(batch_size, num)

    def sq_grad(example: Any) -> optax.Params:
        batch = jax.tree.map(lambda a: a[None], example)
        grads = jax.grad(loss_fn)(params, *batch)
        return jax.tree.map(lambda g: jnp.square(g.astype(stats_dtype(g.dtype))), grads)

    def chunk_sum(chunk: Any) -> optax.Params:
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), jax.vmap(sq_grad)(chunk))

    zeros = jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), stats_dtype(jnp.result_type(p))), params
    )
    num_full = num // batch_size
    head = jax.tree.map(
        lambda a: jnp.reshape(a[: num_full * batch_size], (num_full, batch_size, *a.shape[1:])),
        data,
    )

    def body(acc: optax.Params, chunk: Any) -> tuple[optax.Params, None]:
        return jax.tree.map(jnp.add, acc, chunk_sum(chunk)), None

    total, _ = jax.lax.scan(body, zeros, head)
    if num % batch_size:
        tail = jax.tree.map(lambda a: a[num_full * batch_size:], data)
        total = jax.tree.map(jnp.add, total, chunk_sum(tail))
    fisher = jax.tree.map(lambda s: s / jnp.asarray(num, s.dtype), total)
    if ess is None:
        return fisher
    return jax.tree.map(
        lambda f: jnp.asarray(ess, f.dtype) * (f + jnp.asarray(weight_decay, f.dtype)), fisher
    )


def _num_examples(data: tuple[Any, ...]) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("ivon_jax.merging: `data` holds no arrays.")
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(
            "ivon_jax.merging: every array in `data` needs the same leading (example) axis; "
            f"got leading sizes {sorted(str(s) for s in sizes)}."
        )
    (num,) = sizes
    if num == 0:
        raise ValueError("ivon_jax.merging: `data` holds no examples (N = 0).")
    return int(num)
