"""Hessian estimators: turn gradients at sampled weights into ĥ for IVON's update."""

from __future__ import annotations

from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from ivon_jax._src import checks
from ivon_jax._src import posterior

METHODS = ("price", "gradsq")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(
            f"ivon_jax: unknown Hessian estimator method {method!r}; expected one of {METHODS}."
        )


def estimate_hessian(
    grads: optax.Updates,
    noise: optax.Updates | None,
    opt_state: optax.OptState,
    method: Literal["price", "gradsq"] = "price",
) -> optax.Updates:
    r"""Estimates the diagonal Hessian ĥ from a gradient at sampled weights.

    ``"price"`` (default; Price's theorem / reparameterisation):

    .. math:: \hat h = \nabla\hat\ell(\theta) \odot (\theta - m) / \sigma^2
              = \nabla\hat\ell(\theta) \odot \text{noise} \cdot \lambda (h + \delta)

    ``"gradsq"`` (squared-gradient ablation): :math:`\hat h = \lambda\, \nabla\hat\ell(\theta)^2`.

    The loss must be the *mean* over the minibatch (a summed loss inflates ĥ by the batch
    size). Estimates from several samples, micro-batches or devices average linearly, like
    the gradients.

    Args:
      grads: gradient of the minibatch loss at ``sampled`` (from :func:`sample_params`).
      noise: the matching ``noise`` from :func:`sample_params` (unused by ``"gradsq"``,
        which accepts ``None``).
      opt_state: the optimizer state holding the IVON state(s).
      method: ``"price"`` or ``"gradsq"``.

    Returns:
      ĥ, a tree like ``grads`` in the statistics' dtype (float32 or wider); zeros for leaves
      no IVON transform manages.

    Example:
      >>> import jax, jax.numpy as jnp, ivon_jax
      >>> params = {"w": jnp.zeros(3)}
      >>> state = ivon_jax.ivon(0.1, ess=100.0).init(params)
      >>> sampled, noise = ivon_jax.sample_params(jax.random.key(0), params, state)
      >>> grads = jax.grad(lambda p: jnp.mean(p["w"] ** 2))(sampled)
      >>> hess = ivon_jax.estimate_hessian(grads, noise, state)
    """
    check_method(method)
    if method == "price":
        if noise is None:
            raise ValueError("ivon_jax: the 'price' estimator needs the `noise` of the sample.")
        checks.check_same_tree("noise", noise, "grads", grads)
        noise_leaves = jax.tree.leaves(noise)
    leaves, managed, treedef = posterior.managed_leaves(grads, opt_state, "grads")
    out: list[Any] = []
    for i, (g, m) in enumerate(zip(leaves, managed, strict=True)):
        if m is None:
            out.append(jnp.zeros_like(g))
            continue
        dt = m.hess.dtype
        if method == "price":
            # (noise ⊙ g) (h + δ) λ, in the order the reference implementation uses.
            h_hat = (noise_leaves[i].astype(dt) * g.astype(dt)) * (
                m.hess + m.weight_decay.astype(dt)
            ) * m.ess.astype(dt)
        else:
            h_hat = jnp.square(g.astype(dt)) * m.ess.astype(dt)
        out.append(h_hat)
    return jax.tree.unflatten(treedef, out)
