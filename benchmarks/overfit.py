"""Does IVON overfit? Test NLL and accuracy against epochs, AdamW vs IVON, trained long.

The paper's claim (Shen et al. 2024, Fig. 1 and §4): trained long, AdamW's test NLL climbs as
it overfits while IVON's does not. Here: MNIST-1D (3,200 training sequences), the MLP
40-256-256-10, 200 epochs (6,400 steps) with a linear warm-up over 5 % and cosine decay,
batch 100, several seeds, each optimizer at the configuration ``paper_table.py`` chose on the
validation split for this task (60 epochs). IVON is ``ivon_jax.ivon(lr, ess=N, total_steps=T)``
with every other argument at its default, T the 6,400 steps of this run (so β₂ = 1 - 2/T);
``--ivon-b2`` sets β₂ instead, and the results are then written with its value in their file
names.
Every ``--eval-every`` epochs it evaluates the test NLL and accuracy of AdamW, of IVON at its
mean and of IVON's Monte-Carlo predictive (16 samples). Nothing is selected on these curves.

Writes ``benchmarks/results/overfit.{csv,png}`` (``overfit_b2_<value>.{csv,png}`` with another
``--ivon-b2``) and prints, per method, the test NLL at its
minimum and at the end (mean ± std over seeds).

Usage::

    python benchmarks/overfit.py                # about a minute on 2 CPU cores
    python benchmarks/overfit.py --ivon-b2 0.9999
    python benchmarks/overfit.py --epochs 10 --eval-every 5 --seeds 2 --out /tmp/x   # tiny
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T

import ivon_jax
from ivon_jax._src.transform import WD_WITH_STEPS  # what total_steps=T resolves to
from ivon_jax._src.transform import b2_for

RESULTS = pathlib.Path(__file__).with_name("results")
# Chosen by paper_table.py on MNIST-1D's validation split (results/paper_table.md).
ADAMW = (1e-2, 3e-1)  # (peak lr, weight decay)
IVON_LR = 2.0  # peak lr; ess = N, total_steps = T, everything else at its default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16, help="MC samples for IVON's predictive")
    ap.add_argument("--ivon-b2", type=float, default=None,
                    help="default: the total_steps rule, β₂ = 1 - 2/T")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args()
    stem = "overfit" if args.ivon_b2 is None else f"overfit_b2_{args.ivon_b2:g}"
    if args.epochs % args.eval_every:
        raise SystemExit("--epochs must be a multiple of --eval-every")

    data = T.mnist1d()
    model = T.mlp((40, 256, 256, 10))
    setup = T.Setup(args.epochs, 100)
    total = T.steps_per_epoch(data, setup) * setup.epochs
    ivon = (IVON_LR, WD_WITH_STEPS)
    b2 = {} if args.ivon_b2 is None else {"b2": args.ivon_b2}
    ivon_method = T.ivon_defaults_method([ivon], total, **b2)
    b2_used = b2_for(total) if args.ivon_b2 is None else args.ivon_b2
    methods = {
        "AdamW": (T.adamw_method([ADAMW]), ADAMW),
        "IVON": (ivon_method, ivon),
    }
    seeds = jnp.arange(1, args.seeds + 1)
    x_te, y_te = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def test_scores(probs):
        nll = -jnp.mean(jnp.log(jnp.take_along_axis(probs, y_te[:, None], 1)[:, 0] + 1e-12))
        return nll, 100 * jnp.mean(jnp.argmax(probs, -1) == y_te)

    def evaluator(is_ivon):
        def one(p, s, k):
            pred = T.predictive(model, data.kind, p, s, x_te, k, args.samples, is_ivon)
            out = {name: test_scores(probs) for name, probs in pred.items()}
            # What to watch in IVON's state (docs/guide/hyperparameters.md): the median h and σ.
            summary = ivon_jax.state_summary(s) if is_ivon else None
            return out, summary
        return jax.jit(jax.vmap(one))

    rows = []  # (method, seed, epoch, nll, acc, h median, σ median)
    n_blocks = args.epochs // args.eval_every
    with tqdm(total=len(methods) * n_blocks, desc="training", unit="block") as bar:
        for name, (method, (lr, reg)) in methods.items():
            trainer = T.make_trainer(data, model, method, setup)
            lrs, regs = jnp.full(args.seeds, lr), jnp.full(args.seeds, reg)
            carry = trainer.init(seeds, lrs, regs)
            evaluate = evaluator(method.is_ivon)
            for b in range(n_blocks):
                carry = trainer.epochs(carry, seeds, lrs, regs, b * args.eval_every,
                                       args.eval_every)
                keys = jax.random.split(jax.random.key(100 + b), args.seeds)
                out, summary = evaluate(carry[0], carry[1], keys)
                epoch = (b + 1) * args.eval_every
                for which, (nll, acc) in out.items():
                    label = name if which == "mean" and name == "AdamW" else (
                        "IVON@mean" if which == "mean" else "IVON")
                    for r in range(args.seeds):
                        state_cols = ("", "") if summary is None else (
                            f"{float(summary['h_p50'][r]):.4g}",
                            f"{float(summary['sigma_p50'][r]):.4g}")
                        rows.append((label, int(seeds[r]), epoch, float(nll[r]), float(acc[r]),
                                     *state_cols))
                bar.update(1)
                nll_now = float(np.mean(out["mc" if method.is_ivon else "mean"][0]))
                bar.set_postfix_str(f"{name} epoch {epoch}: test NLL {nll_now:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "epoch", "test_nll", "test_acc", "h_median",
                    "sigma_median"])
        w.writerows(rows)

    labels = ["AdamW", "IVON@mean", "IVON"]
    curves = {}
    print(f"\nMNIST-1D MLP, {args.epochs} epochs, {args.seeds} seeds, IVON b2 {b2_used:.6g}; "
          "test NLL (mean ± std)\n")
    print("| method | min NLL (epoch) | final NLL | final − min | min acc → final acc (%) |")
    print("|---|---:|---:|---:|---:|")
    for lab in labels:
        sel = [r for r in rows if r[0] == lab]
        epochs = sorted({r[2] for r in sel})
        nll = np.array([[r[3] for r in sel if r[2] == e] for e in epochs])  # (E, seeds)
        acc = np.array([[r[4] for r in sel if r[2] == e] for e in epochs])
        curves[lab] = (np.array(epochs), nll, acc)
        mean = nll.mean(1)
        i = int(np.argmin(mean))
        rise = nll[-1] - nll.min(0)
        print(f"| {lab} | {mean[i]:.3f} ({epochs[i]}) | {mean[-1]:.3f} ± {nll[-1].std():.3f} "
              f"| {rise.mean():.3f} ± {rise.std():.3f} | {acc[i].mean():.1f} → "
              f"{acc[-1].mean():.1f} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for lab, color in zip(labels, ["C0", "C1", "C2"], strict=True):
        ep, nll, acc = curves[lab]
        for ax, v in zip(axes, [nll, acc], strict=True):
            m, s = v.mean(1), v.std(1)
            ax.plot(ep, m, color=color, label=lab)
            ax.fill_between(ep, m - s, m + s, color=color, alpha=0.2)
    axes[0].set_ylabel("test NLL")
    axes[1].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"MNIST-1D MLP, {args.epochs} epochs (mean ± std over {args.seeds} seeds; "
                 f"IVON β₂ = {b2_used:.6g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"\nwrote {args.out / (stem + '.csv')} and {args.out / (stem + '.png')}")


if __name__ == "__main__":
    main()
