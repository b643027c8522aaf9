"""Mixed precision: bfloat16 parameters and activations, float32 IVON statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ivon_jax

D, H, C, N, STEPS = 8, 32, 3, 256, 300


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(D, C)), axis=1).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _train(dtype):
    x, y = _data()
    rng = np.random.default_rng(1)
    params = {
        "w1": jnp.asarray(rng.normal(size=(D, H)) / np.sqrt(D), dtype),
        "w2": jnp.asarray(rng.normal(size=(H, C)) / np.sqrt(H), dtype),
    }

    def loss_fn(p, x, y):
        logits = jnp.tanh(x.astype(dtype) @ p["w1"]) @ p["w2"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        return ce.mean()

    opt = ivon_jax.ivon(0.2, ess=float(N), hess_init=0.5, b2=0.99999)
    state = opt.init(params)
    vg = ivon_jax.value_and_grad(loss_fn)

    def step(carry, key):
        params, state = carry
        loss, grads, hess = vg(key, params, state, x, y)
        updates, state = opt.update(grads, state, params, hess=hess)
        return (optax.apply_updates(params, updates), state), loss

    keys = jax.random.split(jax.random.key(3), STEPS)
    (params, state), losses = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, state), keys)
    return params, state, np.asarray(losses)


def test_bfloat16_training_keeps_float32_statistics_and_learns():
    params, state, losses = _train(jnp.bfloat16)
    ivon_state = ivon_jax.find_ivon_states(state)[0]
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    assert all(h.dtype == jnp.float32 for h in jax.tree.leaves(ivon_state.hess))
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(ivon_state.momentum))
    # h moved from h₀ = 0.5 although each step changes it by ~1e-5 relative: a bfloat16 h
    # (resolution 2^-8 ≈ 0.4%) could not have moved at all.
    h = np.asarray(ivon_state.hess["w1"])
    assert np.all(np.isfinite(h))
    assert np.mean(np.abs(h - 0.5)) > 1e-4
    assert losses[-20:].mean() < 0.7 * losses[:20].mean()


def test_bfloat16_run_tracks_the_float32_run():
    """Same keys and data: the bfloat16 run's loss curve stays near the float32 one."""
    _, state16, l16 = _train(jnp.bfloat16)
    _, state32, l32 = _train(jnp.float32)
    # Loss curves averaged over windows of 50 steps agree to 0.05 nats.
    w16 = l16.reshape(-1, 50).mean(axis=1)
    w32 = l32.reshape(-1, 50).mean(axis=1)
    np.testing.assert_allclose(w16, w32, atol=0.05)
    # h's movement away from h₀ (≈1.4e-3 on average) agrees elementwise to 10% of its size
    # (seen: ≈1.4e-5); a frozen or wrongly updated h would be off by ~100%.
    for k in ("w1", "w2"):
        d16 = np.asarray(ivon_jax.find_ivon_states(state16)[0].hess[k]) - 0.5
        d32 = np.asarray(ivon_jax.find_ivon_states(state32)[0].hess[k]) - 0.5
        assert np.max(np.abs(d16 - d32)) < 0.1 * np.mean(np.abs(d32))
