"""Fine-tuning with IVON on LoRA adapters (docs/guide/finetuning.md) and the benchmark that
measures it (``benchmarks/finetune_merge.py``).

The recipe: IVON trains only the adapters (``nnx.Optimizer(..., wrt=nnx.LoRAParam)``, or an
``optax.masked`` IVON over all parameters); the frozen base is never perturbed — every forward
pass sees its exact values — and is bit-identical after training. The benchmark runs end to
end in its ``--quick`` version and writes every run.
"""

import csv
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ivon_jax
from ivon_jax import merging
from ivon_jax.flax import nnx as ivon_nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
N_TRAIN, STEPS = 64, 12


class Net(nnx.Module):
    """A pretrained-looking base (two layers) with LoRA adapters on both, and a new head."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.LoRA(6, 2, 8, base_module=nnx.Linear(6, 8, rngs=rngs), rngs=rngs)
        self.l2 = nnx.LoRA(8, 2, 8, base_module=nnx.Linear(8, 8, rngs=rngs), rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_TRAIN, 6)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1))


def _frozen(model, trained=nnx.LoRAParam):
    """Copies of the parameters outside ``trained``."""
    return jax.tree.map(np.array, nnx.state(model, nnx.All(nnx.Param, nnx.Not(trained))))


def _tx():
    # Fine-tuning settings: ess = N, a hess_init that keeps the initial σ small, short-run b2.
    return ivon_jax.ivon(0.05, ess=float(N_TRAIN), hess_init=1.0, b2=0.99, weight_decay=1e-4)


@pytest.mark.parametrize(
    "trained",
    [nnx.LoRAParam, nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))],
    ids=["adapters", "adapters+head"],
)
def test_lora_optimizer_never_perturbs_the_frozen_base(trained):
    model = Net(nnx.Rngs(0))
    x, y = _data()
    base = _frozen(model, trained)
    lora_before = jax.tree.map(np.array, nnx.state(model, trained))
    optimizer = nnx.Optimizer(model, _tx(), wrt=trained)

    def loss_fn(m, x, y):
        # aux: how far the base weights that this forward pass sees are from the originals.
        seen = nnx.state(m, nnx.All(nnx.Param, nnx.Not(trained)))
        drift = sum(
            jnp.max(jnp.abs(a - b))
            for a, b in zip(jax.tree.leaves(seen), jax.tree.leaves(base), strict=True)
        )
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), drift

    vg = ivon_nnx.value_and_grad(loss_fn, num_samples=2, has_aux=True)

    @nnx.jit
    def step(model, optimizer, key):
        (loss, drift), grads, hess = vg(key, model, optimizer, x, y)
        optimizer.update(model, grads, hess=hess)
        return loss, drift

    for t in range(STEPS):
        _, drift = step(model, optimizer, jax.random.key(t))
        assert float(drift) == 0.0  # the samples perturb the adapters only

    after = _frozen(model, trained)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, b)  # bit-identical, not merely close
    moved = [
        np.max(np.abs(np.asarray(a) - b))
        for a, b in zip(
            jax.tree.leaves(nnx.state(model, trained)),
            jax.tree.leaves(lora_before),
            strict=True,
        )
    ]
    assert min(moved) > 0  # every trained matrix moved (B starts at zero)

    # The adapters' posterior: σ and the Hessian have exactly the trained variables' structure.
    lora = nnx.state(model, trained)
    sigma = ivon_jax.posterior_std(optimizer.opt_state, lora)
    prec = merging.hessian_from_state(optimizer.opt_state, lora)
    assert jax.tree.structure(sigma) == jax.tree.structure(lora)
    for s, p in zip(jax.tree.leaves(sigma), jax.tree.leaves(prec), strict=True):
        np.testing.assert_allclose(np.asarray(s), 1 / np.sqrt(np.asarray(p)), rtol=1e-5)

    # Predictions sample the adapters only; the model is left as it was.
    probs = ivon_nnx.predict_proba(jax.random.key(99), model, optimizer, x, num_samples=4)
    np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(_frozen(model, trained)), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(a, b)


def test_multi_transform_over_all_parameters_keeps_the_base_exactly():
    """The optax spelling: IVON for the adapters, ``set_to_zero`` for the rest, over the
    whole parameter state (``optax.masked`` alone would pass the frozen leaves' raw gradients
    through as their updates)."""
    model = Net(nnx.Rngs(1))
    x, y = _data()
    graphdef, params = nnx.split(model, nnx.Param)
    labels = nnx.map_state(
        lambda path, v: "adapter" if isinstance(v, nnx.LoRAParam) else "frozen", params
    )
    mask = jax.tree.map(lambda label: label == "adapter", labels)
    tx = optax.multi_transform(
        {"adapter": _tx(), "frozen": optax.set_to_zero()}, labels, mask_compatible_extra_args=True
    )
    state = tx.init(params)
    loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(graphdef, p)(x), y
    ).mean()
    vg = ivon_jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state, key):
        _, grads, hess = vg(key, params, state, x, y)
        updates, state = tx.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state

    start = jax.tree.map(np.array, params)
    for t in range(STEPS):
        params, state = step(params, state, jax.random.key(t))
    for keep, a, b in zip(
        jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(start), strict=True
    ):
        if keep:
            assert np.max(np.abs(np.asarray(a) - b)) > 0
        else:
            np.testing.assert_array_equal(np.asarray(a), b)
    # σ of a frozen leaf is reported as 0 (it is not sampled).
    sigma = ivon_jax.posterior_std(state, params)
    for keep, s in zip(jax.tree.leaves(mask), jax.tree.leaves(sigma), strict=True):
        assert (np.min(np.asarray(s)) > 0) if keep else (np.max(np.asarray(s)) == 0)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune_merge")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "finetune_merge.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_finetune_merge_quick_writes_every_run(quick):
    out, stdout = quick
    rows = _rows(out / "finetune_merge.csv")
    tasks = {"net", "tools", "runtime"}
    # --quick: 2 configurations per (mode, method, task) on validation, then seeds 0 and 1.
    for mode in ("lora", "full"):
        for method in ("AdamW", "IVON"):
            for task in tasks:
                mine = [
                    r for r in rows if (r["mode"], r["method"], r["task"]) == (mode, method, task)
                ]
                tune = [r for r in mine if r["phase"] == "tune"]
                final = [r for r in mine if r["phase"] == "final"]
                assert {r["split"] for r in tune} == {"val"}  # tuning never sees test
                preds = 1 if method == "AdamW" else 2  # IVON: at the mean and MC predictive
                assert len(tune) == 2 * preds and len(final) == 2 * 2 * preds
                assert {int(r["seed"]) for r in final} == {0, 1}
                # The chosen configuration has the lowest validation NLL of its predictor.
                pick = (
                    "AdamW"
                    if method == "AdamW"
                    else next(r["predictor"] for r in tune if r["predictor"].startswith("IVON ("))
                )
                nll = {r["config"]: float(r["nll"]) for r in tune if r["predictor"] == pick}
                assert len(nll) == 2  # two distinct configurations
                if method == "IVON":  # --quick covers both families: the default path, the recipe
                    assert {c.split(",")[0].split(":")[0] for c in nll} == {"default path",
                                                                            "recipe"}
                best = min(nll, key=nll.get)
                assert {r["config"] for r in final} == {best}
                for r in final:
                    assert 0 <= float(r["acc"]) <= 100 and np.isfinite(float(r["nll"]))
                    assert 0 <= float(r["ece"]) <= 1
    merged = _rows(out / "finetune_merge.merging.csv")
    methods = {(r["mode"], r["finetuned_with"], r["merge"]) for r in merged}
    for mode in ("lora", "full"):
        assert (mode, "IVON", "IVON Hessians") in methods
        assert (mode, "AdamW", "IVON Hessians") not in methods
        for ftm in ("AdamW", "IVON"):
            for m in ("task arithmetic", "squared gradients"):
                assert (mode, ftm, m) in methods
                tuned = [
                    r
                    for r in merged
                    if (r["mode"], r["finetuned_with"], r["merge"], r["selection"])
                    == (mode, ftm, m, "tuned")
                ]
                assert len(tuned) == 2 and all(r["split"] == "test" for r in tuned)
                for r in tuned:  # the scale is the best on validation
                    val = {
                        float(v["scale"]): float(v["acc_mean"])
                        for v in merged
                        if (v["mode"], v["finetuned_with"], v["merge"], v["seed"], v["split"])
                        == (mode, ftm, m, r["seed"], "val")
                    }
                    assert val[float(r["scale"])] == max(val.values())
    md = (out / "finetune_merge.md").read_text()
    assert "## Merging" in md and "IVON Hessians" in md
    # The pruning table: every fraction for IVON (by SNR and by magnitude) and AdamW
    # (magnitude), every task and seed; printed as well as written.
    pruned = _rows(out / "finetune_merge.pruning.csv")
    combos = {(r["method"], r["rule"]) for r in pruned}
    assert combos == {("IVON", "SNR"), ("IVON", "magnitude"), ("AdamW", "magnitude")}
    assert len(pruned) == 3 * 5 * 3 * 2  # combos x fractions x tasks x seeds
    assert {float(r["fraction"]) for r in pruned} == {0.0, 0.25, 0.5, 0.75, 0.9}
    # Nothing pruned: the model's own test accuracy (the fine-tuning table's, at its weights).
    own = {(r["method"], r["task"], r["seed"]): float(r["acc"]) for r in rows
           if r["phase"] == "final" and r["split"] == "test" and r["mode"] == "lora"
           and r["predictor"] in ("AdamW", "IVON@mean")}
    for r in pruned:
        if float(r["fraction"]) == 0.0:
            assert float(r["acc"]) == pytest.approx(own[r["method"], r["task"], r["seed"]],
                                                    abs=1e-3)
    assert "## Pruning the LoRA adapters" in md and "## Pruning the LoRA adapters" in stdout
    assert (out / "finetune_merge.base").is_dir()  # the Orbax checkpoint of the base
    assert "pretrained" in stdout and "saved to" in stdout


def test_base_model_is_saved_once_and_reloaded(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import finetune_merge as fm

    args = argparse.Namespace(
        layers=1,
        width=16,
        heads=2,
        seq=16,
        pretrain_steps=3,
        pretrain_batch=8,
        corpus_mb=0.2,
        ckpt=None,
        out=tmp_path,
    )
    with jax.numpy_dtype_promotion("standard"):  # benchmark code: not held to strict mode
        first = fm.pretrained_backbone(args)
        again = fm.pretrained_backbone(args)  # loaded from the Orbax checkpoint
    assert len(list((tmp_path / "finetune_merge.base").iterdir())) == 1
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
