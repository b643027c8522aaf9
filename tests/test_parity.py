"""Parity with the reference implementation ``ivon-opt`` (PyTorch), in float64.

Both sides see the same data, minibatches, initial weights and standard-normal draws ε
(``tests/reference/ivon_opt_parity.py``). The reference trajectories are stored test vectors;
when ``ivon-opt`` and ``torch`` are installed (``pip install -e ".[reference]"``) the live test
regenerates them and checks they are what the installed reference produces.

Here ``ivon_jax.sample_params`` runs unchanged except that its standard-normal generator is
replaced by the stored ε, so σ, the perturbation, the estimator and the update are all ours.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import ivon_opt_parity as P

import ivon_jax
from ivon_jax._src import noise as noise_module

TOL = 1e-10  # largest allowed max|jax - ref| / max|ref| for each of m, g, h at each checkpoint

CONFIGS = P.configs()


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    with np.load(P.VECTORS) as data:
        return {k: data[k] for k in data.files}


def _loss(params: list[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    w1, b1, w2, b2 = params
    logits = jnp.tanh(x @ w1.T + b1[None, :]) @ w2.T + b2[None, :]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _flat(tree: Any) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def run_ivon_jax(cfg: dict[str, Any], vec: dict[str, np.ndarray], monkeypatch) -> dict:
    """Runs ivon_jax on the parity problem; returns m, g, h at every step."""
    sizes = [int(np.prod(s)) for s in P.SHAPES]
    bounds = np.cumsum([0, *sizes])
    current_eps: list[jax.Array] = []

    def stored_normal(key, shapes_dtypes, generator="fast", precisions=None):
        # The stored ε in place of the generator; like the generator, divided by
        # sqrt(precision) when the library passes its λ(h + δ).
        del key, generator
        (flat,) = current_eps
        eps = [
            None if sd is None else flat[bounds[i] : bounds[i + 1]].reshape(sd[0]).astype(sd[1])
            for i, sd in enumerate(shapes_dtypes)
        ]
        if precisions is None:
            return eps
        return [None if e is None else e / jnp.sqrt(p)
                for e, p in zip(eps, precisions, strict=True)]

    monkeypatch.setattr(noise_module, "standard_normal_leaves", stored_normal)
    S = cfg["mc_samples"]
    opt = ivon_jax.ivon(
        P.COMMON["lr"], ess=P.COMMON["ess"], hess_init=P.COMMON["hess_init"],
        b1=P.COMMON["beta1"], b2=P.COMMON["beta2"], weight_decay=cfg["weight_decay"],
        clip_radius=cfg["clip_radius"], rescale_lr=cfg["rescale_lr"], debias=cfg["debias"],
    )
    with jax.enable_x64(True):
        init = jnp.asarray(vec["init"], jnp.float64)
        params = [init[bounds[i] : bounds[i + 1]].reshape(s) for i, s in enumerate(P.SHAPES)]
        state = opt.init(params)
        x_all = jnp.asarray(vec["x"], jnp.float64)
        y_all = jnp.asarray(vec["y"], jnp.int32)
        key = jax.random.key(0)  # unused: the stored ε replace the generator

        def step(carry, inputs):
            params, state = carry
            idx, eps_t = inputs
            xb, yb = x_all[idx], y_all[idx]
            grads_sum = hess_sum = None
            for s in range(S):
                current_eps[:] = [eps_t[s]]
                sampled, noise = ivon_jax.sample_params(key, params, state)
                grads = jax.grad(_loss)(sampled, xb, yb)
                hess = ivon_jax.estimate_hessian(grads, noise, state, cfg["hess_approx"])
                if grads_sum is None:
                    grads_sum, hess_sum = grads, hess
                else:
                    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                    hess_sum = jax.tree.map(jnp.add, hess_sum, hess)
            grads = jax.tree.map(lambda a: a / S, grads_sum)
            hess = jax.tree.map(lambda a: a / S, hess_sum)
            updates, state = opt.update(grads, state, params, hess=hess)
            params = optax.apply_updates(params, updates)
            ivon_state = ivon_jax.find_ivon_states(state)[0]
            out = (_flat(params), _flat(ivon_state.momentum), _flat(ivon_state.hess))
            return (params, state), out

        inputs = (jnp.asarray(vec["batches"], jnp.int32), jnp.asarray(vec["eps"], jnp.float64))
        _, (m, g, h) = jax.jit(lambda c, i: jax.lax.scan(step, c, i))((params, state), inputs)
        assert m.dtype == jnp.float64
        return {"m": np.asarray(m), "g": np.asarray(g), "h": np.asarray(h)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=[P.config_name(c) for c in CONFIGS])
def test_matches_reference_trajectory(cfg, vectors, monkeypatch):
    name = P.config_name(cfg)
    ours = run_ivon_jax(cfg, vectors, monkeypatch)
    rows = np.asarray(P.CHECKPOINTS) - 1
    worst = 0.0
    for k in ("m", "g", "h"):
        ref = vectors[f"{name}/{k}"]
        for i, t in enumerate(P.CHECKPOINTS):
            rel = _rel(ours[k][rows[i]], ref[i])
            worst = max(worst, rel)
            assert rel <= TOL, f"{k} differs at step {t}: relative difference {rel:.3e}"
    # The run must actually move: m away from its start, h away from hess_init.
    assert _rel(vectors[f"{name}/m"][-1], vectors["init"]) > 1e-2
    assert np.max(np.abs(vectors[f"{name}/h"][-1] - P.COMMON["hess_init"])) > 1e-2
    print(f"{name}: largest relative difference {worst:.2e}")


def test_parity_check_is_sharp(vectors, monkeypatch):
    """Configurations are told apart: running with debias flipped misses the reference."""
    cfg = CONFIGS[0]
    assert cfg["debias"]
    ours = run_ivon_jax({**cfg, "debias": False}, vectors, monkeypatch)
    ref = vectors[f"{P.config_name(cfg)}/m"][-1]
    assert _rel(ours["m"][-1], ref) > 1e-4


def test_stored_vectors_come_from_installed_reference(vectors):
    """Live check, when the reference extra is installed: regenerate and compare."""
    pytest.importorskip("torch")
    pytest.importorskip("ivon")
    problem = {k: vectors[k] for k in ("x", "y", "batches", "init", "eps")}
    for cfg in CONFIGS:
        traj = P.reference_trajectory(cfg, problem)
        for k in ("m", "g", "h"):
            np.testing.assert_allclose(
                traj[k], vectors[f"{P.config_name(cfg)}/{k}"], rtol=1e-13, atol=0
            )
