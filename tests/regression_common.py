"""IVON on Bayesian linear regression, shared by the closed-form tests (test_closed_form.py,
test_prior.py): the loss ℓ̄(θ) = (1/N) Σ ½ (yᵢ − xᵢᵀθ)² trained in one jitted ``lax.scan``."""

import jax
import jax.numpy as jnp
import optax

import ivon_jax


def scan_regression(opt, params, state, x, y, *, steps, samples, seed, record):
    """``steps`` IVON steps on (x, y) with ``samples`` MC samples each, the step keys split
    from ``jax.random.key(seed)``. Returns ``((params, state), records)``, ``records`` being
    ``record(params, state)`` after every step, stacked by the scan."""
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    loss = lambda p: 0.5 * jnp.mean(jnp.square(yj - xj @ p["theta"]))
    vg = ivon_jax.value_and_grad(loss, num_samples=samples)

    def step(carry, key):
        params, state = carry
        _, grads, hess = vg(key, params, state)
        updates, state = opt.update(grads, state, params, hess=hess)
        params = optax.apply_updates(params, updates)
        return (params, state), record(params, state)

    keys = jax.random.split(jax.random.key(seed), steps)
    return jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, state), keys)
