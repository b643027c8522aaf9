"""Posterior pruning: drop the weights whose posterior is least distinguishable from zero."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import posterior


def _check_fraction(fraction: Any) -> float:
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not ok or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(
            f"ivon_jax: `fraction` must be a Python number in [0, 1] (the share of elements "
            f"to prune), got {fraction!r}."
        )
    return float(fraction)


def _candidates(params: optax.Params, mask: Any) -> list[bool]:
    """Per leaf of ``params``: may it be pruned? ``mask`` is None (every leaf), a tree or
    tree prefix of Python bools like ``params``, or a callable ``params -> such a tree``."""
    n = len(jax.tree.leaves(params))
    if mask is None:
        return [True] * n
    if callable(mask):
        mask = mask(params)
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    except ValueError as e:
        raise ValueError(
            "ivon_jax: `mask` must be a tree (or a prefix of the tree) of `params` with a "
            f"Python bool per leaf or subtree, or a callable returning one; {e}"
        ) from None
    flat = jax.tree.leaves(full)
    if len(flat) != n or not all(isinstance(m, bool | jnp.bool_) for m in flat):
        raise ValueError(
            "ivon_jax: `mask` must hold a Python bool per leaf (or subtree) of `params`, "
            "True where elements may be pruned."
        )
    return [bool(m) for m in flat]


def _prune(
    params: optax.Params,
    scores: list[jax.Array | None],
    fraction: float,
    per_leaf: bool,
) -> tuple[optax.Params, optax.Params]:
    """Zeroes the ``round(fraction * n)`` lowest-scoring elements; ``None`` = never pruned.

    Ties are broken by position (leaf order, then row-major index): the earlier element is
    pruned first, so the result is deterministic.
    """
    leaves, treedef = jax.tree.flatten(params)
    keeps: list[jax.Array | None] = [None] * len(leaves)
    groups = [[i] for i, s in enumerate(scores) if s is not None]
    if not per_leaf:
        groups = [[i for g in groups for i in g]] if groups else []
    for group in groups:
        flat = jnp.concatenate([scores[i].reshape(-1) for i in group])
        k = int(round(fraction * flat.size))
        order = jnp.argsort(flat, stable=True)
        keep = jnp.ones(flat.shape, bool).at[order[:k]].set(False)
        start = 0
        for i in group:
            size = scores[i].size
            keeps[i] = keep[start : start + size].reshape(jnp.shape(leaves[i]))
            start += size
    pruned, masks = [], []
    for x, keep in zip(leaves, keeps, strict=True):
        if keep is None:
            pruned.append(x)
            masks.append(jnp.ones(jnp.shape(x), bool))
        else:
            x = jnp.asarray(x)
            pruned.append(jnp.where(keep, x, jnp.zeros((), x.dtype)))
            masks.append(keep)
    return jax.tree.unflatten(treedef, pruned), jax.tree.unflatten(treedef, masks)


def prune_by_snr(
    params: optax.Params,
    opt_state: optax.OptState,
    fraction: float,
    *,
    per_leaf: bool = False,
    mask: Any = None,
) -> tuple[optax.Params, optax.Params]:
    r"""Prunes the ``fraction`` of weights with the lowest signal-to-noise ratio ``|m|/σ``.

    The score of an element is :math:`|m| / \sigma = |m| \sqrt{\lambda (h + \delta)}`: a
    weight whose posterior puts much mass near zero goes first, even if ``|m|`` is not small
    (Graves 2011; Blundell et al. 2015). Pruned elements are set to 0.

    Args:
      params: the posterior mean m.
      opt_state: the optimizer state holding σ (the IVON state(s)).
      fraction: a Python number in [0, 1]; ``round(fraction * n)`` elements are pruned,
        n counting the elements IVON manages (all of them, or each leaf's with
        ``per_leaf``). Leaves no IVON transform manages are kept as they are.
      per_leaf: prune the fraction of every leaf separately instead of over the whole tree.
      mask: which leaves may be pruned, as in ``optax.masked``: a tree (or tree prefix) of
        ``params`` holding a Python bool per leaf or subtree, or a callable returning one;
        None (the default): every leaf IVON manages. Leaves masked out are kept and not
        counted in n (e.g. prune LoRA adapters but not the classifier head).

    Returns:
      ``(pruned_params, mask)``: ``mask`` is a tree like ``params`` of boolean arrays, True
      where the element is kept. Ties in the score are broken by position (the earlier
      element, in leaf order and row-major index, is pruned first). Works under
      ``jax.jit`` with ``fraction`` and ``per_leaf`` static.

    Raises:
      ValueError: if ``fraction`` is not a number in [0, 1], or ``mask`` does not match
        ``params``.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> params = {"w": jnp.array([0.1, -3.0, 0.5, 2.0])}
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> pruned, mask = ivon_jax.prune_by_snr(params, state, 0.5)
      >>> mask["w"].tolist(), pruned["w"].tolist()
      ([False, True, False, True], [0.0, -3.0, 0.0, 2.0])
    """
    fraction = _check_fraction(fraction)
    leaves, managed, _ = posterior.managed_leaves(params, opt_state)
    scores = [
        None if m is None or not ok
        else jnp.abs(jnp.asarray(x).astype(m.hess.dtype)) * jnp.sqrt(m.precision())
        for x, m, ok in zip(leaves, managed, _candidates(params, mask), strict=True)
    ]
    return _prune(params, scores, fraction, per_leaf)


def prune_by_magnitude(
    params: optax.Params,
    fraction: float,
    *,
    per_leaf: bool = False,
    mask: Any = None,
) -> tuple[optax.Params, optax.Params]:
    """Prunes the ``fraction`` of floating-point weights with the lowest magnitude ``|m|``.

    The baseline for :func:`prune_by_snr`, and the way to prune weights trained with any
    optimizer (AdamW, SGD). Same rules: ``round(fraction * n)`` elements set to 0, ties
    broken by position, non-floating leaves kept.

    Args:
      params: the weights.
      fraction: a Python number in [0, 1].
      per_leaf: prune the fraction of every leaf separately.
      mask: which leaves may be pruned (see :func:`prune_by_snr`).

    Returns:
      ``(pruned_params, mask)``, ``mask`` True where kept.

    Raises:
      ValueError: if ``fraction`` is not a number in [0, 1], or ``mask`` does not match
        ``params``.

    Example:
      >>> import jax.numpy as jnp, ivon_jax
      >>> pruned, mask = ivon_jax.prune_by_magnitude({"w": jnp.array([0.1, -3.0, 0.5])}, 0.34)
      >>> mask["w"].tolist()
      [False, True, True]
    """
    fraction = _check_fraction(fraction)
    leaves = jax.tree.leaves(params)
    scores = [
        jnp.abs(jnp.asarray(x))
        if ok and jnp.issubdtype(jnp.result_type(x), jnp.floating) else None
        for x, ok in zip(leaves, _candidates(params, mask), strict=True)
    ]
    return _prune(params, scores, fraction, per_leaf)
