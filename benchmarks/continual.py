"""Continual learning in miniature: IVON with the posterior as the next task's prior.

Three (``--tasks``) tasks in sequence, permuted MNIST-1D: task 0 is MNIST-1D as
``tasks.mnist1d()`` makes it (3,200 train / 800 validation / 1,000 test, 10 classes), task k ≥ 1
the same sequences with the 40 input positions shuffled by a fixed random permutation (one per
task, the same for every run). One network, one output head for all tasks; the task identity
is never an input. The network trains on task 0, then on task 1, then on task 2, seeing only
the current task's training split; after each task it is evaluated on every task seen so far.

Methods (each trains every task from where the previous task left its weights):

* ``IVON + posterior prior`` (variational continual learning): ``ivon_jax.ivon(lr, ess=N,
  total_steps=T)`` with a fresh state per task; from task 1 on its prior is the previous
  task's posterior, ``set_prior(state, **posterior_as_prior(params, old_state, ess=N))``: the
  prior mean is the previous task's m and the prior precision λ(h + δ), so the precision
  accumulates over tasks (task 0 has the default prior N(0, 1/(λδ)), δ = 1e-3).
* ``IVON, prior at task start``: the same optimizer with ``prior_mean="init"``: a fresh state
  per task whose prior N(m_start, 1/(λδ)) is centred at the weights the task starts from,
  with the default δ = 1e-3. The only difference to the row above is the prior's precision.
* ``AdamW``: ``optax.adamw(lr, weight_decay=wd)``, a fresh state per task (plain fine-tuning).

Protocol (the same for every method):

* Every task: the MLP 40-256-256-10, ``--epochs`` (25) epochs of batch 100 (32 steps an
  epoch), a linear warm-up over 5 % of the task's steps, then cosine to zero; the schedule
  restarts with each task. IVON: ess = N = 3,200 (each task's training-set size), T = the
  task's steps, every other argument at its default; one MC sample per step.
* Tuning budget: 6 configurations per method, each trained through all tasks with 2 tuning
  seeds. AdamW: 3 peak learning rates x 2 weight decays; each IVON variant: 6 peak learning
  rates. The configuration with the highest mean **validation** accuracy over all tasks after
  the last task is chosen (IVON: of its MC predictive; ties broken by the validation NLL).
* Then ``--seeds`` (3) fresh seeds at the chosen configuration, scored on the **test** splits:
  the accuracy matrix (after task t, accuracy on task j ≤ t), the average test accuracy and
  NLL over all tasks after the last task, and forgetting (the mean over tasks j < last of the
  accuracy right after training on j minus the accuracy after the last task). IVON is scored
  with its MC predictive (``--samples``, 32, posterior samples) and at its mean (``@mean``).
* All runs of one method and phase are ``vmap``-ed together; test data is used only after
  every choice has been made.

The script prints, for the first final run, what ``set_prior`` left in the state at every
new task (the prior mean against the previous task's weights, the prior precision against
λ(h + δ) of the previous state, and their medians) and stops if they disagree.

Writes ``continual.csv`` (every evaluation of every tuning and final run), ``continual.md``
(the tables) and ``continual.png`` (accuracy on each task after each task trained) to
``benchmarks/results/``; a ``--quick`` run writes to ``--out`` or a new temporary folder, never
over the committed results.

Usage::

    python benchmarks/continual.py                  # 5-7 minutes on 2 CPU cores
    python benchmarks/continual.py --quick --out /tmp/x   # a tiny version (CI)
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
import optax
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T

import ivon_jax
from ivon_jax import metrics
from ivon_jax._src.transform import WD_WITH_STEPS  # the δ that ivon(..., total_steps=T) uses

RESULTS = pathlib.Path(__file__).with_name("results")
PERMUTATION_SEED = 2024
TUNE_SEEDS = (1000, 1001)
BATCH = 100
WARMUP = 0.05
IVON_LRS = (0.1, 0.3, 0.5, 1.0, 2.0, 4.0)
GRIDS = {
    "IVON + posterior prior": [(lr, WD_WITH_STEPS) for lr in IVON_LRS],
    "IVON, prior at task start": [(lr, WD_WITH_STEPS) for lr in IVON_LRS],
    "AdamW": [(lr, wd) for lr in (1e-3, 3e-3, 1e-2) for wd in (1e-2, 3e-1)],
}
KIND = {"IVON + posterior prior": "vcl", "IVON, prior at task start": "init",
        "AdamW": "adamw"}


# ----------------------------------------------------------------------------- data


def permuted_tasks(n_tasks: int) -> list[T.Data]:
    """Task 0: MNIST-1D; task k ≥ 1: its inputs with the positions shuffled (fixed per task)."""
    base = T.mnist1d()
    rng = np.random.default_rng(PERMUTATION_SEED)
    out = [base]
    for k in range(1, n_tasks):
        perm = rng.permutation(base.x_train.shape[1])
        out.append(T.Data(f"MNIST-1D perm {k}", base.kind, base.x_train[:, perm], base.y_train,
                          base.x_val[:, perm], base.y_val, base.x_test[:, perm], base.y_test))
    return out


# ----------------------------------------------------------------------------- training


class Sequential:
    """Jitted, vmapped training of R runs of one method through a sequence of tasks.

    ``start(params, old_state, lrs, regs)``
    makes each run's optimizer state for the next task (``old_state`` None for the first);
    ``train(params, state, seeds, task, lrs, regs, x, y)`` trains every run for one task.
    Every task has the same training-set size and shapes, so each compiles once per R.
    """

    def __init__(self, model: T.Model, kind: str, n_train: int, epochs: int):
        self.model, self.kind, self.n = model, kind, n_train
        self.spe = n_train // BATCH
        self.total = self.spe * epochs
        self.epochs = epochs
        self.is_ivon = kind != "adamw"
        self.loss_fn = T.make_loss(model, "classification")
        self._evaluators: dict[int, object] = {}
        self.start_first = jax.jit(jax.vmap(functools.partial(self._start, None)))
        self.start_next = jax.jit(jax.vmap(self._start_from))
        self.train = jax.jit(jax.vmap(self._train, in_axes=(0, 0, 0, None, 0, 0, None, None)),
                             donate_argnums=(0, 1))

    def evaluator(self, n_samples: int):
        """Jitted, vmapped: per run and predictive, (accuracy %, NLL) on (x, y)."""
        if n_samples in self._evaluators:
            return self._evaluators[n_samples]

        def one(params, state, x, y, key):
            preds = T.predictive(self.model, "classification", params, state, x, key,
                                 n_samples, self.is_ivon)
            return {which: (100 * metrics.accuracy(p, y), metrics.nll(p, y))
                    for which, p in preds.items()}

        self._evaluators[n_samples] = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None, 0)))
        return self._evaluators[n_samples]

    def optimizer(self, lr, reg) -> optax.GradientTransformation:
        warm = max(1, int(WARMUP * self.total))
        sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, warm, self.total)
        lr_t = lambda c: lr * sched(c)
        if self.kind == "adamw":
            return optax.adamw(lr_t, weight_decay=reg)
        prior_mean = "init" if self.kind == "init" else "zero"
        return ivon_jax.ivon(lr_t, ess=self.n, total_steps=self.total, prior_mean=prior_mean)

    def _start(self, old_state, params, lr, reg):
        state = self.optimizer(lr, reg).init(params)
        if self.kind != "vcl":
            return state
        if old_state is None:
            # Task 0: the default prior N(0, 1/(λδ)) written out as a per-element prior, so
            # that every task's state has the same structure (one compilation).
            zeros = jax.tree.map(jnp.zeros_like, params)
            delta = jax.tree.map(lambda p: jnp.full_like(p, WD_WITH_STEPS), params)
            return ivon_jax.set_prior(state, mean=zeros, precision=delta)
        # The previous task's posterior N(m, 1/(λ(h + δ))) becomes the prior.
        return ivon_jax.set_prior(
            state, **ivon_jax.posterior_as_prior(params, old_state, ess=self.n))

    def _start_from(self, params, old_state, lr, reg):
        return self._start(old_state, params, lr, reg)

    def _train(self, params, state, seed, task, lr, reg, x_tr, y_tr):
        opt = self.optimizer(lr, reg)
        step_fn = T.train_step(opt, self.loss_fn, self.is_ivon)
        k_data, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1 + task))

        def epoch(carry, e):
            perm = jax.random.permutation(jax.random.fold_in(k_data, e), self.n)
            batches = perm[: self.spe * BATCH].reshape(self.spe, BATCH)

            def step(carry, t_idx):
                t, idx = t_idx
                p, s, _ = step_fn(*carry, jax.random.fold_in(k_noise, t), x_tr[idx], y_tr[idx])
                return (p, s), None

            carry, _ = jax.lax.scan(step, carry, (e * self.spe + jnp.arange(self.spe), batches))
            return carry, None

        (params, state), _ = jax.lax.scan(epoch, (params, state), jnp.arange(self.epochs))
        return params, state


@functools.cache
def _init_one(model: T.Model):
    return jax.jit(lambda seed: model.init(jax.random.key(seed)))


def init_runs(model: T.Model, seeds) -> dict:
    """The runs' initial weights, stacked along a leading axis (one compilation for all R)."""
    params = [_init_one(model)(s) for s in seeds]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)


