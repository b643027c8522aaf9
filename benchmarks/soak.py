"""Soak run: 100k IVON steps with a cosine schedule and injected NaN batches.

A tiny MLP (64-32-10, tanh) on scikit-learn's 8x8 digits (75/25 split, fixed seed), trained
with ``ivon_jax.ivon(cosine_decay_schedule, ess=N, skip_nonfinite=True)`` and one posterior
sample per step (``ivon_jax.value_and_grad``). Every ``--nan-every``-th step (997 by default)
the minibatch is replaced by NaNs. The steps run inside ``jax.lax.scan`` in jitted chunks of
``--chunk`` steps, with a tqdm bar over the chunks.

At the end it checks, and exits non-zero unless all hold:

* the number of skipped steps equals the number of injected NaN batches, and IVON's step count
  equals the number of the other steps;
* every leaf of the final parameters and optimizer state is finite, and σ is finite and > 0;
* the training loss went down: the mean over the last 1000 (non-NaN) steps is below the mean
  over the first 1000.

It also prints the held-out accuracy at the posterior mean and with a 32-sample Bayesian model
average, h statistics, and the wall time.

Usage::

    python benchmarks/soak.py [--steps 100000] [--chunk 1000] [--nan-every 997] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import ivon_jax

SIZES = (64, 32, 10)


def init_mlp(key: jax.Array) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(SIZES) - 1)
    return [
        {"w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}
        for k, n_in, n_out in zip(keys, SIZES[:-1], SIZES[1:], strict=True)
    ]


def logits_fn(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params: list[dict[str, jax.Array]], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy over the minibatch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def all_finite(tree: object) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=1000, help="steps per jitted lax.scan")
    parser.add_argument("--nan-every", type=int, default=997, help="inject a NaN batch every k")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps % args.chunk:
        parser.error("--steps must be a multiple of --chunk")
    window = min(1000, args.steps // 2)

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.25, random_state=0
    )
    x_tr, y_tr, x_te, y_te = map(jnp.asarray, (x_tr, y_tr, x_te, y_te))
    n_train = x_tr.shape[0]

    schedule = optax.cosine_decay_schedule(args.lr, decay_steps=args.steps, alpha=0.01)
    opt = ivon_jax.ivon(
        schedule, ess=float(n_train), hess_init=0.1, weight_decay=1e-4, skip_nonfinite=True
    )
    key = jax.random.key(args.seed)
    params = init_mlp(jax.random.fold_in(key, 0))
    state = opt.init(params)
    vg = ivon_jax.value_and_grad(loss_fn)
    data_key = jax.random.fold_in(key, 1)
    noise_key = jax.random.fold_in(key, 2)

    def step(carry, t):
        params, state = carry
        idx = jax.random.randint(jax.random.fold_in(data_key, t), (args.batch,), 0, n_train)
        xb, yb = x_tr[idx], y_tr[idx]
        inject = (t + 1) % args.nan_every == 0
        xb = jnp.where(inject, jnp.full_like(xb, jnp.nan), xb)
        loss, grads, hess = vg(jax.random.fold_in(noise_key, t), params, state, xb, yb)
        updates, state = opt.update(grads, state, params, hess=hess)
        return (optax.apply_updates(params, updates), state), loss

    @jax.jit
    def run_chunk(params, state, start):
        with jax.numpy_dtype_promotion("standard"):  # optax schedules are not strict-clean
            ts = start + jnp.arange(args.chunk, dtype=jnp.int32)
            return jax.lax.scan(step, (params, state), ts)

    losses = []
    t0 = time.perf_counter()
    n_chunks = args.steps // args.chunk
    with tqdm(total=args.steps, unit="step", mininterval=2.0) as bar:
        for c in range(n_chunks):
            (params, state), chunk_losses = run_chunk(params, state, jnp.int32(c * args.chunk))
            losses.append(np.asarray(chunk_losses))
            bar.update(args.chunk)
            bar.set_postfix(skipped=int(state.skipped), loss=f"{np.nanmean(losses[-1]):.4f}")
    wall = time.perf_counter() - t0
    losses = np.concatenate(losses)

    injected = args.steps // args.nan_every
    skipped = int(state.skipped)
    ivon_state = ivon_jax.find_ivon_states(state)[0]
    count = int(ivon_state.count)
    sigma = ivon_jax.posterior_std(state)
    first, last = np.nanmean(losses[:window]), np.nanmean(losses[-window:])
    nan_losses = int(np.sum(np.isnan(losses)))

    mean_acc = float(jnp.mean(jnp.argmax(logits_fn(params, x_te), -1) == y_te))
    keys = jax.random.split(jax.random.fold_in(key, 3), 32)
    probs = jnp.mean(
        jnp.stack([
            jax.nn.softmax(logits_fn(ivon_jax.sample_params(k, params, state)[0], x_te))
            for k in keys
        ]),
        axis=0,
    )
    bma_acc = float(jnp.mean(jnp.argmax(probs, -1) == y_te))
    h = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(ivon_state.hess)])
    s = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(sigma)])

    checks = {
        f"skipped steps == injected NaN batches ({skipped} == {injected})": skipped == injected,
        f"IVON count == steps - skipped ({count} == {args.steps - injected})":
            count == args.steps - injected,
        f"NaN losses == injected ({nan_losses} == {injected})": nan_losses == injected,
        "final params and optimizer state finite": all_finite((params, state)),
        "sigma finite and > 0": bool(np.all(np.isfinite(s)) and np.all(s > 0)),
        f"loss went down (first {window}: {first:.4f} > last {window}: {last:.4f})": last < first,
    }
    print(f"\nsoak: {args.steps} steps in {wall:.1f} s ({args.steps / wall:,.0f} steps/s, "
          f"compile included), {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"held-out accuracy: {mean_acc:.4f} at the mean, {bma_acc:.4f} with 32-sample BMA")
    print(f"h: min {h.min():.3g}, median {np.median(h):.3g}, max {h.max():.3g}; "
          f"sigma: min {s.min():.3g}, median {np.median(s):.3g}, max {s.max():.3g}")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
