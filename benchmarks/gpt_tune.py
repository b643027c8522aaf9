"""Grid search for the GPT pretraining example: IVON and AdamW, the same budget each.

Each configuration trains the model of ``gpt_pretrain.py`` (same width, depth, batch and
sequence length by default) for a shorter run (``--steps``, 300 by default, with the same
warm-up + cosine schedule compressed to that length) from the same initialisation on the same
batches, and is scored by its loss on the *tuning* split of the corpus (files with index
% 20 == 10), which is neither the training data nor the validation split that
``gpt_pretrain.py`` reports (index % 20 == 0).

The search is a staged coordinate search: the hyper-parameters are visited in a fixed order,
each stage tries a list of values with the others at the best found so far, and keeps the best
(configurations already run are not run again). Both optimizers get the same number of
configurations (19 each):

- IVON (clip 1e-3, weight decay 1e-6, no lr rescaling, as the paper with clipping): ess, lr,
  hess_init, b2, b1, lr again, b1 again, starting from the old default (lr 1, ess 1e7,
  hess_init 1e-3, b1 0.9, b2 0.9999).
- AdamW: lr, weight decay, b2, b1, lr again, b2 again, b1 again, starting from the old
  default (lr 1e-3, wd 0.1, b1 0.9, b2 0.95).

The grid grew in three runs, the later two with ``--resume`` (which keeps the configurations
already in the CSV and replays the stages): the first run had the first four stages (13
configurations each, IVON's b1 held at 0.9); AdamW's b1 stage moved its loss by far the most,
so both got b1 (IVON) or a second lr pass and b2 pass (AdamW) — 17 each; both then had their
best b1 at the grid's edge (0.8), so both got a last b1 stage below it.

Every configuration is appended to ``gpt_tune.csv`` as it finishes; the best of each optimizer
is printed at the end. ``--quick`` is a seconds-long smoke test (two configurations each, a
1-layer width-32 model, 5 steps) that writes to ``--out`` or, without it, to a new temporary
folder, never over the committed ``benchmarks/results/gpt_tune.csv``.

    python benchmarks/gpt_tune.py            # about 50 min on 2 shared CPU cores
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
from gpt_pretrain import IVON_FIXED
from gpt_pretrain import RESULTS
from gpt_pretrain import add_model_args
from gpt_pretrain import as_arrays
from gpt_pretrain import batches
from gpt_pretrain import build_model
from gpt_pretrain import data_mesh
from gpt_pretrain import load_corpus
from gpt_pretrain import make_optimizer
from gpt_pretrain import make_step

import ivon_jax

START = {
    "AdamW": {"lr": 1e-3, "b1": 0.9, "b2": 0.95, "wd": 0.1},
    "IVON": {"lr": 1.0, "ess": 1e7, "hess_init": 1e-3, "b1": 0.9, "b2": 0.9999},
}
STAGES = {
    "AdamW": [
        ("lr", [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]),
        ("wd", [0.0, 0.01, 0.1, 0.3]),
        ("b2", [0.95, 0.99, 0.999]),
        ("b1", [0.8, 0.9, 0.95]),
        ("lr", [2e-3, 4e-3, 8e-3]),
        ("b2", [0.9, 0.95, 0.99]),
        ("b1", [0.6, 0.7, 0.8]),
    ],
    "IVON": [
        ("ess", [1e7, 1e8, 1e9, 1e10]),
        ("lr", [0.25, 0.5, 1.0, 2.0, 4.0]),
        ("hess_init", [1e-4, 1e-3, 1e-2, 1e-1]),
        ("b2", [0.999, 0.9999, 0.99999]),
        ("b1", [0.8, 0.9, 0.95]),
        ("lr", [0.5, 1.0, 2.0]),
        ("b1", [0.6, 0.7, 0.8]),
    ],
}
QUICK_STAGES = {
    "AdamW": [("lr", [1e-3, 2e-3])],
    "IVON": [("lr", [0.5, 1.0])],
}
HP_COLUMNS = ["lr", "b1", "b2", "wd", "ess", "hess_init"]


def columns(name: str, hp: dict) -> dict:
    """The CSV's hyper-parameter columns; for IVON, wd is its δ (fixed)."""
    if name == "IVON":
        return {"wd": IVON_FIXED["weight_decay"], **hp}
    return hp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, steps=300)
    ap.add_argument("--eval-batches-tune", type=int, default=16,
                    help="batches of the tuning split that score each configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 configurations each, 1x32 model, 5 steps")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --quick run: a new temporary folder")
    ap.add_argument("--resume", action="store_true",
                    help="keep the configurations already in the CSV, run only the missing ones")
    args = ap.parse_args()
    # A --quick run never writes over the committed results of the full run.
    if args.out is None:
        args.out = pathlib.Path(tempfile.mkdtemp(prefix="gpt_tune_")) if args.quick else RESULTS
    stages = STAGES
    if args.quick:
        args.layers, args.width, args.heads, args.seq, args.batch = 1, 32, 2, 16, 8
        args.steps, args.corpus_mb, args.eval_batches_tune = 5, 0.5, 2
        stages = QUICK_STAGES
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    train, _, tune = load_corpus(int(args.corpus_mb * 2**20))  # validation is never read
    mesh, data_sharding = data_mesh(args.batch)
    init_params, loss_fn = build_model(args.layers, args.width, args.heads, args.seq, dtype)
    params0 = init_params(args.seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(args.steps // 20, 1),
                                                  args.steps)
    eval_loss = jax.jit(loss_fn)
    tune_rng = np.random.default_rng(54321)
    tune_batches = [batches(tune, tune_rng, args.batch, args.seq)
                    for _ in range(args.eval_batches_tune)]
    print(f"GPT {args.layers}x{args.width}, seq {args.seq}, batch {args.batch}, "
          f"{args.steps} steps per configuration; corpus {len(train) / 2**20:.2f} MiB train / "
          f"{len(tune) / 2**20:.2f} MiB tune", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpt_tune.csv"
    results = {name: {} for name in stages}  # name -> {config tuple: tune loss}
    if args.resume and path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                name = row["optimizer"]
                hp = {k: float(row[k]) for k in START[name]}
                results[name][tuple(sorted(hp.items()))] = float(row["tune_loss"])
        print(f"resuming: {sum(map(len, results.values()))} configurations read from {path}")
    else:
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(["optimizer", "stage", *HP_COLUMNS, "tune_loss",
                                    "ivon_sigma_median", "ivon_h_median", "seconds"])

    def run(name: str, hp: dict, step_fn) -> float:
        start = time.perf_counter()
        params = params0
        state = make_optimizer(name, hp, schedule).init(params)
        hp_arr = as_arrays(hp)
        rng = np.random.default_rng(args.seed)
        key = jax.random.key(args.seed)
        for t in range(1, args.steps + 1):
            tokens = jax.device_put(batches(train, rng, args.batch, args.seq), data_sharding)
            params, state, loss = step_fn(params, state, jax.random.fold_in(key, t), tokens,
                                          hp_arr)
        loss = float(np.mean([eval_loss(params, b) for b in tune_batches]))
        sigma_med = h_med = ""
        if name == "IVON":
            sigma = ivon_jax.posterior_std(state)
            h = ivon_jax.find_ivon_states(state)[0].hess
            med = lambda tree: float(jnp.median(jnp.concatenate(
                [jnp.ravel(x) for x in jax.tree.leaves(tree)])))
            sigma_med, h_med = f"{med(sigma):.3e}", f"{med(h):.3e}"
        return (loss if math.isfinite(loss) else math.inf), sigma_med, h_med, \
            time.perf_counter() - start

    best = {name: dict(START[name]) for name in stages}
    step_fns = {name: make_step(name, loss_fn, schedule, mesh) for name in stages}
    n_stages = max(len(s) for s in stages.values())
    for i in range(n_stages):  # the optimizers' stages interleaved
        for name in stages:
            if i >= len(stages[name]):
                continue
            key_name, values = stages[name][i]
            for value in values:
                hp = {**best[name], key_name: value}
                cfg = tuple(sorted(hp.items()))
                if cfg in results[name]:
                    continue
                loss, sigma_med, h_med, sec = run(name, hp, step_fns[name])
                results[name][cfg] = loss
                desc = ", ".join(f"{k} {v:g}" for k, v in hp.items())
                extra = f"  median σ {sigma_med}, median h {h_med}" if sigma_med else ""
                print(f"{name:5s} [{key_name}] {desc}: tune loss {loss:.4f} "
                      f"({sec:.0f} s){extra}", flush=True)
                with open(path, "a", newline="") as f:
                    csv.writer(f).writerow(
                        [name, key_name, *[columns(name, hp).get(k, "") for k in HP_COLUMNS],
                         f"{loss:.5f}", sigma_med, h_med, f"{sec:.1f}"])
            candidates = [dict(c) for c in results[name]
                          if all(dict(c)[k] == v for k, v in best[name].items() if k != key_name)]
            best[name] = min(candidates, key=lambda c: results[name][tuple(sorted(c.items()))])

    print(f"\nbest per optimizer (tune loss after {args.steps} steps):")
    for name in stages:
        cfg = tuple(sorted(best[name].items()))
        desc = ", ".join(f"{k} {v:g}" for k, v in best[name].items())
        print(f"  {name}: {desc}: {results[name][cfg]:.4f} "
              f"({len(results[name])} configurations)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
