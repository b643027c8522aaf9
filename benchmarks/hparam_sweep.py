"""IVON's hyper-parameters one at a time: what each does when it is off (the hyper-parameter guide).

Starting from the configuration ``paper_table.py`` chose for each task on validation NLL, it
changes ONE setting at a time — learning rate (x1/4, x4), ``rescale_lr=False`` (with the same
and with an equivalent learning rate), ``hess_init`` (x1/10, x10), ``ess`` (N/10, 10 N),
``b2`` (0.99, 0.99999), ``clip_radius`` 1e-3, ``weight_decay`` 1e-2 and a constant learning
rate instead of the cosine decay — and reports, on the **validation** split (this is a guide,
not a result; the test split is never read), mean ± std over ``--seeds`` seeds of accuracy
(RMSE for the regression, which has no ECE),
the NLL and ECE of the MC predictive, the NLL at the mean, and the final state's median σ and
fraction of negative h (``ivon_jax.state_summary``).

Writes ``benchmarks/results/hparam_sweep.{csv,md}`` (``--quick``: ``--out`` or a new temporary
folder). About 5 minutes on 2 CPU cores.

Usage::

    python benchmarks/hparam_sweep.py [--tasks mnist1d-mlp digits-mlp regression-1d] [--seeds 3]
    python benchmarks/hparam_sweep.py --quick --out /tmp/x     # a tiny version (CI)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
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

import ivon_jax

RESULTS = pathlib.Path(__file__).with_name("results")
H0, B2 = 0.2, 0.999  # paper_table.py's fixed IVON settings
# (peak lr, δ) chosen by paper_table.py on validation NLL (results/paper_table.md).
TASKS = {
    "mnist1d-mlp": dict(data=T.mnist1d, model=T.mlp((40, 256, 256, 10)), setup=T.Setup(60, 100),
                        base=(0.5, 1e-4)),
    "digits-mlp": dict(data=T.digits, model=T.mlp((64, 128, 128, 10)), setup=T.Setup(60, 32),
                       base=(0.5, 1e-4)),
    "regression-1d": dict(data=T.regression_1d, model=T.mlp((1, 64, 64, 1), jnp.tanh, extra_out=1),
                          setup=T.Setup(400, 32), base=(0.03, 1e-2)),
}


def variants(lr: float, wd: float) -> list[tuple[str, float, float, dict, str]]:
    """(label, lr, δ, ivon kwargs, schedule); kwargs hold hess_init, b2, ess_factor, ..."""
    base = dict(hess_init=H0, b2=B2)
    v = [("chosen", lr, wd, base, "cosine"),
         ("lr x 1/4", lr / 4, wd, base, "cosine"),
         ("lr x 4", lr * 4, wd, base, "cosine"),
         ("rescale_lr=False, same lr", lr, wd, {**base, "rescale_lr": False}, "cosine"),
         (f"rescale_lr=False, lr x (h0+δ) = {lr * (H0 + wd):.3g}", lr * (H0 + wd), wd,
          {**base, "rescale_lr": False}, "cosine"),
         ("hess_init x 1/10", lr, wd, {**base, "hess_init": H0 / 10}, "cosine"),
         ("hess_init x 10", lr, wd, {**base, "hess_init": H0 * 10}, "cosine"),
         ("ess = N/10", lr, wd, {**base, "ess_factor": 0.1}, "cosine"),
         ("ess = 10 N", lr, wd, {**base, "ess_factor": 10.0}, "cosine"),
         ("b2 = 0.99", lr, wd, {**base, "b2": 0.99}, "cosine"),
         ("b2 = 0.99999", lr, wd, {**base, "b2": 0.99999}, "cosine"),
         ("clip_radius = 1e-3", lr, wd, {**base, "clip_radius": 1e-3}, "cosine"),
         ("weight_decay = 1e-2", lr, 1e-2, base, "cosine"),
         ("constant lr (no decay)", lr, wd, base, "constant")]
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None, help="override (tiny runs)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --quick run: a new temporary folder")
    ap.add_argument("--quick", action="store_true",
                    help="tiny (CI): digits, 1 epoch, 2 seeds, 3 variants, 2 samples")
    args = ap.parse_args()
    # A --quick run never writes over the committed results of the full run.
    if args.out is None:
        args.out = pathlib.Path(tempfile.mkdtemp(prefix="hparam_sweep_")) if args.quick else RESULTS
    pick = lambda vs: vs
    if args.quick:
        args.tasks, args.epochs, args.seeds, args.samples = ["digits-mlp"], 1, 2, 2
        pick = lambda vs: [vs[0], vs[3], vs[-1]]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    nan = float("nan")
    fields = ["task", "variant", "seed", "lr", "weight_decay", "val_acc", "val_rmse", "val_nll",
              "val_ece",
              "val_nll_at_mean", "sigma_p50", "frac_h_negative"]
    md = ["# IVON hyper-parameters one at a time (validation split)", "",
          "Mean ± std over seeds; written by `python benchmarks/hparam_sweep.py`. NLL and ECE "
          "of the MC predictive; σ and h from the final state.", ""]
    seeds = jnp.arange(1, args.seeds + 1)
    with open(args.out / "hparam_sweep.csv", "w", newline="") as f, \
            tqdm(total=sum(len(pick(variants(*TASKS[t]["base"]))) for t in args.tasks),
                 desc="sweep", unit="variant") as bar:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for task in args.tasks:
            spec = TASKS[task]
            data, model = spec["data"](), spec["model"]
            setup = spec["setup"]
            if args.epochs:
                setup = dataclasses.replace(setup, epochs=args.epochs)
            md += [f"## {task}: {data.name}, {model.name}, {setup.epochs} epochs, batch "
                   f"{setup.batch}; chosen lr {spec['base'][0]:g}, δ {spec['base'][1]:g}, "
                   f"h0 {H0:g}, b2 {B2:g}, ess N = {data.n_train}", "",
                   "| variant | val " + ("acc (%)" if data.kind == "classification" else "RMSE")
                   + " | val NLL | val ECE | NLL at mean | median σ "
                   "| h < 0 |", "|---|---:|---:|---:|---:|---:|---:|"]
            for label, lr, wd, kw, sched in pick(variants(*spec["base"])):
                kw = dict(kw)
                method = T.ivon_method([], kw.pop("hess_init"), kw.pop("b2"), **kw)
                trainer = T.make_trainer(data, model, method,
                                         dataclasses.replace(setup, schedule=sched))
                params, states = trainer(seeds, jnp.full(args.seeds, lr),
                                         jnp.full(args.seeds, wd))
                res = []
                for r in range(args.seeds):
                    p, s = jax.tree.map(lambda a, r=r: a[r], (params, states))
                    pred = T.predictive(model, data.kind, p, s, data.x_val,
                                        jax.random.key(50 + r), args.samples, True)
                    mc = T.scores(pred["mc"], data.y_val, data.kind)
                    at_mean = T.scores(pred["mean"], data.y_val, data.kind)
                    summ = ivon_jax.state_summary(s)
                    row = dict(task=task, variant=label, seed=int(seeds[r]), lr=lr,
                               weight_decay=wd, val_acc=mc.get("acc", nan),
                               val_rmse=mc.get("rmse", nan), val_nll=mc["nll"],
                               val_ece=mc.get("ece", nan), val_nll_at_mean=at_mean["nll"],
                               sigma_p50=float(summ["sigma_p50"]),
                               frac_h_negative=float(summ["frac_h_negative"]))
                    w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                                for k, v in row.items()})
                    res.append(row)
                # Population std (ddof=0), as in the committed results.
                cell = lambda k, d, res=res: T.mean_std([x[k] for x in res], d, ddof=0)
                first = (cell("val_acc", 1) if data.kind == "classification"
                         else cell("val_rmse", 3))
                md.append(f"| {label} | {first} | {cell('val_nll', 3)} "
                          f"| {cell('val_ece', 3) if data.kind == 'classification' else '—'} "
                          f"| {cell('val_nll_at_mean', 3)} "
                          f"| {np.mean([x['sigma_p50'] for x in res]):.3g} "
                          f"| {np.mean([x['frac_h_negative'] for x in res]):.2f} |")
                bar.update(1)
            md.append("")
    md.append(f"Total wall time: {time.perf_counter() - start:.0f} s.")
    (args.out / "hparam_sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
