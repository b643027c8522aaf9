"""The paper's Table 1 in miniature: AdamW, SGD and IVON under one protocol on four small tasks.

Protocol (the same for every optimizer):

* Splits: train / validation / test (``tasks.py`` says how each is made). Test data is used
  once, after every choice has been made.
* Tuning budget: a stated grid of 6 configurations per optimizer, each trained with 2 tuning
  seeds; the configuration with the lowest mean **validation NLL** is chosen (for IVON, the
  NLL of its Monte-Carlo predictive, 32 samples). AdamW and SGD: 3 peak learning rates x 2
  values of the weight decay. IVON: 6 peak learning rates and nothing else, as a user who
  ports from AdamW would tune it. Nothing else is tuned per task.
* Then ``--seeds`` (15) fresh seeds at the chosen configuration; every run's test metrics are
  kept. Single-model rows are mean ± std over those runs.
* Ensembles: the runs are grouped in threes (seeds 1-3, 4-6, ...): Multi-IVON is the uniform
  mixture of 3 IVON runs' MC predictives, the deep ensemble is the mixture of 3 runs of the
  baseline (AdamW or SGD) whose chosen configuration had the lower validation NLL.
* The same epochs, batch size and schedule (linear warm-up over 5 % of the steps, then cosine
  to zero) for every optimizer on a task.
* Fixed settings, not tuned per task (set once from a preliminary look at the MNIST-1D MLP's
  validation split): AdamW β = (0.9, 0.999); SGD momentum 0.9 with L2 weight decay; IVON
  ``ivon_jax.ivon(lr, ess=N, total_steps=T)`` with every other argument at its default (the
  ``total_steps`` path: β₂ = 1 - 2/T, δ = 1e-3, h₀ = 1, rescaled learning rate; N the
  training-set size, T the run's number of steps), one MC sample per step; test-time MC
  predictive with 64 samples.

Tasks: MNIST-1D with an MLP (40-256-256-10) and with a small 1-D CNN, scikit-learn's digits
with an MLP (64-128-128-10), and a 1-D regression whose validation/test inputs cover a gap
in the training inputs (Gaussian predictive with a learned noise scale; test NLL and RMSE).

Writes ``benchmarks/results/paper_table.csv`` (every tuning run and every test run),
``paper_table.md`` (the tables) and ``paper_table.png`` (``--quick``: ``--out`` or a new temporary
folder, never over the committed results).

Usage::

    python benchmarks/paper_table.py                 # all tasks (~20-30 min on 2 CPU cores)
    python benchmarks/paper_table.py --tasks digits-mlp regression-1d
    python benchmarks/paper_table.py --quick --out /tmp/x   # a tiny version (CI)
"""

from __future__ import annotations

import argparse
import csv
import functools
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T

from ivon_jax._src.transform import WD_WITH_STEPS  # the δ that ivon(..., total_steps=T) uses

RESULTS = pathlib.Path(__file__).with_name("results")
K = 3  # ensemble size (deep ensemble and Multi-IVON)
TUNE_SEEDS = (1000, 1001)

# Grids: 3 learning rates x 2 regulariser values per optimizer.
CLS_GRIDS = {
    "AdamW": [(lr, wd) for lr in (1e-3, 3e-3, 1e-2) for wd in (1e-2, 3e-1)],
    "SGD": [(lr, wd) for lr in (0.03, 0.1, 0.3) for wd in (5e-4, 5e-3)],
    "IVON": [(lr, WD_WITH_STEPS) for lr in (0.1, 0.3, 0.5, 1.0, 2.0, 4.0)],
}
REG_GRIDS = {  # the Gaussian NLL with a learned noise scale needs smaller steps
    "AdamW": [(lr, wd) for lr in (1e-3, 3e-3, 1e-2) for wd in (1e-2, 3e-1)],
    "SGD": [(lr, wd) for lr in (3e-3, 1e-2, 3e-2) for wd in (5e-4, 5e-3)],
    "IVON": [(lr, WD_WITH_STEPS) for lr in (0.01, 0.03, 0.1, 0.3, 0.5, 1.0)],
}


def methods(grids, total_steps: int) -> dict[str, T.Method]:
    return {
        "AdamW": T.adamw_method(grids["AdamW"]),
        "SGD": T.sgd_method(grids["SGD"]),
        "IVON": T.ivon_defaults_method(grids["IVON"], total_steps),
    }


