"""The posterior q = N(m, σ²) defined by an IVON state: finding it, σ, and sampling from it."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import checks
from ivon_jax._src import noise
from ivon_jax._src.state import IVONState
from ivon_jax._src.state import prior_precision_leaves


class Managed(NamedTuple):
    """What defines σ for one parameter leaf that an IVON transform manages."""

    hess: jax.Array  # h for this leaf
    ess: jax.Array  # shape=(): λ of the transform that manages it
    weight_decay: jax.Array  # δ of that transform: shape=(), or h's shape (per-element prior)

    def precision(self) -> jax.Array:
        """λ (h + δ) = 1 / σ², in h's dtype."""
        dt = self.hess.dtype
        return self.ess.astype(dt) * (self.hess + self.weight_decay.astype(dt))


def _is_ivon_state(x: Any) -> bool:
    return isinstance(x, IVONState)


def find_ivon_states(opt_state: optax.OptState) -> list[IVONState]:
    """All IVON states inside ``opt_state``, however deeply nested.

    Works through ``optax.chain`` tuples, ``inject_hyperparams``, ``masked`` and
    ``multi_transform`` states, and Flax ``nnx.Optimizer`` states.

    Raises:
      ValueError: if there is none.

    Example:
      >>> import jax.numpy as jnp, optax, ivon_jax
      >>> opt = optax.chain(optax.clip_by_global_norm(1.0), ivon_jax.ivon(0.1, ess=100.0))
      >>> (state,) = ivon_jax.find_ivon_states(opt.init({"w": jnp.zeros(3)}))
      >>> type(state).__name__, int(state.count)
      ('IVONState', 0)
    """
    found = [
        x for x in jax.tree.leaves(opt_state, is_leaf=_is_ivon_state) if _is_ivon_state(x)
    ]
    multi = lambda x: isinstance(x, optax.MultiStepsState)
    if found and any(multi(x) for x in jax.tree.leaves(opt_state, is_leaf=multi)):
        raise ValueError(
            "ivon_jax: IVON is wrapped in `optax.MultiSteps`, which passes IVON only the last "
            "micro-batch's `hess` and so silently biases h. Accumulate micro-batches with "
            "`ivon_jax.accumulated_value_and_grad` instead."
        )
    if not found:
        raise ValueError(
            "ivon_jax: no IVON state found in the optimizer state (an object of type "
            f"{type(opt_state).__name__}). Pass the state made by `ivon_jax.ivon(...).init` "
            "or by a chain that contains `ivon_jax.scale_by_ivon`."
        )
    return found


def _scalar(x: Any) -> jax.Array:
    # An NNX optimizer state wraps each array in a Variable; its single leaf is the array.
    (leaf,) = jax.tree.leaves(x)
    return leaf


def state_managed(st: IVONState) -> list[tuple[tuple[Any, ...], Managed]]:
    """(path, :class:`Managed`) for each leaf of one IVON state's ``hess``, δ per element
    where the state holds a per-element prior precision."""
    ess = _scalar(st.ess)
    flat = jax.tree_util.tree_flatten_with_path(st.hess)[0]
    deltas = prior_precision_leaves(st)
    return [
        (checks.normalized_path(path), Managed(h, ess, d))
        for (path, h), d in zip(flat, deltas, strict=True)
    ]


def managed_leaves(
    tree: Any, opt_state: optax.OptState, tree_name: str = "params"
) -> tuple[list[jax.Array], list[Managed | None], Any]:
    """Aligns the leaves of ``tree`` (shaped like the parameters) with the IVON state(s).

    Returns:
      ``(leaves, managed, treedef)``: the leaves of ``tree``; for each, its :class:`Managed`
      entry or ``None`` where no IVON transform manages it (masked out or frozen); and the
      treedef to rebuild a tree like ``tree``.
    """
    table: dict[tuple[Any, ...], Managed] = {}
    for st in find_ivon_states(opt_state):
        for key, entry in state_managed(st):
            if key in table:
                raise ValueError(
                    f"ivon_jax: parameter {checks.path_str(key)} is managed by more than one "
                    "IVON transform; give each parameter to one of them."
                )
            table[key] = entry
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, managed, seen = [], [], 0
    for path, x in flat:
        entry = table.get(checks.normalized_path(path))
        if entry is not None:
            seen += 1
            if jnp.shape(x) != entry.hess.shape:
                raise ValueError(
                    f"ivon_jax: `{tree_name}{checks.path_str(path)}` has shape {jnp.shape(x)} "
                    f"but the IVON state holds shape {entry.hess.shape} for it."
                )
        leaves.append(x)
        managed.append(entry)
    if seen != len(table):
        tree_paths = {checks.normalized_path(p) for p, _ in flat}
        missing = [checks.path_str(k) for k in table if k not in tree_paths]
        raise ValueError(
            f"ivon_jax: the IVON state has leaves that `{tree_name}` lacks: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Was the optimizer "
            f"initialised with a tree like this `{tree_name}`?"
        )
    return leaves, managed, treedef


