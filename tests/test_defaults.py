"""The default path: ``total_steps`` choosing β₂, ``hess_init="auto"``, and the diagnostics
that say whether the posterior learns (``state_summary``'s learning keys,
``posterior_health``).

Truths used: for a quadratic loss ½ Σ a_i (θ_i - c_i)² the Price estimator ĥ = g ⊙ ε / σ
has expectation exactly a (the Hessian's diagonal) at any σ; h's update with ĥ = 0 is the
closed-form decay h₀β₂ᵗ up to the Riemannian term ½(1-β₂)²h²/(h+δ) (which the test bounds).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ivon_jax
from ivon_jax._src import transform


def _quadratic(curv, centre):
    def loss(p):
        return sum(0.5 * jnp.sum(curv[k] * (p[k] - centre[k]) ** 2) for k in p)
    return loss


# ----------------------------------------------------------------------------- total_steps


def test_total_steps_sets_b2_and_explicit_b2_wins():
    params = {"w": jnp.zeros(4)}
    for steps in (100, 1920, 50_000):
        (st,) = ivon_jax.find_ivon_states(
            ivon_jax.ivon(0.1, ess=10.0, total_steps=steps).init(params))
        assert float(st.b2) == pytest.approx(1 - 2 / steps, rel=1e-6)
        # h₀'s share at the end, β₂ᵀ = exp(T log(1 - 2/T)) ≈ exp(-2 - 2/T).
        assert steps * np.log(float(st.b2)) == pytest.approx(-2 - 2 / steps, abs=0.02)
    (st,) = ivon_jax.find_ivon_states(
        ivon_jax.ivon(0.1, ess=10.0, b2=0.99, total_steps=1000).init(params))
    assert float(st.b2) == pytest.approx(0.99)
    (st,) = ivon_jax.find_ivon_states(ivon_jax.ivon(0.1, ess=10.0).init(params))
    assert float(st.b2) == pytest.approx(0.99999)


def test_total_steps_b2_is_what_the_update_uses():
    """h after one step with ĥ = 0 is β₂h₀ + ½(1-β₂)²h₀²/(h₀+δ) with the chosen β₂."""
    params = {"w": jnp.zeros(3)}
    opt = ivon_jax.ivon(0.1, ess=10.0, hess_init=0.5, weight_decay=0.0, total_steps=50)
    state = opt.init(params)
    zeros = {"w": jnp.zeros(3)}
    _, state = opt.update(zeros, state, params, hess=zeros)
    b2 = 1 - 2 / 50
    want = b2 * 0.5 + 0.5 * (1 - b2) ** 2 * 0.5
    got = ivon_jax.find_ivon_states(state)[0].hess["w"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("bad", [0, 2, -10, 2.5, True, "100"])
def test_bad_total_steps_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="total_steps"):
        ivon_jax.ivon(0.1, ess=10.0, total_steps=bad)


def test_bad_hess_init_string_is_refused():
    with pytest.raises(ValueError, match="hess_init.*auto"):
        ivon_jax.ivon(0.1, ess=10.0, hess_init="automatic")


# ----------------------------------------------------------------------------- auto h₀


def _auto_run(curv, steps, ess=10.0, lr=0.0, seed=0, weight_decay=1e-4):
    params = {k: jnp.zeros_like(v) for k, v in curv.items()}
    centre = {k: jnp.ones_like(v) for k, v in curv.items()}
    loss = _quadratic(curv, centre)
    opt = ivon_jax.ivon(lr, ess=ess, hess_init="auto", weight_decay=weight_decay)
    state = opt.init(params)
    vg = jax.jit(ivon_jax.value_and_grad(loss))
    upd = jax.jit(lambda g, s, p, h: opt.update(g, s, p, hess=h))
    history = []
    for t in range(steps):
        _, grads, hess = vg(jax.random.key(seed * 1000 + t), params, state)
        updates, state = upd(grads, state, params, hess)
        params = optax.apply_updates(params, updates)
        history.append(ivon_jax.find_ivon_states(state)[0])
    return params, state, history


def test_auto_hess_init_recovers_each_leafs_curvature():
    """Two leaves with curvatures 0.01 and 3: after the 20 calibration steps each leaf's h₀
    is its curvature (the leaf mean of unbiased ĥ over 20 x 4096 draws: ĥ = a ε² - a ε/σ
    with σ = 1/√10 here, so the estimate's std is ≈ 1.1 %; tolerance 6 %), and h starts
    there. Both leaves are large: no floor from the other's curvature."""
    curv = {"a": jnp.full((64, 64), 0.01), "b": jnp.full((64, 64), 3.0)}
    _, _, hist = _auto_run(curv, transform.AUTO_STEPS + 1)
    placeholder = transform.AUTO_PLACEHOLDER
    for st in hist[: transform.AUTO_STEPS - 1]:  # h held at the placeholder meanwhile
        for h in jax.tree.leaves(st.hess):
            np.testing.assert_array_equal(np.asarray(h), placeholder)
    done = hist[transform.AUTO_STEPS - 1]
    assert int(done.count) == transform.AUTO_STEPS
    for k, a in (("a", 0.01), ("b", 3.0)):
        h0 = float(done.hess_init[k])
        assert h0 == pytest.approx(a, rel=0.06), (k, h0)
        np.testing.assert_allclose(np.asarray(done.hess[k]), h0, rtol=1e-6)
    # The next step updates h from h₀ as usual (no longer constant).
    after = hist[transform.AUTO_STEPS]
    assert float(jnp.std(after.hess["b"])) > 0


def test_auto_floor_for_a_small_noisy_leaf():
    """A small leaf (< AUTO_SMALL elements) whose mean ĥ is below AUTO_SHARE x the
    all-element mean gets that floor; the large leaf keeps its own (std of its estimate
    ≈ 0.5 %, tolerance 3 %)."""
    curv = {"big": jnp.full((128, 128), 0.2), "tiny": jnp.full((3,), 1e-5)}
    _, _, hist = _auto_run(curv, transform.AUTO_STEPS)
    h0 = hist[-1].hess_init
    overall = float(h0["big"])  # the big leaf dominates the all-element mean
    assert float(h0["tiny"]) >= transform.AUTO_SHARE * overall * 0.99
    assert float(h0["big"]) == pytest.approx(0.2, rel=0.03)


def test_auto_rescaled_step_is_sgd_like_then_scaled_by_h0():
    """With rescale_lr, a calibration step is -lr (ḡ + δm) exactly (the placeholder cancels),
    and after calibration the step is -lr (h₀ + δ)(ḡ + δm)/(h + δ) per leaf."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6)}
    wd, lr = 1e-3, 0.05
    opt = ivon_jax.ivon(lr, ess=100.0, hess_init="auto", weight_decay=wd, b1=0.0,
                        skip_nonfinite=False)
    state = opt.init(params)
    grads = {"w": jnp.arange(6.0)}
    hess = {"w": jnp.full(6, 0.3)}
    updates, state = opt.update(grads, state, params, hess=hess)
    want = -lr * (grads["w"] + wd * params["w"])
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(want), rtol=1e-6)
    for _ in range(transform.AUTO_STEPS):
        updates, state = opt.update(grads, state, params, hess=hess)
    (st,) = ivon_jax.find_ivon_states(state)
    h0, h = float(st.hess_init["w"]), st.hess["w"]
    assert h0 == pytest.approx(0.3, rel=1e-5)
    want = -lr * (h0 + wd) * (grads["w"] + wd * params["w"]) / (h + wd)
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(want), rtol=1e-5)


def test_auto_calibration_ignores_skipped_steps():
    """A step with a NaN gradient is skipped by the guard: the count and the running mean
    are unchanged, so the calibration still averages AUTO_STEPS good steps."""
    params = {"w": jnp.zeros(8)}
    opt = ivon_jax.ivon(0.1, ess=100.0, hess_init="auto")
    state = opt.init(params)
    g = {"w": jnp.ones(8)}
    _, state = opt.update(g, state, params, hess={"w": jnp.full(8, 2.0)})
    before = ivon_jax.find_ivon_states(state)[0]
    bad = {"w": jnp.full(8, jnp.nan)}
    _, state = opt.update(bad, state, params, hess={"w": jnp.full(8, 50.0)})
    after = ivon_jax.find_ivon_states(state)[0]
    assert int(after.count) == int(before.count) == 1
    assert float(after.hess_init["w"]) == float(before.hess_init["w"]) == 2.0


def test_auto_trains_under_jit_and_scan():
    curv = {"w": jnp.full((16,), 2.0)}
    params = {"w": jnp.zeros(16)}
    loss = _quadratic(curv, {"w": jnp.ones(16)})
    opt = ivon_jax.ivon(0.5, ess=1e4, hess_init="auto", total_steps=200)
    vg = ivon_jax.value_and_grad(loss)

    def step(carry, key):
        p, s = carry
        value, grads, hess = vg(key, p, s)
        u, s = opt.update(grads, s, p, hess=hess)
        return (optax.apply_updates(p, u), s), value

    (p, s), losses = jax.lax.scan(step, (params, opt.init(params)),
                                  jax.random.split(jax.random.key(0), 200))
    assert float(losses[-20:].mean()) < 0.05 * float(losses[0])
    np.testing.assert_allclose(np.asarray(p["w"]), 1.0, atol=0.05)


# ----------------------------------------------------------------------------- diagnostics


def _feed(opt, params, hess_value, steps):
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    hess = jax.tree.map(lambda p: jnp.full_like(p, hess_value), params)
    upd = jax.jit(lambda s: opt.update(zeros, s, params, hess=hess)[1])
    for _ in range(steps):
        state = upd(state)
    return state


def test_summary_sees_h_that_only_decays_and_h_that_learned():
    params = {"w": jnp.zeros((10, 10))}
    opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=1.0, b2=0.99, weight_decay=1e-4)
    # ĥ = 0: h is h₀β₂ᵗ (plus the Riemannian term, ≤ ½(1-β₂)² h per step: < 1 % here).
    decayed = ivon_jax.state_summary(_feed(opt, params, 0.0, 150))
    assert float(decayed["h_p50"]) == pytest.approx(0.99**150, rel=0.02)
    assert float(decayed["frac_h_learned"]) == 0.0
    assert float(decayed["h_decay_share"]) > 0.98
    assert float(decayed["h0_weight"]) == pytest.approx(0.99**150, rel=1e-5)
    # ĥ = 1000 h₀: h is the data's, h₀'s share is tiny.
    learned = ivon_jax.state_summary(_feed(opt, params, 1000.0, 150))
    assert float(learned["frac_h_learned"]) == 1.0
    assert float(learned["h_decay_share"]) < 1e-3
    # σ/σ_prior = √(δ/(h+δ)), checked against posterior_std and 1/√(λδ).
    sigma = np.asarray(ivon_jax.posterior_std(_feed(opt, params, 1000.0, 150))["w"])
    ratio = np.median(sigma * np.sqrt(100.0 * 1e-4))
    assert float(learned["sigma_prior_ratio_p50"]) == pytest.approx(ratio, rel=1e-4)


def test_posterior_health_warns_when_h_only_decays(caplog):
    params = {"w": jnp.zeros((10, 10))}
    opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=1.0, b2=0.999, weight_decay=1e-4)
    state = _feed(opt, params, 0.0, 150)
    with caplog.at_level(logging.WARNING, logger="ivon_jax"):
        msgs = ivon_jax.posterior_health(state)
    assert len(msgs) == 1 and "h₀'s decay" in msgs[0] and "total_steps" in msgs[0]
    assert msgs[0] in caplog.text
    # The same state after the data moved h: no warning.
    assert ivon_jax.posterior_health(_feed(opt, params, 50.0, 150), warn=False) == []
    # Too early to tell: no warning at step 20 even though h only decayed.
    assert ivon_jax.posterior_health(_feed(opt, params, 0.0, 20), warn=False) == []


def test_posterior_health_is_quiet_on_the_total_steps_path_where_h_has_decayed():
    """At the end of a total_steps run h₀'s weight is exp(-2): h that is still h₀'s decay
    (ĥ below it) is the path's normal state, not a warning; the same h with β₂ = 0.99999
    (h₀'s weight 0.99) is."""
    params = {"w": jnp.zeros((10, 10))}
    opt = ivon_jax.ivon(0.1, ess=100.0, total_steps=300)
    state = _feed(opt, params, 0.0, 300)
    summary = ivon_jax.state_summary(state)
    assert float(summary["h0_weight"]) == pytest.approx(np.exp(-2.0), rel=0.01)
    assert float(summary["h_decay_share"]) > 0.9
    assert ivon_jax.posterior_health(state, warn=False) == []
    stuck = _feed(ivon_jax.ivon(0.1, ess=100.0, b2=0.99999, weight_decay=1e-4), params, 0.0,
                  300)
    msgs = ivon_jax.posterior_health(stuck, warn=False)
    assert len(msgs) == 1 and "β₂ᵗ = 0.997" in msgs[0], msgs


def test_posterior_health_warns_when_sigma_is_the_priors():
    params = {"w": jnp.zeros((10, 10))}
    # h → ~δ: ĥ tiny, β₂ small so h₀ is gone: σ ≈ 1/√(2λδ) ≈ 0.7 σ_prior.
    opt = ivon_jax.ivon(0.1, ess=100.0, hess_init=1.0, b2=0.9, weight_decay=1e-2)
    state = _feed(opt, params, 1e-2, 200)
    msgs = ivon_jax.posterior_health(state, warn=False)
    assert any("prior" in m for m in msgs), msgs
    summary = ivon_jax.state_summary(state)
    assert ivon_jax.posterior_health(summary, warn=False) == msgs


def test_total_steps_path_weight_decay_default():
    """δ defaults to 1e-3 with total_steps (the study's rule), 1e-4 without; explicit wins."""
    params = {"w": jnp.zeros(2)}
    get = lambda opt: float(ivon_jax.find_ivon_states(opt.init(params))[0].weight_decay)
    assert get(ivon_jax.ivon(0.1, ess=10.0, total_steps=100)) == pytest.approx(1e-3)
    assert get(ivon_jax.ivon(0.1, ess=10.0)) == pytest.approx(1e-4)
    assert get(ivon_jax.ivon(0.1, ess=10.0, total_steps=100, weight_decay=0.0)) == 0.0


def test_defaults_study_quick_runs_into_out(tmp_path):
    """``benchmarks/defaults_study.py --quick --out DIR`` writes its CSV and table there (and
    refuses a quick run without --out, so committed results are never overwritten)."""
    import csv
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "defaults_study.py"
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], capture_output=True,
                                    text=True, timeout=600, check=False)
    assert run("--quick").returncode != 0
    proc = run("--quick", "--tasks", "digits-mlp", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "defaults_study.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2  # 3 settings x 2 learning rates x 1 seed
    assert {r["h0"] for r in rows} == {"1.0", "0.2", "auto"}
    for r in rows:
        assert np.isfinite(float(r["frac_learned"])) and 0 <= float(r["frac_learned"]) <= 1
    assert "| digits-mlp |" in (tmp_path / "defaults_study.md").read_text()