def task_list(quick: bool) -> dict[str, dict]:
    q = quick
    return {
        "mnist1d-mlp": dict(data=T.mnist1d, model=T.mlp((40, 256, 256, 10)),
                            setup=T.Setup(2 if q else 60, 100), grids=CLS_GRIDS),
        "mnist1d-cnn": dict(data=T.mnist1d, model=T.cnn1d(8 if q else 16),
                            setup=T.Setup(1 if q else 60, 100), grids=CLS_GRIDS),
        "digits-mlp": dict(data=T.digits, model=T.mlp((64, 128, 128, 10)),
                           setup=T.Setup(2 if q else 60, 32), grids=CLS_GRIDS),
        "regression-1d": dict(data=T.regression_1d,
                              model=T.mlp((1, 64, 64, 1), jax.numpy.tanh, extra_out=1),
                              setup=T.Setup(5 if q else 400, 32), grids=REG_GRIDS),
    }


def tree_index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def run_task(name: str, spec: dict, n_seeds: int, quick: bool, writer, bar) -> dict:
    data: T.Data = spec["data"]()
    model: T.Model = spec["model"]
    setup: T.Setup = spec["setup"]
    meths = methods(spec["grids"], T.steps_per_epoch(data, setup) * setup.epochs)
    if quick:
        meths = {k: T.Method(m.name, m.grid[:2], m.reg_name, m.build, m.is_ivon)
                 for k, m in meths.items()}
    n_val_samples, n_test_samples = (4, 4) if quick else (32, 64)
    base = dict(task=name, data=data.name, model=model.name, epochs=setup.epochs,
                batch=setup.batch)

    @functools.cache
    def pred_fn(is_ivon: bool, num_samples: int):
        f = functools.partial(T.predictive, model, data.kind, num_samples=num_samples,
                              is_ivon=is_ivon)
        return jax.jit(jax.vmap(lambda p, s, x, k: f(p, s, x, k), in_axes=(0, 0, None, 0)))

    chosen, val_nll = {}, {}
    finals = {}
    for mname, meth in meths.items():
        trainer = T.make_trainer(data, model, meth, setup)
        # ---- tuning: every configuration x every tuning seed, in one vmapped call
        cfgs = [(c, s) for c in meth.grid for s in TUNE_SEEDS]
        t0 = time.perf_counter()
        params, states = trainer(jnp.array([s for _, s in cfgs]),
                                    jnp.array([c[0] for c, _ in cfgs], jnp.float32),
                                    jnp.array([c[1] for c, _ in cfgs], jnp.float32))
        keys = jax.random.split(jax.random.key(7), len(cfgs))
        preds = pred_fn(meth.is_ivon, n_val_samples)(params, states, data.x_val, keys)
        which = "mc" if meth.is_ivon else "mean"
        per_cfg: dict[tuple, list[float]] = {}
        for r, (cfg, seed) in enumerate(cfgs):
            sc = T.scores(tree_index(preds[which], r), data.y_val, data.kind)
            nll = sc["nll"] if np.isfinite(sc["nll"]) else np.inf
            per_cfg.setdefault(cfg, []).append(nll)
            writer.writerow({**base, "phase": "tune", "method": mname, "lr": cfg[0],
                             "reg": cfg[1], "seed": seed, "split": "val",
                             **{k: f"{v:.6g}" for k, v in sc.items()}})
        best = min(per_cfg, key=lambda c: np.mean(per_cfg[c]))
        chosen[mname], val_nll[mname] = best, float(np.mean(per_cfg[best]))
        bar.update(1)
        bar.set_postfix_str(f"{name} {mname}: tuned in {time.perf_counter() - t0:.0f}s")

        # ---- final runs at the chosen configuration
        seeds = jnp.arange(1, n_seeds + 1)
        params, states = trainer(seeds, jnp.full(n_seeds, best[0], jnp.float32),
                                    jnp.full(n_seeds, best[1], jnp.float32))
        keys = jax.random.split(jax.random.key(8), n_seeds)
        finals[mname] = pred_fn(meth.is_ivon, n_test_samples)(params, states, data.x_test,
                                                               keys)
        bar.update(1)

    rows: dict[str, list[dict]] = {}

    def record(label, method, cfg, seed, pred):
        sc = T.scores(pred, data.y_test, data.kind)
        rows.setdefault(label, []).append(sc)
        writer.writerow({**base, "phase": "test", "method": label, "lr": cfg[0], "reg": cfg[1],
                         "seed": seed, "split": "test",
                         **{k: f"{v:.6g}" for k, v in sc.items()}})

    for mname in meths:
        variants = [("IVON@mean", "mean"), ("IVON", "mc")] if mname == "IVON" else [
            (mname, "mean")]
        for label, which in variants:
            for r in range(n_seeds):
                record(label, mname, chosen[mname], r + 1, tree_index(finals[mname][which], r))
    baseline = min(("AdamW", "SGD"), key=lambda m: val_nll[m])
    for label, mname, which in [(f"Deep ensemble ({baseline} x{K})", baseline, "mean"),
                                (f"Multi-IVON (x{K})", "IVON", "mc")]:
        for g in range(n_seeds // K):
            members = [tree_index(finals[mname][which], g * K + j) for j in range(K)]
            record(label, mname, chosen[mname], f"{g * K + 1}-{g * K + K}",
                   T.mixture(members, data.kind))
    return dict(data=data, model=model, setup=setup, chosen=chosen, val_nll=val_nll, rows=rows,
                n_seeds=n_seeds)


def markdown(results: dict[str, dict]) -> str:
    out = ["# Table 1 in miniature", "",
           "Mean ± std (sample std) over independent runs on the **test** split; "
           "configurations chosen on validation NLL (see `benchmarks/paper_table.py`). "
           "Ensembles: groups of 3 runs. Written by `python benchmarks/paper_table.py`.", ""]
    for name, res in results.items():
        d, s = res["data"], res["setup"]
        chosen = "; ".join(f"{m} lr {c[0]:g}" + (" (every other argument at its default)"
                                                  if m == "IVON" else f", wd {c[1]:g}")
                           for m, c in res["chosen"].items())
        out += [f"## {name}: {d.name}, {res['model'].name}",
                f"{d.n_train} train / {len(d.y_val)} validation / {len(d.y_test)} test; "
                f"{s.epochs} epochs, batch {s.batch}; chosen on validation: {chosen}.", ""]
        cls = d.kind == "classification"
        cols = ["acc", "nll", "ece", "brier"] if cls else ["nll", "rmse"]
        heads = ["test acc (%)", "NLL", "ECE", "Brier"] if cls else ["test NLL", "RMSE"]
        out += ["| method | runs | " + " | ".join(heads) + " |",
                "|---|---:|" + "---:|" * len(cols)]
        for label, rs in res["rows"].items():
            cells = [T.mean_std([r[c] for r in rs], 2 if c == "acc" else 3) for c in cols]
            out.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def figure(results: dict[str, dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 5.6), squeeze=False)
    for j, (name, res) in enumerate(results.items()):
        cls = res["data"].kind == "classification"
        for i, (metric, label) in enumerate(
                [("nll", "test NLL"), ("ece", "test ECE") if cls else ("rmse", "test RMSE")]):
            ax = axes[i, j]
            labels = list(res["rows"])
            vals = [[r[metric] for r in res["rows"][lab]] for lab in labels]
            colors = ["C2" if "IVON" in lab else "C0" for lab in labels]
            for k, (v, c) in enumerate(zip(vals, colors, strict=True)):
                ax.errorbar(k, np.mean(v), yerr=np.std(v), fmt="o", color=c, capsize=3)
                ax.scatter(np.full(len(v), k) + 0.15, v, s=6, color=c, alpha=0.4)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([lab.replace(" (", "\n(") for lab in labels], rotation=60,
                               fontsize=7, ha="right")
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
    fig.suptitle("Test metrics, lower is better (mean ± std; dots: individual runs; "
                 "IVON rows in green)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    all_tasks = list(task_list(False))
    ap.add_argument("--tasks", nargs="+", choices=all_tasks, default=all_tasks)
    ap.add_argument("--seeds", type=int, default=15, help="final runs per optimizer (≥ 5)")
    ap.add_argument("--quick", action="store_true", help="a tiny version for CI")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --quick run: a new temporary folder")
    args = ap.parse_args()
    # A --quick run never writes over the committed results of the full run.
    if args.out is None:
        args.out = pathlib.Path(tempfile.mkdtemp(prefix="paper_table_")) if args.quick else RESULTS
    n_seeds = 2 * K if args.quick else args.seeds
    if n_seeds < K:
        raise SystemExit(f"--seeds must be at least {K}")
    specs = task_list(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["task", "data", "model", "epochs", "batch", "phase", "method", "lr", "reg", "seed",
              "split", "acc", "nll", "ece", "brier", "rmse"]
    start = time.perf_counter()
    results = {}
    with open(args.out / "paper_table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        with tqdm(total=len(args.tasks) * 6, desc="paper table", unit="stage") as bar:
            for name in args.tasks:
                results[name] = run_task(name, specs[name], n_seeds, args.quick, writer, bar)
                f.flush()
    md = markdown(results)
    md += f"\nTotal wall time: {time.perf_counter() - start:.0f} s.\n"
    (args.out / "paper_table.md").write_text(md)
    figure(results, args.out / "paper_table.png")
    print("\n" + md)
    print(f"wrote {args.out / 'paper_table.csv'}, paper_table.md and paper_table.png")


if __name__ == "__main__":
    main()