def posterior_std(opt_state: optax.OptState, params: optax.Params | None = None) -> Any:
    r"""The posterior standard deviation :math:`\sigma = 1/\sqrt{\lambda (h + \delta)}`.

    Args:
      opt_state: an optimizer state containing one or more IVON states.
      params: optional tree like the parameters. With it, the result has exactly its
        structure, with σ = 0 for leaves no IVON transform manages. Without it, the result
        has the structure of the IVON state's ``hess`` (``optax.MaskedNode`` where a mask
        excluded a parameter); this needs a single IVON state.

    Returns:
      σ as a pytree, in the statistics' dtype (float32 or wider).

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=1.0, weight_decay=0.0)
      >>> sigma = ivon_jax.posterior_std(opt.init({"w": jnp.zeros(2)}))
      >>> round(float(sigma["w"][0]), 6)  # 1 / sqrt(100 * 1)
      0.1
    """
    if params is not None:
        leaves, managed, treedef = managed_leaves(params, opt_state)
        out = [
            jnp.zeros(jnp.shape(x), jnp.result_type(x)) if m is None
            else jax.lax.rsqrt(m.precision())
            for x, m in zip(leaves, managed, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)
    states = find_ivon_states(opt_state)
    if len(states) > 1:
        raise ValueError(
            "ivon_jax: the optimizer state holds several IVON states; pass `params=` to get "
            "one tree of σ for all parameters."
        )
    (st,) = states
    sigmas = [jax.lax.rsqrt(m.precision()) for _, m in state_managed(st)]
    return jax.tree.unflatten(jax.tree.structure(st.hess), sigmas)


def sample_params(
    key: jax.Array,
    params: optax.Params,
    opt_state: optax.OptState,
    *,
    generator: noise.Generator = "fast",
) -> tuple[optax.Params, optax.Params]:
    r"""Draws weights from the posterior: :math:`\theta = m + \sigma \odot \epsilon`.

    Args:
      key: a JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      params: the posterior mean m (the parameters the optimizer updates).
      opt_state: an optimizer state containing the IVON state(s); nothing else is needed.
      generator: ``"fast"`` (default), a counter-based Gaussian generator several times
        cheaper than JAX's on CPU, or ``"threefry"`` for ``jax.random.normal``. Both are
        deterministic in the key; they give different (equally valid) draws.

    Returns:
      ``(sampled, noise)``, both like ``params`` and in its dtypes, with
      ``noise == sampled - params`` exactly: ``sampled`` is m + σ ⊙ ε (ε and σ in float32 or
      wider) rounded to the parameter dtype, and ``noise`` is the perturbation actually
      applied, which differs from σ ⊙ ε by that rounding. Leaves that no IVON transform
      manages (masked out, frozen) are returned unchanged with zero noise.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> params = {"w": jnp.zeros(3)}
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
    """
    leaves, managed, treedef = managed_leaves(params, opt_state)
    shapes_dtypes = [
        None if m is None else (jnp.shape(x), m.hess.dtype, noise.explicit_sharding(x))
        for x, m in zip(leaves, managed, strict=True)
    ]
    precisions = [None if m is None else m.precision() for m in managed]
    # σ ⊙ ε = ε / sqrt(λ (h + δ)), drawn and scaled together (see standard_normal_leaves).
    scaled_eps = noise.standard_normal_leaves(key, shapes_dtypes, generator, precisions)
    sampled, perturbation = [], []
    for x, m, e in zip(leaves, managed, scaled_eps, strict=True):
        if m is None:
            sampled.append(x)
            perturbation.append(jnp.zeros_like(x))
            continue
        x = jnp.asarray(x)
        dt = x.dtype
        s = (x.astype(e.dtype) + e).astype(dt)
        sampled.append(s)
        # The perturbation actually applied (after rounding θ to the parameter dtype), so that
        # Price's estimator sees the θ − m at which the gradient was taken.
        perturbation.append(s - x)
    return jax.tree.unflatten(treedef, sampled), jax.tree.unflatten(treedef, perturbation)
