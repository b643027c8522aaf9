"""IVON vs AdamW on MNIST-1D: accuracy, NLL, calibration, and step cost, over several seeds.

MNIST-1D (Greydanus & Kobak) is generated offline by the ``mnist1d`` package: 10 classes of
length-40 sequences, 3,200 train / 800 validation / 1,000 test here. It is small but hard
enough that optimizers differ (an MLP reaches ~70-80 % test accuracy, not 99 %). The same MLP
(40-256-256-10, ReLU) is trained with

* AdamW (``optax.adamw``), evaluated at its weights;
* IVON as a user porting from AdamW writes it, ``ivon_jax.ivon(lr, ess=N, total_steps=T)``
  with every other argument at its default (N = 3,200 training examples, T the run's number
  of steps; one Monte-Carlo sample per step), evaluated at the posterior mean ("IVON@mean")
  and with the Bayesian model average of ``--samples`` posterior samples ("IVON":
  p(y|x) ≈ (1/S) Σ_s softmax(f(x; θ_s))),

for ``--seeds`` seeds each (seed = initial weights, data order and IVON's noise), with the same
epochs, batch size and schedule (linear warm-up over 5 % of the steps, cosine to zero). Each
optimizer uses the configuration that ``benchmarks/paper_table.py`` chose for it on this task's
validation split from a grid of six (see CONFIGS; IVON's grid has only learning rates). While
training, the progress bar shows what IVON's state says of the posterior
(``ivon_jax.state_summary``: median σ and h, h₀'s remaining weight β₂ᵗ, the share of h that is
still h₀'s decay), and ``ivon_jax.posterior_health`` logs a warning at the end if h could not
move or σ stayed at the prior's width. It prints a Markdown table of test accuracy,
NLL, ECE (15 bins) and Brier score (``ivon_jax.metrics``) as mean ± std over the seeds, and
the ratio of IVON's to AdamW's train-step time measured in the same run (jitted single steps,
compilation excluded, median of interleaved repetitions). About a minute on two CPU cores.

Usage::

    pip install -e ".[test]" && python benchmarks/classify.py [--seeds 3] [--task digits]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T

import ivon_jax
from ivon_jax._src.transform import WD_WITH_STEPS  # the δ that ivon(..., total_steps=T) uses

IVON_LR_MNIST1D, IVON_LR_DIGITS = 2.0, 1.0  # paper_table.py's choices (6 learning rates)

# Chosen by paper_table.py on each task's validation NLL (results/paper_table.md). AdamW:
# (peak lr, weight decay); IVON: (peak lr, δ), δ being what ivon(..., total_steps=T) defaults to.
CONFIGS = {
    "mnist1d": {"AdamW": (1e-2, 3e-1), "IVON": (IVON_LR_MNIST1D, WD_WITH_STEPS), "epochs": 60,
                "batch": 100},
    "digits": {"AdamW": (1e-2, 3e-1), "IVON": (IVON_LR_DIGITS, WD_WITH_STEPS), "epochs": 60,
               "batch": 32},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=list(CONFIGS), default="mnist1d")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="default: the tuned run's")
    ap.add_argument("--samples", type=int, default=64, help="MC samples at test time")
    ap.add_argument("--timing-reps", type=int, default=200)
    args = ap.parse_args()
    cfg = CONFIGS[args.task]
    epochs = args.epochs or cfg["epochs"]

    if args.task == "mnist1d":
        data, model = T.mnist1d(), T.mlp((40, 256, 256, 10))
    else:
        data, model = T.digits(), T.mlp((64, 128, 128, 10))
    setup = T.Setup(epochs, cfg["batch"])
    total = T.steps_per_epoch(data, setup) * epochs
    methods = {
        "AdamW": T.adamw_method([cfg["AdamW"]]),
        "IVON": T.ivon_defaults_method([cfg["IVON"]], total),
    }
    seeds = jnp.arange(1, args.seeds + 1)
    block = 5 if epochs % 5 == 0 else 1

    finals = {}
    with tqdm(total=2 * epochs, desc="training AdamW, IVON", unit="epoch") as bar:
        for name, method in methods.items():
            lr, reg = cfg[name]
            lrs, regs = jnp.full(args.seeds, lr), jnp.full(args.seeds, reg)
            trainer = T.make_trainer(data, model, method, setup)
            carry = trainer.init(seeds, lrs, regs)
            for first in range(0, epochs, block):
                carry = trainer.epochs(carry, seeds, lrs, regs, first, block)
                bar.update(block)
                if method.is_ivon:  # what to watch while training (docs/guide/hyperparameters.md)
                    s = ivon_jax.state_summary(jax.tree.map(lambda a: a[0], carry[1]))
                    bar.set_postfix(seed1_sigma_median=f"{float(s['sigma_p50']):.3g}",
                                    h_median=f"{float(s['h_p50']):.3g}",
                                    h0_weight=f"{float(s['h0_weight']):.2f}",
                                    h_decay_share=f"{float(s['h_decay_share']):.2f}")
            finals[name] = carry
            if method.is_ivon:  # logs a warning if h could not move or σ is the prior's
                ivon_jax.posterior_health(jax.tree.map(lambda a: a[0], carry[1]))

    # Test-set predictive distributions, one per seed.
    preds: dict[str, list] = {"AdamW": [], "IVON@mean": [], f"IVON ({args.samples} samples)": []}
    for r in range(args.seeds):
        for name, method in methods.items():
            params, state = jax.tree.map(lambda a, r=r: a[r], finals[name])
            out = T.predictive(model, data.kind, params, state, data.x_test,
                               jax.random.key(1000 + r), args.samples, method.is_ivon)
            if method.is_ivon:
                preds["IVON@mean"].append(out["mean"])
                preds[f"IVON ({args.samples} samples)"].append(out["mc"])
            else:
                preds["AdamW"].append(out["mean"])

    # Step time: one jitted step of each (the trainer's own step, at a constant learning rate),
    # interleaved, on one fixed batch; warm-up excluded.
    loss_fn = T.make_loss(model, data.kind)
    n = data.n_train
    opts = {name: m.build(cfg[name][0], cfg[name][1], n) for name, m in methods.items()}
    steps = {name: jax.jit(T.train_step(opts[name], loss_fn, m.is_ivon))
             for name, m in methods.items()}

    p0 = model.init(jax.random.key(0))
    runs = {name: (p0, opt.init(p0)) for name, opt in opts.items()}
    x, y = jnp.asarray(data.x_train[: setup.batch]), jnp.asarray(data.y_train[: setup.batch])
    times: dict[str, list[float]] = {"AdamW": [], "IVON": []}
    step_keys = list(jax.random.split(jax.random.key(5), args.timing_reps + 5))
    for rep in range(-5, args.timing_reps):  # the first 5 repetitions are warm-up
        for name in times:
            start = time.perf_counter()
            out = steps[name](*runs[name], step_keys[rep + 5], x, y)  # AdamW ignores the key
            jax.block_until_ready(out)
            if rep >= 0:
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["IVON"]) / statistics.median(times["AdamW"])

    a_cfg, i_cfg = cfg["AdamW"], cfg["IVON"]
    print(f"\n{data.name}: {n} train / {len(data.y_val)} validation / {len(data.y_test)} test, "
          f"{model.name}, {epochs} epochs, batch {setup.batch}, warm-up + cosine; "
          f"{args.seeds} seeds (mean ± std)")
    print(f"AdamW lr {a_cfg[0]:g}, weight decay {a_cfg[1]:g}; IVON lr {i_cfg[0]:g}, "
          f"ess {n}, total_steps {total} (defaults: h0 1, b2 1 - 2/{total}, weight decay "
          f"{i_cfg[1]:g})\n")
    print("| method | test acc (%) | NLL | ECE | Brier |")
    print("|---|---:|---:|---:|---:|")
    for name, ps in preds.items():
        sc = [T.scores(p, data.y_test, data.kind) for p in ps]
        cell = lambda k, d, sc=sc: T.mean_std([s[k] for s in sc], d)
        print(f"| {name} | {cell('acc', 2)} | {cell('nll', 3)} | {cell('ece', 3)} "
              f"| {cell('brier', 3)} |")
    print(f"\nTrain-step time IVON / AdamW: {ratio:.2f}x (median of {len(times['IVON'])} jitted "
          f"steps each; AdamW {1e3 * statistics.median(times['AdamW']):.3f} ms, "
          f"IVON {1e3 * statistics.median(times['IVON']):.3f} ms)")


if __name__ == "__main__":
    main()
