"""Argument and pytree checks shared by the transform, the sampler and the estimators.

Every check runs in Python at trace time: hyper-parameters are checked when they are concrete
(plain numbers or concrete arrays) and skipped when they are tracers (for example under
``optax.inject_hyperparams`` inside ``jax.jit``), and pytree mismatches are reported with the
paths of the offending leaves.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float if it is concrete, else ``None`` (a tracer)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None
    if arr.shape != ():
        raise ValueError(f"expected a scalar hyper-parameter, got an array of shape {arr.shape}")
    return float(arr)


def check_hyperparam(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    """Raises ``ValueError`` naming ``name`` if concrete ``value`` breaks ``rule``."""
    x = concrete_float(value)
    if x is not None and not ok(x):
        raise ValueError(f"ivon_jax: `{name}` must be {rule}, got {x!r}")


def normalized_path(path: Sequence[Any]) -> tuple[Any, ...]:
    """A key path with Flax NNX ``Variable`` wrappers (a trailing ``.value``) removed.

    NNX states wrap each array in a ``Variable`` whose pytree child is reached through
    ``.value``; stripping it lets a pure parameter tree be aligned with a wrapped optimizer
    state (as ``nnx.Optimizer`` holds it) and vice versa.
    """
    path = tuple(path)
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return path


def path_str(path: Sequence[Any]) -> str:
    s = jax.tree_util.keystr(tuple(path))
    return s if s else "<root>"


def _describe_missing(a_name: str, b_name: str, a_paths: set, b_paths: set) -> str:
    parts = []
    only_a = sorted(a_paths - b_paths, key=str)
    only_b = sorted(b_paths - a_paths, key=str)
    if only_a:
        shown = ", ".join(path_str(p) for p in only_a[:5])
        more = f" (and {len(only_a) - 5} more)" if len(only_a) > 5 else ""
        parts.append(f"{a_name} has leaves that {b_name} lacks: {shown}{more}")
    if only_b:
        shown = ", ".join(path_str(p) for p in only_b[:5])
        more = f" (and {len(only_b) - 5} more)" if len(only_b) > 5 else ""
        parts.append(f"{b_name} has leaves that {a_name} lacks: {shown}{more}")
    return "; ".join(parts)


def check_same_tree(a_name: str, a: Any, b_name: str, b: Any, hint: str = "") -> None:
    """Raises ``ValueError`` if pytrees ``a`` and ``b`` differ in structure or leaf shapes.

    The message names the first leaves that differ, by path.
    """
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(a)
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(b)
    if a_def != b_def:
        a_paths = {normalized_path(p) for p, _ in a_leaves}
        b_paths = {normalized_path(p) for p, _ in b_leaves}
        detail = _describe_missing(a_name, b_name, a_paths, b_paths)
        if not detail:
            detail = f"same leaf paths but different containers: {a_def} vs {b_def}"
        raise ValueError(
            f"ivon_jax: `{a_name}` and `{b_name}` must have the same tree structure; {detail}."
            + (f" {hint}" if hint else "")
        )
    for (path, x), (_, y) in zip(a_leaves, b_leaves, strict=True):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"ivon_jax: `{a_name}{path_str(path)}` has shape {jnp.shape(x)} but "
                f"`{b_name}{path_str(path)}` has shape {jnp.shape(y)}."
            )
