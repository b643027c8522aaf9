"""Which IVON settings make the posterior learn, and which rule transfers across tasks.

A user who ports an AdamW loop gives IVON the learning rate and ``ess`` and nothing else. This
study trains every task with a grid of the settings a user does not tune — the Hessian
initialisation h₀, β₂ relative to the number of steps T, ess / N and the prior precision δ —
crossed with a learning-rate grid, and records for every run:

* validation accuracy and NLL of the Monte-Carlo predictive (16 samples) and at the mean;
* what h learned (``ivon_jax.state_summary``): ``decay_share``, the mean over elements of
  min(1, h₀β₂ᵀ / h) (1 when h is only the decayed initial value, near 0 when the data's ĥ
  dominates); ``frac_learned``, the fraction of elements whose h differs from h₀β₂ᵀ by more
  than a factor of 2; the median of h and of σ, and ``sigma_prior_ratio``, the median of
  σ / σ_prior with σ_prior = 1/√(λδ) (1 means σ is at the prior: the data has not narrowed
  it). ``h0_used`` is the median over leaves of h₀ (with ``auto``, as calibrated).

Hyper-parameters are compared on the **validation** split only (the tasks' test splits are not
read here). Every run is one row of ``benchmarks/results/defaults_study.csv``; the table of
the best learning rate per setting is ``defaults_study.md``.

β₂ is given either as a number or as ``T/k`` meaning 1 − k/T (an h horizon of T/k steps).
``h0=auto`` is ``hess_init="auto"`` (see ``ivon_jax.ivon``).

Usage::

    python benchmarks/defaults_study.py                      # the full grid (~1 h, 2 cores)
    python benchmarks/defaults_study.py --tasks digits-mlp   # one task
    python benchmarks/defaults_study.py --quick --out /tmp/x # a tiny version (tests)
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T

import ivon_jax

RESULTS = pathlib.Path(__file__).with_name("results")
SEEDS = (1000, 1001)


def task_list(quick: bool) -> dict[str, dict]:
    q = quick
    return {
        "mnist1d-mlp": dict(data=T.mnist1d, model=T.mlp((40, 256, 256, 10)),
                            setup=T.Setup(1 if q else 60, 100)),
        "digits-mlp": dict(data=T.digits, model=T.mlp((64, 128, 128, 10)),
                           setup=T.Setup(1 if q else 60, 32)),
        "mnist1d-cnn": dict(data=T.mnist1d, model=T.cnn1d(8 if q else 16),
                            setup=T.Setup(1 if q else 60, 100)),
        "regression-1d": dict(data=T.regression_1d,
                              model=T.mlp((1, 64, 64, 1), jnp.tanh, extra_out=1),
                              setup=T.Setup(5 if q else 400, 32)),
        "mnist1d-mlp-long": dict(data=T.mnist1d, model=T.mlp((40, 256, 256, 10)),
                                 setup=T.Setup(1 if q else 200, 100)),
    }


def b2_value(spec: str, total: int) -> float:
    if spec.startswith("T/"):
        return 1.0 - float(spec[2:]) / total
    return float(spec)


def h_stats(state) -> dict[str, float]:
    sm = ivon_jax.state_summary(state)
    return {"h_median": float(sm["h_p50"]), "decay_share": float(sm["h_decay_share"]),
            "frac_learned": float(sm["frac_h_learned"]),
            "sigma_median": float(sm["sigma_p50"]),
            "sigma_prior_ratio": float(sm["sigma_prior_ratio_p50"])}


def settings(quick: bool, grid: str = "coarse") -> tuple[list[dict], tuple[float, ...]]:
    """The settings a user does not tune, and the learning rates each is crossed with.

    ``coarse``: h₀ x β₂ x ess/N over wide ranges, 3 learning rates. ``fine``: around what
    the coarse grid found (h₀ = 1 and ess = N, β₂ = 1 - k/T for k = 1 - 10, δ 1e-4 - 1e-2),
    6 learning rates — as many as AdamW's learning-rate x weight-decay grid in
    ``paper_table.py``.
    """
    if quick:
        return ([dict(h0="1.0", b2="0.99999", ess=1.0, wd=1e-4),
                 dict(h0="0.2", b2="T/5", ess=10.0, wd=1e-4),
                 dict(h0="auto", b2="T/5", ess=10.0, wd=1e-4)], (0.1, 0.3))
    if grid == "coarse":
        return ([dict(h0=h0, b2=b2, ess=ess, wd=1e-4)
                 for h0, b2, ess in itertools.product(("1.0", "0.2", "0.02", "auto"),
                                                      ("0.99999", "T/1", "T/5"),
                                                      (1.0, 10.0, 100.0))], (0.1, 0.3, 1.0))
    return ([dict(h0="1.0", b2=b2, ess=1.0, wd=wd)
             for b2, wd in itertools.product(("T/1", "T/2", "T/3", "T/5", "T/10"),
                                             (1e-4, 1e-3, 1e-2))],
            (0.03, 0.1, 0.2, 0.5, 1.0, 2.0))


def run_task(name: str, spec: dict, quick: bool, writer, out_rows: list,
             grid: str = "coarse") -> None:
    """Every setting x learning rate x seed of one task: the numeric-h₀ settings in one
    vmapped call (h₀, β₂, ess and δ are traced: one compile), the "auto" ones in another."""
    data: T.Data = spec["data"]()
    model: T.Model = spec["model"]
    setup: T.Setup = spec["setup"]
    total = T.steps_per_epoch(data, setup) * setup.epochs
    samples = 4 if quick else 16
    grid, lrs = settings(quick, grid)
    seeds = SEEDS[:1] if quick else SEEDS

    f = functools.partial(T.predictive, model, data.kind, num_samples=samples, is_ivon=True)
    pred_fn = jax.jit(jax.vmap(lambda p, s, x, k: f(p, s, x, k), in_axes=(0, 0, None, 0)))

    for auto in (False, True):
        group = [st for st in grid if (st["h0"] == "auto") == auto]
        if not group:
            continue
        table = {k: jnp.asarray([v(st) for st in group], jnp.float32) for k, v in {
            "h0": lambda st: 0.0 if auto else float(st["h0"]),
            "b2": lambda st: b2_value(st["b2"], total),
            "ess": lambda st: st["ess"] * data.n_train,
            "wd": lambda st: st["wd"]}.items()}

        def build(lr, idx, n, table=table, auto=auto):
            i = idx.astype(jnp.int32)
            return ivon_jax.ivon(lr, ess=table["ess"][i],
                                 hess_init="auto" if auto else table["h0"][i],
                                 b2=table["b2"][i], weight_decay=table["wd"][i])

        method = T.Method("IVON", (), "config", build, is_ivon=True)
        trainer = T.make_trainer(data, model, method, setup)
        runs = [(j, lr, seed) for j in range(len(group)) for lr in lrs for seed in seeds]
        t0 = time.perf_counter()
        params, states = trainer(jnp.array([s for _, _, s in runs]),
                                 jnp.array([lr for _, lr, _ in runs], jnp.float32),
                                 jnp.array([j for j, _, _ in runs], jnp.float32))
        keys = jax.random.split(jax.random.key(7), len(runs))
        preds = pred_fn(params, states, data.x_val, keys)
        secs = time.perf_counter() - t0
        for r, (j, lr, seed) in enumerate(runs):
            st = group[j]
            pick = lambda tree, r=r: jax.tree.map(lambda a: a[r], tree)
            s_r = pick(states)
            mc = T.scores(pick(preds["mc"]), data.y_val, data.kind)
            mean = T.scores(pick(preds["mean"]), data.y_val, data.kind)
            (ivs,) = ivon_jax.find_ivon_states(s_r)
            h0_used = float(np.median([float(x) for x in jax.tree.leaves(ivs.hess_init)]))
            row = dict(task=name, steps=total, h0=st["h0"], h0_used=f"{h0_used:.4g}",
                       b2=st["b2"], b2_value=f"{b2_value(st['b2'], total):.6g}",
                       ess_factor=st["ess"], wd=st["wd"], lr=lr, seed=seed,
                       val_acc=f"{mc.get('acc', np.nan):.4g}", val_nll=f"{mc['nll']:.5g}",
                       val_ece=f"{mc.get('ece', np.nan):.4g}",
                       mean_acc=f"{mean.get('acc', np.nan):.4g}",
                       mean_nll=f"{mean['nll']:.5g}",
                       **{k: f"{v:.4g}" for k, v in h_stats(s_r).items()})
            writer.writerow(row)
            out_rows.append(row)
        print(f"{name}: {len(runs)} runs ({'auto' if auto else 'numeric'} h0) in {secs:.0f} s",
              flush=True)


FIELDS = ["task", "steps", "h0", "h0_used", "b2", "b2_value", "ess_factor", "wd", "lr", "seed", "val_acc", "val_nll", "val_ece", "mean_acc", "mean_nll",
          "h_median", "decay_share", "frac_learned", "sigma_median", "sigma_prior_ratio"]


def best_table(rows: list[dict]) -> str:
    """Per task and setting, the learning rate with the lowest mean validation NLL."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for r in rows:
        key = (r["task"], r["h0"], r["b2"], r["ess_factor"], r["wd"])
        groups.setdefault(key, {}).setdefault(float(r["lr"]), []).append(r)
    out = ["| task | h0 | b2 | ess/N | δ | best lr | val NLL | val acc | decay share | "
           "frac learned | σ/σ_prior |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def mean(rs, k):
        v = [float(r[k]) for r in rs]
        return np.nanmean(v) if np.isfinite(v).any() else np.nan

    for key, by_lr in groups.items():
        lr, rs = min(by_lr.items(), key=lambda kv: np.nan_to_num(mean(kv[1], "val_nll"),
                                                                 nan=np.inf))
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {float(key[3]):g} | "
                   f"{float(key[4]):g} | {lr:g} | "
                   f"{mean(rs, 'val_nll'):.3f} | {mean(rs, 'val_acc'):.1f} | "
                   f"{mean(rs, 'decay_share'):.3f} | {mean(rs, 'frac_learned'):.3f} | "
                   f"{mean(rs, 'sigma_prior_ratio'):.3f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    all_tasks = list(task_list(False))
    ap.add_argument("--tasks", nargs="+", choices=all_tasks, default=all_tasks[:3])
    ap.add_argument("--grid", choices=("coarse", "fine"), default="coarse")
    ap.add_argument("--quick", action="store_true", help="a tiny version (tests)")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="output folder (default: benchmarks/results; --quick needs --out)")
    args = ap.parse_args()
    if args.out is None:
        if args.quick:
            raise SystemExit("--quick writes nowhere by default: pass --out DIR")
        args.out = RESULTS
    args.out.mkdir(parents=True, exist_ok=True)
    specs = task_list(args.quick)
    rows: list[dict] = []
    start = time.perf_counter()
    stem = "defaults_study" if args.grid == "coarse" else "defaults_study_fine"
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for name in args.tasks:
            run_task(name, specs[name], args.quick, writer, rows, args.grid)
            f.flush()
    md = ("# Defaults study\n\nBest learning rate per setting (lowest mean validation NLL of "
          "the MC predictive over the seeds); written by `python benchmarks/defaults_study.py`."
          "\n\n" + best_table(rows) + f"\n\nTotal wall time: {time.perf_counter() - start:.0f} s.\n")
    (args.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