def check_prior(params, old_state, new_state, n_old: int, n_new: int, task: int) -> str:
    """What set_prior left in run 0's state, against the previous task's posterior."""
    first = lambda tree: jax.tree.map(lambda a: np.asarray(a[0]), tree)
    (old,) = ivon_jax.find_ivon_states(first(old_state))
    (new,) = ivon_jax.find_ivon_states(first(new_state))
    p = first(params)
    old_delta = jax.tree.leaves(old.prior_precision)
    want = [n_old * (h + d) / n_new for h, d in zip(jax.tree.leaves(old.hess), old_delta,
                                                     strict=True)]
    got = jax.tree.leaves(new.prior_precision)
    mean_err = max(float(np.max(np.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(new.prior_mean), jax.tree.leaves(p),
                                   strict=True))
    prec_err = max(float(np.max(np.abs(a - b) / b)) for a, b in zip(got, want, strict=True))
    med = lambda leaves: float(np.median(np.concatenate([np.ravel(x) for x in leaves])))
    summary = ivon_jax.state_summary(old)
    line = (f"task {task}: prior mean = previous weights (max |m0 - m| {mean_err:.1e}); prior "
            f"precision δ' = λ(h + δ)/λ' (max rel. error {prec_err:.1e}); median δ' "
            f"{med(got):.4g} = median previous h {med(jax.tree.leaves(old.hess)):.4g} + "
            f"previous δ (median {med(old_delta):.4g}); of the previous h, h₀β₂ᵀ = "
            f"{float(summary['h0_weight']):.3f} is what is left of h₀ = 1 (its mean share of h: "
            f"{float(summary['h_decay_share']):.2f}); the new h starts at "
            f"{med(jax.tree.leaves(new.hess)):.4g}")
    if mean_err > 0 or prec_err > 1e-5:
        raise SystemExit("set_prior did not install the previous posterior:\n" + line)
    return line


# ----------------------------------------------------------------------------- one method


def run_sequence(seq: Sequential, data: list[T.Data], seeds, lrs, regs, split: str,
                 n_samples: int, bar, check: list | None = None) -> dict:
    """Trains R runs through all tasks; returns {(t, j, predictive): [scores per run]}."""
    seeds = jnp.asarray(seeds)
    lrs, regs = jnp.asarray(lrs, jnp.float32), jnp.asarray(regs, jnp.float32)
    r = len(seeds)
    pred = seq.evaluator(n_samples)
    params, state = init_runs(seq.model, seeds), None
    out: dict = {}
    for t, d in enumerate(data):
        if state is None:
            state = seq.start_first(params, lrs, regs)
        else:
            new = seq.start_next(params, state, lrs, regs)
            if check is not None and seq.kind == "vcl":
                check.append(check_prior(params, state, new, data[t - 1].n_train, d.n_train, t))
            state = new
        params, state = seq.train(params, state, seeds, t, lrs, regs,
                                  jnp.asarray(d.x_train), jnp.asarray(d.y_train))
        for j in range(t + 1):
            x, y = (data[j].x_val, data[j].y_val) if split == "val" else (
                data[j].x_test, data[j].y_test)
            keys = jax.random.split(jax.random.fold_in(jax.random.key(7), 10 * t + j), r)
            scores = pred(params, state, jnp.asarray(x), jnp.asarray(y), keys)
            for which, (acc, nll) in scores.items():
                acc, nll = np.asarray(acc), np.asarray(nll)
                out[(t, j, which)] = [{"acc": float(acc[i]), "nll": float(nll[i])}
                                      for i in range(r)]
        bar.update(1)
    return out


# ----------------------------------------------------------------------------- report


def avg_last(res: dict, n_tasks: int, which: str, metric: str) -> np.ndarray:
    """Per run: the mean over all tasks of `metric` after the last task."""
    last = n_tasks - 1
    return np.mean([[s[metric] for s in res[(last, j, which)]] for j in range(n_tasks)], 0)


def forgetting(res: dict, n_tasks: int, which: str) -> np.ndarray:
    last = n_tasks - 1
    return np.mean([[a["acc"] - b["acc"] for a, b in zip(res[(j, j, which)], res[(last, j, which)],
                                                       strict=True)]
                    for j in range(last)], 0)


def rows_of(final: dict) -> list[tuple[str, str, str]]:
    """(label, method, predictive) of the reported rows."""
    out = []
    for m in final:
        if KIND[m] == "adamw":
            out.append((m, m, "mean"))
        else:
            out += [(m, m, "mc"), (f"{m} @mean", m, "mean")]
    return out


def markdown(args, n_tune: int, data, chosen, tune_val, final, checks, setup_line) -> str:
    n = len(data)
    seeds_text = f"{n_tune} tuning seed" + ("s" if n_tune > 1 else "")
    quick = " --quick" if args.quick else ""
    intro = (
        f"Test metrics after the last task, mean ± std (sample std) over {args.seeds} seeds "
        "(1, 2, 3, ...); configurations chosen on the validation accuracy averaged over all "
        f"tasks after the last task ({seeds_text}). IVON rows without `@mean`: the MC "
        f"predictive ({args.samples} samples). Forgetting: accuracy on task j right after "
        "training on it minus after the last task, averaged over j < last (percentage points; "
        f"lower is better). Written by `python benchmarks/continual.py{quick}`.")
    out = ["# Continual learning in miniature: permuted MNIST-1D", "",
           setup_line, "", intro, "",
           "| method | chosen (val acc %) | avg test acc (%) | avg test NLL | forgetting (pp) "
           "| acc per seed |",
           "|---|---|---:|---:|---:|---|"]
    for label, m, which in rows_of(final):
        acc = avg_last(final[m], n, which, "acc")
        nll = avg_last(final[m], n, which, "nll")
        fg = forgetting(final[m], n, which)
        lr, wd = chosen[m]
        cfg = f"lr {lr:g}" + (f", wd {wd:g}" if KIND[m] == "adamw" else "")
        out.append(f"| {label} | {cfg} ({tune_val[m][(lr, wd)]:.1f}) | {T.mean_std(acc, 2)} | "
                   f"{T.mean_std(nll, 3)} | {T.mean_std(fg, 2)} | "
                   + ", ".join(f"{a:.1f}" for a in acc) + " |")
    out += ["", "## Accuracy matrices (test accuracy %, rows: after training task t; "
            "columns: task j)", ""]
    for label, m, which in rows_of(final):
        out += [f"**{label}**", "",
                "| after task | " + " | ".join(f"task {j}" for j in range(n)) + " | average |",
                "|---|" + "---:|" * (n + 1)]
        for t in range(n):
            cells = [T.mean_std([s["acc"] for s in final[m][(t, j, which)]], 1)
                     if j <= t else "" for j in range(n)]
            seen = np.mean([[s["acc"] for s in final[m][(t, j, which)]] for j in range(t + 1)],
                           0)
            out.append(f"| {t} | " + " | ".join(cells) + f" | {T.mean_std(seen, 1)} |")
        out.append("")
    out += ["## Tuning (validation accuracy %, averaged over all tasks after the last task and "
            "the tuning seeds)", "",
            "| method | " + " | ".join(f"config {i + 1}" for i in range(len(GRIDS["AdamW"])))
            + " |", "|---|" + "---|" * len(GRIDS["AdamW"])]
    for m, vals in tune_val.items():
        cells = [(f"lr {lr:g}" + (f", wd {wd:g}" if KIND[m] == "adamw" else "") + f": {v:.1f}")
                 for (lr, wd), v in vals.items()]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out += ["", "## The prior installed by set_prior (first final run)", ""]
    out += [f"- {c}" for c in checks]
    return "\n".join(out) + "\n"


def figure(final: dict, n: int, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sd = lambda a: a.std(1, ddof=1) if a.shape[1] > 1 else np.zeros(len(a))  # sample std
    colors = {"AdamW": "C0", "IVON, prior at task start": "C1", "IVON + posterior prior": "C2"}
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.7), sharey=True)
    for label, m, which in rows_of(final):
        if which == "mean" and KIND[m] != "adamw":
            continue  # the figure shows IVON's MC predictive only
        res = final[m]
        for j in range(n):
            ts = np.arange(j, n)
            acc = np.array([[s["acc"] for s in res[(t, j, which)]] for t in ts])
            axes[j].errorbar(ts, acc.mean(1), yerr=sd(acc), color=colors[m], marker="o",
                             capsize=3, label=label)
        avg = np.array([np.mean([[s["acc"] for s in res[(t, j, which)]] for j in range(t + 1)],
                                0) for t in range(n)])
        axes[n].errorbar(np.arange(n), avg.mean(1), yerr=sd(avg), color=colors[m],
                         marker="o", capsize=3, label=label)
    for j in range(n):
        axes[j].set_title(f"test accuracy on task {j}", fontsize=10)
    axes[n].set_title("average over tasks seen", fontsize=10)
    axes[0].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.set_xlabel("after training task")
        ax.set_xticks(range(n))
        ax.set_xlim(-0.3, n - 0.7)
        ax.grid(alpha=0.3)
    handles, labels = axes[n].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9,
               frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def output_folder(quick: bool, out: pathlib.Path | None) -> pathlib.Path:
    """``out`` if given; else a new temporary folder for a --quick run (never the committed
    results), ``benchmarks/results`` for the full run."""
    if out is not None:
        return out
    return pathlib.Path(tempfile.mkdtemp(prefix="continual_")) if quick else RESULTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=3, help="number of tasks (≥ 3)")
    ap.add_argument("--epochs", type=int, default=25, help="epochs per task")
    ap.add_argument("--seeds", type=int, default=3, help="final runs per method")
    ap.add_argument("--samples", type=int, default=32, help="MC samples for IVON's predictive")
    ap.add_argument("--quick", action="store_true", help="a tiny version for CI")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --quick run: a new temporary folder")
    args = ap.parse_args()
    args.out = output_folder(args.quick, args.out)
    if args.tasks < 3:
        raise SystemExit("--tasks must be at least 3")
    sizes = (40, 256, 256, 10)
    grids, tune_seeds = dict(GRIDS), TUNE_SEEDS
    if args.quick:  # 2 runs in every vmapped batch: nothing compiles twice
        args.epochs, args.seeds, args.samples, tune_seeds = 2, 2, 4, TUNE_SEEDS[:1]
        sizes = (40, 32, 32, 10)
        grids = {m: g[:2] for m, g in grids.items()}
    model = T.mlp(sizes)
    data = permuted_tasks(args.tasks)
    n_tasks = len(data)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["phase", "method", "lr", "wd", "seed", "after_task", "eval_task", "split",
              "predictive", "acc", "nll"]
    chosen, tune_val, final, checks = {}, {}, {}, []
    stages = len(grids) * 2 * n_tasks
    with open(args.out / "continual.csv", "w", newline="") as f, \
            tqdm(total=stages, desc="continual", unit="task") as bar:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()

        def write(phase, m, cfgs, seeds, res, split):
            for (t, j, which), scores in res.items():
                for (lr, wd), s, sc in zip(cfgs, seeds, scores, strict=True):
                    writer.writerow({"phase": phase, "method": m, "lr": lr, "wd": wd, "seed": s,
                                     "after_task": t, "eval_task": j, "split": split,
                                     "predictive": which, "acc": f"{sc['acc']:.6g}",
                                     "nll": f"{sc['nll']:.6g}"})
            f.flush()

        for m, grid in grids.items():
            seq = Sequential(model, KIND[m], data[0].n_train, args.epochs)
            which = "mean" if KIND[m] == "adamw" else "mc"
            # ---- tuning: every configuration x every tuning seed, validation splits
            cfgs = [c for c in grid for _ in tune_seeds]
            tseeds = [s for _ in grid for s in tune_seeds]
            t0 = time.perf_counter()
            res = run_sequence(seq, data, tseeds, [c[0] for c in cfgs], [c[1] for c in cfgs],
                               "val", args.samples, bar)
            write("tune", m, cfgs, tseeds, res, "val")
            acc = avg_last(res, n_tasks, which, "acc")
            nll = avg_last(res, n_tasks, which, "nll")
            per_cfg = {c: (float(np.mean([a for a, cc in zip(acc, cfgs, strict=True) if cc == c])),
                           float(np.mean([v if np.isfinite(v) else np.inf
                                          for v, cc in zip(nll, cfgs, strict=True) if cc == c])))
                       for c in grid}
            best = max(grid, key=lambda c: (per_cfg[c][0], -per_cfg[c][1]))
            chosen[m], tune_val[m] = best, {c: v[0] for c, v in per_cfg.items()}
            bar.set_postfix_str(f"{m}: lr {best[0]:g} ({time.perf_counter() - t0:.0f}s)")
            # ---- final runs at the chosen configuration, test splits
            fseeds = list(range(1, args.seeds + 1))
            res = run_sequence(seq, data, fseeds, [best[0]] * args.seeds,
                               [best[1]] * args.seeds, "test", args.samples, bar,
                               check=checks if KIND[m] == "vcl" else None)
            write("final", m, [best] * args.seeds, fseeds, res, "test")
            final[m] = res
    wall = time.perf_counter() - start
    setup_line = (f"{n_tasks} tasks (MNIST-1D, then {n_tasks - 1} fixed permutations of its "
                  f"40 input positions), {data[0].n_train} train / {len(data[0].y_val)} "
                  f"validation / {len(data[0].y_test)} test each; {model.name}, one head; "
                  f"{args.epochs} epochs of batch {BATCH} per task, warm-up + cosine per task; "
                  f"IVON ess = {data[0].n_train}, total_steps = "
                  f"{(data[0].n_train // BATCH) * args.epochs} per task.")
    md = markdown(args, len(tune_seeds), data, chosen, tune_val, final, checks, setup_line)
    md += f"\nTotal wall time: {wall:.0f} s.\n"
    (args.out / "continual.md").write_text(md)
    figure(final, n_tasks, args.out / "continual.png",
           f"Permuted MNIST-1D, {model.name}, {args.epochs} epochs per task "
           f"(mean ± sample std over {args.seeds} seeds; IVON: MC predictive)")
    print("\n" + md)
    print(f"wrote {args.out / 'continual.csv'}, continual.md and continual.png")


if __name__ == "__main__":
    main()
