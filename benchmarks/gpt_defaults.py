"""IVON's ``total_steps`` path on the small GPT: the learning rate alone, as a user would tune it.

The same short runs as ``gpt_tune.py`` (its model, batch, sequence length, 300 steps of
warm-up + cosine, seed 0, the same batches, scored by the loss on the *tuning* split, never on
the validation split ``gpt_pretrain.py`` reports), with IVON built as a user porting from AdamW
builds it: ``ivon_jax.ivon(lr, ess=N, total_steps=T)`` and nothing else, N the number of
training tokens and T the run's steps (so β₂ = 1 - 2/T, δ = 1e-3, h₀ = 1, rescaled learning
rate). Six learning rates, against AdamW's learning-rate stage of ``gpt_tune.py`` (six
learning rates at its starting configuration) and against both optimizers' best of their
19-configuration grids, read from ``benchmarks/results/gpt_tune.csv``.

Writes ``gpt_defaults.csv`` and ``gpt_defaults.md`` to ``--out`` (default
``benchmarks/results/``; ``--quick``: a tiny model, 5 steps, into ``--out`` or a new temporary
folder, never over the committed results).

    python benchmarks/gpt_defaults.py            # about 15 minutes on 2 CPU cores
    python benchmarks/gpt_defaults.py --quick --out /tmp/x
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpt_pretrain import RESULTS
from gpt_pretrain import add_model_args
from gpt_pretrain import batches
from gpt_pretrain import build_model
from gpt_pretrain import load_corpus

import ivon_jax

LRS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def tuned_rows(path: pathlib.Path) -> dict[str, float]:
    """Best tuning-split losses of ``gpt_tune.py``'s grid: AdamW's lr stage, each optimizer's
    whole grid."""
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    loss = lambda rs: min(float(r["tune_loss"]) for r in rs)
    out = {}
    adamw_lr = [r for r in rows if r["optimizer"] == "AdamW" and r["stage"] == "lr"][:6]
    if adamw_lr:
        out["AdamW, 6 learning rates (gpt_tune.py's first stage)"] = loss(adamw_lr)
    for name in ("AdamW", "IVON"):
        rs = [r for r in rows if r["optimizer"] == name]
        if rs:
            out[f"{name}, best of its {len(rs)}-configuration grid (gpt_tune.py)"] = loss(rs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, steps=300)
    ap.add_argument("--eval-batches-tune", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny version (tests)")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --quick run: a new temporary folder")
    args = ap.parse_args()
    if args.out is None:
        args.out = (pathlib.Path(tempfile.mkdtemp(prefix="gpt_defaults_")) if args.quick
                    else RESULTS)
    lrs = LRS
    if args.quick:
        args.layers, args.width, args.heads, args.seq, args.batch = 1, 32, 2, 16, 8
        args.steps, args.corpus_mb, args.eval_batches_tune = 5, 0.5, 2
        lrs = LRS[2:4]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    train, _, tune = load_corpus(int(args.corpus_mb * 2**20))  # validation is never read
    init_params, loss_fn = build_model(args.layers, args.width, args.heads, args.seq, dtype)
    params0 = init_params(args.seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(args.steps // 20, 1),
                                                  args.steps)
    n_tokens = len(train)
    eval_loss = jax.jit(loss_fn)
    tune_rng = np.random.default_rng(54321)  # the tuning batches of gpt_tune.py
    tune_batches = [batches(tune, tune_rng, args.batch, args.seq)
                    for _ in range(args.eval_batches_tune)]
    vg = ivon_jax.value_and_grad(loss_fn)

    def optimizer(lr):
        return ivon_jax.ivon(lambda c: lr * schedule(c), ess=float(n_tokens),
                             total_steps=args.steps)

    @jax.jit
    def step(params, state, key, tokens, lr):
        loss, grads, hess = vg(key, params, state, tokens)
        updates, state = optimizer(lr).update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, loss

    print(f"GPT {args.layers}x{args.width}, seq {args.seq}, batch {args.batch}, {args.steps} "
          f"steps; IVON ivon(lr, ess={n_tokens}, total_steps={args.steps})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lr in lrs:
        start = time.perf_counter()
        params, state = params0, optimizer(lr).init(params0)
        rng, key = np.random.default_rng(args.seed), jax.random.key(args.seed)
        for t in range(1, args.steps + 1):
            tokens = jnp.asarray(batches(train, rng, args.batch, args.seq))
            params, state, _ = step(params, state, jax.random.fold_in(key, t), tokens,
                                    jnp.asarray(lr, jnp.float32))
        loss = float(np.mean([eval_loss(params, b) for b in tune_batches]))
        summary = ivon_jax.state_summary(state)
        row = {"lr": lr, "ess": n_tokens, "steps": args.steps,
               "tune_loss": loss if math.isfinite(loss) else math.inf,
               **{k: float(summary[k]) for k in ("sigma_p50", "h_p50", "h0_weight",
                                                 "h_decay_share", "frac_h_learned")},
               "seconds": time.perf_counter() - start}
        rows.append(row)
        print(f"IVON total_steps path, lr {lr:g}: tune loss {loss:.4f} "
              f"(median σ {row['sigma_p50']:.3g}, h decay share {row['h_decay_share']:.2f}, "
              f"{row['seconds']:.0f} s)", flush=True)
    with open(args.out / "gpt_defaults.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    best = min(rows, key=lambda r: r["tune_loss"])
    md = ["# The GPT's short runs with IVON's total_steps path",
          "",
          f"Tuning-split loss (nats/byte) after {args.steps} steps, seed {args.seed}; written by "
          f"`python benchmarks/gpt_defaults.py{' --quick' if args.quick else ''}`.",
          "",
          "| run | tune loss |", "|---|---:|"]
    md += [f"| IVON `ivon(lr, ess={n_tokens}, total_steps={args.steps})`, lr {r['lr']:g} | "
           f"{r['tune_loss']:.4f} |" for r in rows]
    md += [f"| **IVON's total_steps path, best of {len(rows)} learning rates (lr "
           f"{best['lr']:g})** | **{best['tune_loss']:.4f}** |"]
    if not args.quick:
        md += [f"| {k} | {v:.4f} |" for k, v in tuned_rows(RESULTS / "gpt_tune.csv").items()]
    text = "\n".join(md) + "\n"
    (args.out / "gpt_defaults.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / 'gpt_defaults.csv'} and {args.out / 'gpt_defaults.md'}")


if __name__ == "__main__":
    main()
