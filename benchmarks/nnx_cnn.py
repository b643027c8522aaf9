"""A Flax NNX CNN with BatchNorm and Dropout, trained with AdamW and with IVON's default path.

The model is the Flax tutorial's kind of CNN — (conv -> BatchNorm -> ReLU -> average pool)
twice, then dense -> ReLU -> Dropout -> dense — with 2-D convolutions on scikit-learn's digits
(8x8x1 images) and 1-D convolutions on MNIST-1D (40x1 sequences). It is trained the way a
Flax NNX user would: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.value_and_grad`` for
AdamW, ``ivon_jax.flax.nnx.value_and_grad`` + ``optimizer.update(model, grads, hess=hess)``
for IVON, the model in ``train()`` mode (Dropout on, BatchNorm on batch statistics) while
training and in ``eval()`` mode (Dropout off, BatchNorm on its running averages) for every
prediction.

Protocol (the same for both optimizers):

* Splits from ``tasks.py`` (train / validation / test); test data is used once, after every
  choice has been made.
* Tuning budget: 6 configurations x 2 tuning seeds per optimizer; the configuration with the
  lowest mean **validation NLL** is chosen (IVON: the NLL of its Monte-Carlo predictive, 32
  samples).

  - AdamW: ``optax.adamw(schedule(lr), weight_decay=wd)``, lr in {1e-3, 3e-3, 1e-2} x wd in
    {1e-2, 3e-1}.
  - IVON: the path a user porting from AdamW gets, :func:`ivon_default`:
    ``ivon_jax.ivon(schedule(lr), ess=N_train, total_steps=T)`` and nothing else
    (T: the run's number of optimizer steps), tuned on lr in {0.25, 0.5, 1, 2, 4, 8} (a
    first run with {0.05, ..., 2} chose its top value, 2, on both tasks' validation splits).
    ``--ivon-kwargs '{"hess_init": 0.2}'`` adds keyword arguments to that call (the result
    files then carry a suffix).
* Then 3 fresh seeds at the chosen configuration; test accuracy, NLL and ECE
  (``ivon_jax.metrics``) of AdamW, of IVON at its mean and of IVON's MC predictive (32
  samples), mean ± sample std over the seeds, and ``ivon_jax.state_summary`` of each final
  IVON state.
* Digits: 60 epochs, batch 32; MNIST-1D: 30 epochs (not 60, for CPU time), batch 100.
* The same epochs, batch size and schedule (linear warm-up over 5 % of the steps, then cosine
  to zero) for both; one MC sample per IVON step.

Each run is one jitted ``lax.scan`` over its steps (the NNX objects are split into a state
carried by the scan and merged back inside each step); the hyper-parameters and the seed are
traced, so every run of one optimizer on one task reuses one compilation. Runs are not
vmapped: XLA:CPU runs a vmapped convolution (a grouped convolution) slowly.

Writes ``benchmarks/results/nnx_cnn.csv`` (every tuning and test run) and ``nnx_cnn.md`` (the
tables). ``--quick`` (1 epoch, 2 configurations, 1 seed, 4 MC samples) writes into ``--out``
or a fresh temporary folder, never into ``benchmarks/results``.

Usage::

    python benchmarks/nnx_cnn.py                       # both tasks
    python benchmarks/nnx_cnn.py --task digits --ivon-kwargs '{"hess_init": 0.2}'
    python benchmarks/nnx_cnn.py --quick --out /tmp/x  # a tiny version (CI)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import tasks as T  # noqa: E402

import ivon_jax  # noqa: E402
from ivon_jax import metrics  # noqa: E402
from ivon_jax.flax import nnx as ivon_nnx  # noqa: E402

RESULTS = pathlib.Path(__file__).with_name("results")
TUNE_SEEDS = (1000, 1001)
TEST_SEEDS = (1, 2, 3)
WARMUP = 0.05
ADAMW_GRID = [(lr, wd) for lr in (1e-3, 3e-3, 1e-2) for wd in (1e-2, 3e-1)]
IVON_GRID = [(lr, None) for lr in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
SUMMARY_KEYS = ("h_p50", "sigma_p50", "frac_h_learned", "sigma_prior_ratio_p50")


def ivon_default(lr_schedule: optax.Schedule, n_train: int, total_steps: int,
                 **extra: Any) -> optax.GradientTransformationExtraArgs:
    """IVON as a user porting from AdamW builds it: ess and the run's length, nothing else.

    ``extra`` (from ``--ivon-kwargs``) is added to the call, for comparisons.
    """
    return ivon_jax.ivon(lr_schedule, ess=float(n_train), total_steps=total_steps, **extra)


# ----------------------------------------------------------------------------- model


class CNN(nnx.Module):
    """(conv -> BatchNorm -> ReLU -> 2x average pool) x 2 -> dense -> ReLU -> Dropout -> dense.

    ``ndim`` = 2 for images shaped (H, W, 1) (3x3 kernels), 1 for sequences shaped (L, 1)
    (5-tap kernels); 'SAME' padding, so the flattened size is ``spatial / 4**ndim * 32``.
    """

    def __init__(self, ndim: int, spatial: int, *, rngs: nnx.Rngs, width: int = 16,
                 hidden: int = 64, dropout: float = 0.2, classes: int = 10):
        k = (3, 3) if ndim == 2 else (5,)
        self.ndim = ndim
        self.conv1 = nnx.Conv(1, width, k, padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(width, rngs=rngs)
        self.conv2 = nnx.Conv(width, 2 * width, k, padding="SAME", rngs=rngs)
        self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
        flat = (spatial // 4) ** ndim * 2 * width
        self.dense1 = nnx.Linear(flat, hidden, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        window = (2,) * self.ndim
        x = nnx.avg_pool(nnx.relu(self.bn1(self.conv1(x))), window, strides=window)
        x = nnx.avg_pool(nnx.relu(self.bn2(self.conv2(x))), window, strides=window)
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(nnx.relu(self.dense1(x)))
        return self.dense2(x)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    data: T.Data  # inputs already shaped for the model
    ndim: int
    spatial: int
    epochs: int
    batch: int

    def model(self, key: jax.Array) -> CNN:
        k_params, k_dropout = jax.random.split(key)
        return CNN(self.ndim, self.spatial, rngs=nnx.Rngs(params=k_params, dropout=k_dropout))

    @property
    def total_steps(self) -> int:
        return (self.data.n_train // self.batch) * self.epochs


def _reshaped(d: T.Data, shape: tuple[int, ...]) -> T.Data:
    r = lambda a: a.reshape((len(a), *shape))
    return dataclasses.replace(d, x_train=r(d.x_train), x_val=r(d.x_val), x_test=r(d.x_test))


def make_tasks(which: str, quick: bool) -> list[Task]:
    out = []
    if which in ("digits", "both"):
        out.append(Task("digits", _reshaped(T.digits(), (8, 8, 1)), 2, 8, 1 if quick else 60,
                        32))
    if which in ("mnist1d", "both"):
        # 30 epochs, not 60: a run of 1,920 steps takes ~25 s on 2 shared CPU cores, and 60
        # runs must fit in ~12 minutes.
        out.append(Task("mnist1d", _reshaped(T.mnist1d(), (40, 1)), 1, 40, 1 if quick else 30,
                        100))
    return out


# ----------------------------------------------------------------------------- training


def cross_entropy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_run(task: Task, is_ivon: bool, ivon_kwargs: dict[str, Any]) -> Callable:
    """A jitted ``(seed, lr, wd) -> (model_state, opt_state)``: one whole training run.

    The seed gives the initial weights and dropout stream, the data order and IVON's weight
    noise; ``wd`` is ignored by IVON (not tuned: the default path).
    """
    d = task.data
    x_tr, y_tr = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    n, batch, total = d.n_train, task.batch, task.total_steps
    spe = n // batch  # drop the last partial batch: fixed shapes
    warm = max(1, int(WARMUP * total))
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, warm, total)
    ivon_vg = ivon_nnx.value_and_grad(cross_entropy)

    def run(seed: jax.Array, lr: jax.Array, wd: jax.Array):
        k_model, k_data, k_noise = jax.random.split(jax.random.key(seed), 3)
        model = task.model(k_model)
        model.train()
        schedule = lambda c: lr * unit(c)
        tx = (ivon_default(schedule, n, total, **ivon_kwargs) if is_ivon
              else optax.adamw(schedule, weight_decay=wd))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))

        def step(state, t_idx):
            t, idx = t_idx
            model, optimizer = nnx.merge(graphdef, state)
            x, y = x_tr[idx], y_tr[idx]
            if is_ivon:
                loss, grads, hess = ivon_vg(jax.random.fold_in(k_noise, t), model, optimizer,
                                            x, y)
                optimizer.update(model, grads, hess=hess)
            else:
                loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
                optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        def epoch(state, e):
            perm = jax.random.permutation(jax.random.fold_in(k_data, e), n)
            idx = perm[: spe * batch].reshape(spe, batch)
            state, losses = jax.lax.scan(step, state, (e * spe + jnp.arange(spe), idx))
            return state, losses.mean()

        state, _ = jax.lax.scan(epoch, state, jnp.arange(task.epochs))
        model, optimizer = nnx.merge(graphdef, state)
        return nnx.state(model), optimizer.opt_state

    return jax.jit(run)


def make_predict(task: Task, num_samples: int) -> Callable:
    """A jitted ``(model_state, opt_state, x, key) -> (probs at the weights, MC probs)``,
    the model in eval mode (Dropout off, BatchNorm on running averages)."""
    graphdef = nnx.graphdef(task.model(jax.random.key(0)))

    def predict(model_state, opt_state, x, key, with_mc: bool):
        model = nnx.merge(graphdef, model_state)
        model.eval()
        mean = jax.nn.softmax(model(x))
        if not with_mc:
            return mean, None
        mc = ivon_nnx.predict_proba(key, model, opt_state, x, num_samples=num_samples)
        return mean, mc

    return jax.jit(predict, static_argnums=4)


def score(probs: jax.Array, y: np.ndarray) -> dict[str, float]:
    y = jnp.asarray(y)
    return {"acc": 100 * float(metrics.accuracy(probs, y)), "nll": float(metrics.nll(probs, y)),
            "ece": float(metrics.ece(probs, y))}


# ----------------------------------------------------------------------------- protocol

FIELDS = ["task", "data", "epochs", "batch", "steps", "phase", "method", "lr", "wd", "seed",
          "split", "acc", "nll", "ece", *SUMMARY_KEYS, "ivon_kwargs", "seconds"]


def run_task(task: Task, quick: bool, ivon_kwargs: dict[str, Any], writer) -> dict:
    d = task.data
    num_samples = 4 if quick else 32
    tune_seeds = TUNE_SEEDS[:1] if quick else TUNE_SEEDS
    test_seeds = TEST_SEEDS[:1] if quick else TEST_SEEDS
    predict = make_predict(task, num_samples)
    base = dict(task=task.name, data=d.name, epochs=task.epochs, batch=task.batch,
                steps=task.total_steps, ivon_kwargs=json.dumps(ivon_kwargs, sort_keys=True))
    out: dict[str, Any] = dict(task=task, chosen={}, val={}, rows={}, summaries=[], seconds={})
    for mname, grid, is_ivon in (("AdamW", ADAMW_GRID, False), ("IVON", IVON_GRID, True)):
        grid = grid[:2] if quick else grid
        run = make_run(task, is_ivon, ivon_kwargs if is_ivon else {})
        t_method = time.perf_counter()

        def train(seed, lr, wd):
            t0 = time.perf_counter()
            ms, os_ = run(jnp.asarray(seed, jnp.uint32), jnp.asarray(lr, jnp.float32),
                          jnp.asarray(0.0 if wd is None else wd, jnp.float32))
            jax.block_until_ready(os_)
            return ms, os_, time.perf_counter() - t0

        # ---- tuning on the validation split
        per_cfg: dict[tuple, list[float]] = {}
        for r, ((lr, wd), seed) in enumerate((c, s) for c in grid for s in tune_seeds):
            ms, os_, secs = train(seed, lr, wd)
            mean, mc = predict(ms, os_, d.x_val, jax.random.fold_in(jax.random.key(7), r),
                               is_ivon)
            sc = score(mc if is_ivon else mean, d.y_val)
            nll = sc["nll"] if np.isfinite(sc["nll"]) else np.inf
            per_cfg.setdefault((lr, wd), []).append(nll)
            writer.writerow({**base, "phase": "tune", "method": mname, "lr": lr,
                             "wd": "" if wd is None else wd, "seed": seed, "split": "val",
                             **{k: f"{v:.6g}" for k, v in sc.items()}, "seconds": f"{secs:.1f}"})
        best = min(per_cfg, key=lambda c: np.mean(per_cfg[c]))
        out["chosen"][mname] = best
        out["val"][mname] = {c: float(np.mean(v)) for c, v in per_cfg.items()}

        # ---- fresh seeds at the chosen configuration, scored once on the test split
        for r, seed in enumerate(test_seeds):
            ms, os_, secs = train(seed, *best)
            mean, mc = predict(ms, os_, d.x_test, jax.random.fold_in(jax.random.key(8), r),
                               is_ivon)
            summary = {}
            if is_ivon:
                full = ivon_jax.state_summary(os_)
                summary = {k: float(full[k]) for k in SUMMARY_KEYS if k in full}
                out["summaries"].append(summary)
            variants = ([("IVON@mean", mean), (f"IVON ({num_samples} samples)", mc)]
                        if is_ivon else [("AdamW", mean)])
            for label, probs in variants:
                sc = score(probs, d.y_test)
                out["rows"].setdefault(label, []).append(sc)
                writer.writerow({**base, "phase": "test", "method": label, "lr": best[0],
                                 "wd": "" if best[1] is None else best[1], "seed": seed,
                                 "split": "test", **{k: f"{v:.6g}" for k, v in sc.items()},
                                 **{k: f"{v:.6g}" for k, v in summary.items()},
                                 "seconds": f"{secs:.1f}"})
        out["seconds"][mname] = time.perf_counter() - t_method
        print(f"{task.name} {mname}: chosen {best}, {out['seconds'][mname]:.0f} s", flush=True)
    return out


def _cfg(mname: str, c: tuple) -> str:
    return f"lr {c[0]:g}" if c[1] is None else f"lr {c[0]:g}, wd {c[1]:g}"


def markdown(results: list[dict], ivon_kwargs: dict[str, Any], quick: bool) -> str:
    call = "ivon_jax.ivon(schedule(lr), ess=N_train, total_steps=T" + "".join(
        f", {k}={v!r}" for k, v in ivon_kwargs.items()) + ")"
    out = ["# NNX CNN with BatchNorm and Dropout: AdamW vs IVON's default path", "",
           "Written by `python benchmarks/nnx_cnn.py`" + (" --quick (NOT evidence)" if quick
                                                          else "") + ". "
           f"IVON: `{call}`; AdamW: `optax.adamw(schedule(lr), weight_decay=wd)`. "
           "Configurations chosen on validation NLL (IVON: its MC predictive), 6 per optimizer "
           "x 2 tuning seeds; test rows are mean ± sample std over "
           f"{len(results[0]['rows']['AdamW'])} fresh seeds. BatchNorm in eval mode uses its "
           "running averages; Dropout is off at test time.", ""]
    for res in results:
        t: Task = res["task"]
        d = t.data
        chosen = "; ".join(f"{m} {_cfg(m, c)}" for m, c in res["chosen"].items())
        out += [f"## {t.name}: {d.name}, {t.ndim}-D CNN",
                f"{d.n_train} train / {len(d.y_val)} validation / {len(d.y_test)} test; "
                f"{t.epochs} epochs, batch {t.batch} ({t.total_steps} steps); "
                f"chosen on validation: {chosen}.", "",
                "| method | runs | test acc (%) | NLL | ECE |", "|---|---:|---:|---:|---:|"]
        for label, rs in res["rows"].items():
            cells = [T.mean_std([r[c] for r in rs], 2 if c == "acc" else 3)
                     for c in ("acc", "nll", "ece")]
            out.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |")
        keys = [k for k in SUMMARY_KEYS if all(k in s for s in res["summaries"])]
        out += ["", "Final IVON state (`ivon_jax.state_summary`), mean ± std over the runs:", "",
                "| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys),
                "| " + " | ".join(T.mean_std([s[k] for s in res["summaries"]], 4)
                                  if abs(np.mean([s[k] for s in res["summaries"]])) >= 1e-3
                                  else f"{np.mean([s[k] for s in res['summaries']]):.3g}"
                                  for k in keys) + " |", ""]
        out += ["Validation NLL per configuration (mean over the tuning seeds):", "",
                "| optimizer | configuration | val NLL |", "|---|---|---:|"]
        for m, vals in res["val"].items():
            for c, v in vals.items():
                mark = " **(chosen)**" if c == res["chosen"][m] else ""
                out.append(f"| {m} | {_cfg(m, c)}{mark} | {v:.4f} |")
        secs = ", ".join(f"{m} {s:.0f} s" for m, s in res["seconds"].items())
        out += ["", f"Wall time: {secs}.", ""]
    return "\n".join(out)


def suffix(ivon_kwargs: dict[str, Any]) -> str:
    """``_key=value_...`` for non-default IVON arguments, safe in a file name."""
    if not ivon_kwargs:
        return ""
    s = "_".join(f"{k}={v}" for k, v in sorted(ivon_kwargs.items()))
    return "_" + re.sub(r"[^A-Za-z0-9.=_-]", "", s)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("digits", "mnist1d", "both"), default="both")
    ap.add_argument("--ivon-kwargs", type=json.loads, default={},
                    help='JSON keyword arguments added to ivon_default, e.g. \'{"b2": 0.999}\'')
    ap.add_argument("--quick", action="store_true",
                    help="1 epoch, 2 configurations, 1 seed (CI); never into benchmarks/results")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    if not isinstance(args.ivon_kwargs, dict):
        raise SystemExit("--ivon-kwargs must be a JSON object")
    out_dir = args.out
    if args.quick:
        if out_dir is None:
            out_dir = pathlib.Path(tempfile.mkdtemp(prefix="nnx_cnn_quick_"))
        elif out_dir.resolve() == RESULTS.resolve():
            raise SystemExit("--quick never writes into benchmarks/results")
    out_dir = RESULTS if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "nnx_cnn" + ("" if args.task == "both" else f"_{args.task}") + suffix(args.ivon_kwargs)
    start = time.perf_counter()
    results = []
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for task in make_tasks(args.task, args.quick):
            results.append(run_task(task, args.quick, args.ivon_kwargs, writer))
            f.flush()
    md = markdown(results, args.ivon_kwargs, args.quick)
    md += f"\nTotal wall time: {time.perf_counter() - start:.0f} s.\n"
    (out_dir / f"{stem}.md").write_text(md)
    print("\n" + md)
    print(f"wrote {out_dir / stem}.csv and {stem}.md")


if __name__ == "__main__":
    main()
