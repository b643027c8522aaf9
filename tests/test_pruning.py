"""Posterior pruning by signal-to-noise ratio |m|/σ and by magnitude, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ivon_jax


def _setup():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
    opt = ivon_jax.ivon(0.1, ess=10.0, weight_decay=0.0)
    precision = {"a": jnp.asarray(rng.uniform(0.1, 5, size=(5, 4)), jnp.float32),
                 "b": jnp.asarray(rng.uniform(0.1, 5, size=7), jnp.float32)}
    state = ivon_jax.set_prior(opt.init(params), precision=precision)
    return params, state


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 1.0])
def test_global_snr_against_numpy(fraction):
    params, state = _setup()
    pruned, mask = jax.jit(ivon_jax.prune_by_snr, static_argnums=2)(params, state, fraction)
    sigma = ivon_jax.posterior_std(state)
    score = np.concatenate([np.abs(np.asarray(params[k])).ravel() / np.asarray(sigma[k]).ravel()
                            for k in ("a", "b")])
    k = round(fraction * score.size)
    keep = np.ones(score.size, bool)
    keep[np.argsort(score, kind="stable")[:k]] = False
    got = np.concatenate([np.asarray(mask[k]).ravel() for k in ("a", "b")])
    np.testing.assert_array_equal(got, keep)
    assert (~got).sum() == k
    assert mask["a"].shape == (5, 4) and mask["a"].dtype == jnp.bool_
    for name in ("a", "b"):
        np.testing.assert_array_equal(
            np.asarray(pruned[name]), np.where(np.asarray(mask[name]), params[name], 0.0)
        )


def test_per_leaf_and_magnitude_and_ties():
    params, state = _setup()
    _, mask = ivon_jax.prune_by_snr(params, state, 0.5, per_leaf=True)
    assert (~np.asarray(mask["a"])).sum() == 10 and (~np.asarray(mask["b"])).sum() == 4
    _, mask = ivon_jax.prune_by_magnitude({"w": jnp.ones(4)}, 0.5)  # all tied: earliest go
    assert np.asarray(mask["w"]).tolist() == [False, False, True, True]
    _, mask = ivon_jax.prune_by_magnitude(params, 0.25)
    flat = np.abs(np.concatenate([np.asarray(params[k]).ravel() for k in ("a", "b")]))
    got = np.concatenate([np.asarray(mask[k]).ravel() for k in ("a", "b")])
    assert flat[~got].max() <= flat[got].min() and (~got).sum() == round(0.25 * 27)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "half", True, float("nan")])
def test_bad_fraction_raises(fraction):
    params, state = _setup()
    with pytest.raises(ValueError, match="fraction"):
        ivon_jax.prune_by_snr(params, state, fraction)


def test_mask_restricts_the_candidates_and_the_count():
    """A mask (as optax.masked takes it) keeps the masked-out leaves whole and prunes the
    fraction of the candidates' elements only, lowest |m|/σ first."""
    params, state = _setup()
    sigma = ivon_jax.posterior_std(state)
    for mask_arg in ({"a": False, "b": True}, lambda p: {"a": False, "b": True}):
        pruned, mask = ivon_jax.prune_by_snr(params, state, 3 / 7, mask=mask_arg)
        assert np.asarray(mask["a"]).all()
        np.testing.assert_array_equal(np.asarray(pruned["a"]), np.asarray(params["a"]))
        score = np.abs(np.asarray(params["b"])) / np.asarray(sigma["b"])
        keep = np.ones(7, bool)
        keep[np.argsort(score, kind="stable")[:3]] = False
        np.testing.assert_array_equal(np.asarray(mask["b"]), keep)
    # A prefix: one bool for a whole subtree.
    nested = {"head": params["a"], "adapters": {"b": params["b"]}}
    _, mask = ivon_jax.prune_by_magnitude(nested, 0.5, mask={"head": False, "adapters": True})
    assert np.asarray(mask["head"]).all() and (~np.asarray(mask["adapters"]["b"])).sum() == 4
    with pytest.raises(ValueError, match="mask"):
        ivon_jax.prune_by_magnitude(nested, 0.5, mask={"head": False})
    with pytest.raises(ValueError, match="mask"):
        ivon_jax.prune_by_magnitude(nested, 0.5, mask={"head": 1, "adapters": True})
