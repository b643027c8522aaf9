"""Train an Equinox MLP with IVON on scikit-learn's digits and compare its MC predictive with
the prediction at the posterior mean.

A complete, runnable version of the loop in the Equinox guide (docs/guide/equinox.md): the
model is an ``eqx.nn.MLP`` (64-128-128-10, ReLU); IVON's parameters are its floating-point
arrays, ``eqx.filter(model, eqx.is_inexact_array)``; :func:`ivon_jax.equinox.value_and_grad`
draws one weight sample per step and returns the loss, gradients and Hessian estimate, and
``opt.update(grads, state, params, hess=hess)`` + ``eqx.apply_updates`` make the step. The
optimizer is the recommended path, ``ivon_jax.ivon(lr, ess=n_train, total_steps=T)``, with a
warm-up + cosine learning-rate schedule.

The data are scikit-learn's 8x8 digits (they ship with the package, no download), split
60 / 20 / 20 % into train / validation / test by ``benchmarks/tasks.py``; only train and test
are used here. Test metrics (accuracy, NLL, ECE from :mod:`ivon_jax.metrics`) are printed for
the prediction at the mean, ``softmax(f(x; m))``, and for the MC predictive over 64 weight
samples, :func:`ivon_jax.equinox.predict_proba`. The default run (60 epochs) takes well under
a minute on a 2-core CPU.

Usage::

    python benchmarks/equinox_example.py             # 60 epochs
    python benchmarks/equinox_example.py --quick     # 5 epochs, 16 MC samples (a smoke test)
    python benchmarks/equinox_example.py --epochs 20 --samples 32 --seed 1
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T

import ivon_jax
from ivon_jax import equinox as ivon_eqx
from ivon_jax import metrics

BATCH = 32
LR = 0.5  # the peak learning rate; the digits-MLP row of benchmarks/paper_table.py chose 0.5


def loss_fn(model: eqx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """The MEAN cross-entropy over the minibatch (IVON scales it by ess itself)."""
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--samples", type=int, default=64, help="MC samples at test time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="5 epochs, 16 MC samples")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.samples = 5, 16

    data = T.digits()
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    n_train = data.n_train
    steps_per_epoch = n_train // BATCH  # the last partial batch is dropped: fixed shapes
    total_steps = steps_per_epoch * args.epochs

    key = jax.random.key(args.seed)
    key, model_key = jax.random.split(key)
    model = eqx.nn.MLP(64, 10, 128, 2, key=model_key)

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, LR, warmup_steps=max(1, total_steps // 20), decay_steps=total_steps
    )
    opt = ivon_jax.ivon(schedule, ess=n_train, total_steps=total_steps)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    vg = ivon_eqx.value_and_grad(loss_fn)

    @eqx.filter_jit
    def train_step(key, model, opt_state, x, y):
        loss, grads, hess = vg(key, model, opt_state, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = opt.update(grads, opt_state, params, hess=hess)
        return eqx.apply_updates(model, updates), opt_state, loss

    start = time.perf_counter()
    for epoch in range(args.epochs):
        key, perm_key = jax.random.split(key)
        order = jax.random.permutation(perm_key, n_train)
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            key, step_key = jax.random.split(key)
            model, opt_state, loss = train_step(step_key, model, opt_state,
                                                x_train[idx], y_train[idx])
            losses.append(loss)
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  train loss {float(jnp.mean(jnp.stack(losses))):.4f}")
    train_s = time.perf_counter() - start

    # The prediction at the posterior mean m, and IVON's MC predictive over S weight samples.
    probs_mean = jax.nn.softmax(jax.vmap(model)(x_test), axis=-1)
    key, pred_key = jax.random.split(key)
    probs_mc = ivon_eqx.predict_proba(pred_key, model, opt_state, x_test,
                                      num_samples=args.samples)

    print(f"\ndigits: {n_train} train / {len(y_test)} test images; MLP 64-128-128-10")
    print(f"{args.epochs} epochs x {steps_per_epoch} steps (batch {BATCH}); "
          f"training took {train_s:.1f} s")
    print("| prediction | test acc (%) | NLL | ECE |")
    print("|---|---:|---:|---:|")
    for name, probs in (("mean", probs_mean), (f"IVON MC ({args.samples} samples)", probs_mc)):
        acc = 100 * float(metrics.accuracy(probs, y_test))
        nll = float(metrics.nll(probs, y_test))
        ece = float(metrics.ece(probs, y_test))
        print(f"| {name} | {acc:.1f} | {nll:.4f} | {ece:.4f} |")


if __name__ == "__main__":
    main()
