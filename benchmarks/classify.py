"""IVON vs AdamW on scikit-learn's digits: accuracy, NLL, calibration, and step cost.

Trains the same MLP (64-128-128-10, ReLU) on the 8x8 digits bundled with scikit-learn (no
download; 75/25 train/test split with a fixed seed, pixels scaled to [0, 1]) twice, with the
same initial weights, data order, epochs and batch size:

* AdamW (``optax.adamw``), evaluated at its weights;
* IVON (``ivon_jax.ivon``, one Monte-Carlo sample per step via ``ivon_jax.value_and_grad``),
  evaluated at the posterior mean ("IVON@mean") and with the Bayesian model average of
  ``--samples`` posterior samples ("IVON", p(y|x) ≈ (1/S) Σ_s softmax(f(x; θ_s))).

It prints one Markdown table of test accuracy, NLL, ECE (15 bins) and Brier score
(``ivon_jax.metrics``), and the ratio of IVON's to AdamW's train-step time, measured in the
same run (jitted steps, compilation excluded, median of repeated timed steps). Runs in well
under a minute on two CPU cores; seeds are fixed, so it is reproducible.

Usage::

    pip install -e ".[test]" && python benchmarks/classify.py [--epochs 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import ivon_jax
from ivon_jax import metrics

SIZES = (64, 128, 128, 10)
BATCH = 32


def init_mlp(key: jax.Array) -> list[dict[str, jax.Array]]:
    """He-normal weights, zero biases."""
    keys = jax.random.split(key, len(SIZES) - 1)
    return [
        {"w": jax.random.normal(k, (n_in, n_out)) * np.sqrt(2.0 / n_in), "b": jnp.zeros(n_out)}
        for k, n_in, n_out in zip(keys, SIZES[:-1], SIZES[1:], strict=True)
    ]


def logits_fn(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def loss_fn(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy over the minibatch (IVON's Hessian estimate assumes a mean)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32, help="MC samples at test time")
    args = parser.parse_args()

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int32),
        test_size=0.25, random_state=args.seed, stratify=digits.target,
    )
    n_train = len(x_tr)
    steps_per_epoch = n_train // BATCH  # drop the last partial batch: fixed shapes

    key = jax.random.key(args.seed)
    key, init_key = jax.random.split(key)
    params0 = init_mlp(init_key)

    adamw = optax.adamw(1e-3, weight_decay=1e-4)
    # b2 < 0.99999 since the run is short (~1700 steps); ess = the training-set size.
    ivon = ivon_jax.ivon(
        0.2, ess=float(n_train), hess_init=0.5, weight_decay=1e-4, b2=0.99995
    )
    mc_grad = ivon_jax.value_and_grad(loss_fn, num_samples=1)

    @jax.jit
    def adamw_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = adamw.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def ivon_step(params, state, key, x, y):
        loss, grads, hess = mc_grad(key, params, state, x, y)
        updates, state = ivon.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, loss

    runs = {
        "AdamW": [params0, adamw.init(params0)],
        "IVON": [params0, ivon.init(params0)],
    }
    rng = np.random.default_rng(args.seed)
    bar = tqdm(range(args.epochs), desc="training", unit="epoch")
    for _ in bar:
        order = rng.permutation(n_train)  # the same data order for both optimizers
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            x, y = x_tr[idx], y_tr[idx]
            key, step_key = jax.random.split(key)
            runs["AdamW"][0], runs["AdamW"][1], loss_a = adamw_step(*runs["AdamW"], x, y)
            runs["IVON"][0], runs["IVON"][1], loss_i = ivon_step(*runs["IVON"], step_key, x, y)
        bar.set_postfix(adamw_loss=f"{float(loss_a):.3f}", ivon_loss=f"{float(loss_i):.3f}")

    # Test-set predictive distributions.
    x_te, y_te = jnp.asarray(x_te), jnp.asarray(y_te)
    ivon_params, ivon_state = runs["IVON"]

    @jax.jit
    def bayes_average(key):
        def one(k):
            sampled, _ = ivon_jax.sample_params(k, ivon_params, ivon_state)
            return jax.nn.softmax(logits_fn(sampled, x_te))
        return jnp.mean(jax.vmap(one)(jax.random.split(key, args.samples)), axis=0)

    predictive = {
        "AdamW": jax.nn.softmax(logits_fn(runs["AdamW"][0], x_te)),
        "IVON@mean": jax.nn.softmax(logits_fn(ivon_params, x_te)),
        f"IVON ({args.samples} samples)": bayes_average(jax.random.key(args.seed + 1)),
    }

    # Step time: the two jitted steps, alternating, on one fixed batch; warm-up excluded.
    x, y = x_tr[:BATCH], y_tr[:BATCH]
    times: dict[str, list[float]] = {"AdamW": [], "IVON": []}
    # The keys are made before timing: creating one is a device call of its own.
    step_keys = list(jax.random.split(jax.random.key(args.seed + 2), 205))
    for rep in range(-5, 200):  # the first 5 repetitions are warm-up
        for name in times:
            start = time.perf_counter()
            if name == "AdamW":
                out = adamw_step(*runs["AdamW"], x, y)
            else:
                out = ivon_step(*runs["IVON"], step_keys[rep + 5], x, y)
            jax.block_until_ready(out)
            if rep >= 0:
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["IVON"]) / statistics.median(times["AdamW"])

    print(f"\ndigits: {n_train} train / {len(y_te)} test, MLP {'-'.join(map(str, SIZES))}, "
          f"{args.epochs} epochs, batch {BATCH}, seed {args.seed}\n")
    print("| method | test acc (%) | NLL | ECE | Brier |")
    print("|---|---:|---:|---:|---:|")
    for name, probs in predictive.items():
        print(f"| {name} | {100 * float(metrics.accuracy(probs, y_te)):.2f} "
              f"| {float(metrics.nll(probs, y_te)):.4f} | {float(metrics.ece(probs, y_te)):.4f} "
              f"| {float(metrics.brier(probs, y_te)):.4f} |")
    print(f"\nTrain-step time IVON / AdamW: {ratio:.2f}x (median of {len(times['IVON'])} jitted "
          f"steps each; AdamW {1e3 * statistics.median(times['AdamW']):.3f} ms, "
          f"IVON {1e3 * statistics.median(times['IVON']):.3f} ms)")


if __name__ == "__main__":
    main()
