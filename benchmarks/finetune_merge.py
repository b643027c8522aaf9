"""Fine-tune a small pretrained GPT with IVON and AdamW (LoRA adapters and in full), then merge.

Everything runs offline on the Python standard library's sources.

1. **Base model.** ``gpt_pretrain.py``'s NNX GPT is pretrained with AdamW (that script's tuned
   settings and schedule, its data code) on the first ``--corpus-mb`` MiB of the library's
   files in sorted order, and saved with Orbax under ``--ckpt`` (default
   ``benchmarks/results/finetune_merge.base/<config>``); a later run with the same
   configuration loads it instead of pretraining again.
2. **Tasks.** Three 4-way classification tasks with disjoint label sets: *which package does
   this ``--seq``-byte snippet of source come from* (TASKS). The packages sort after the
   pretraining files, so the base model has never read them (checked at start-up). Each
   package's files are concatenated and cut into 1 KiB blocks; block b goes to test if
   b % 5 == 0, to validation if b % 5 == 1, else to training, and snippets are drawn inside
   blocks, so no snippet straddles two splits. Classes are balanced.
3. **Fine-tuning.** A classifier = the GPT's blocks, mean-pooled over positions, and a linear
   head per task. Two modes: ``lora`` trains rank-``--lora-rank`` ``nnx.LoRA`` adapters on
   every block's two MLP layers plus the head, the base is frozen (never perturbed by IVON,
   bit-identical after training: asserted here and tested in tests/test_finetune_merge.py);
   ``full`` trains every parameter. AdamW and IVON (one MC sample per step; GRID says how
   each IVON family sets ess, h₀, β₂, clipping and the prior) get the same steps, batch and
   schedule (10 % warm-up, cosine to 0) and the same tuning budget: GRID's eight
   configurations per method, each run once (seed 0) and scored on the
   validation split by NLL (IVON: of its MC predictive); the best is then run with every seed
   in ``--seeds`` (seed = adapter/head init, data order, IVON's noise). Test accuracy, NLL and
   ECE (15 bins): AdamW at its weights, IVON at its mean and with its MC predictive
   (``--mc-samples`` samples).
4. **Merging.** For each mode, fine-tuning method and seed, the T fine-tuned models (adapters,
   or the whole backbone; each task keeps its own head) are merged from the shared start θ₀:
   task arithmetic, squared-gradient (one extra pass over each task's training set) Hessian
   weights, and — for IVON's models — the Hessians read from IVON's states
   (``ivon_jax.merging``). Each merge is θ₀ + s · Σ_t w_t ⊙ (θ_t − θ₀) with w_t = 1/T (task
   arithmetic) or h_t / Σ_t' h_t' (elementwise, the Hessian methods); every method gets the
   same budget for its one knob, the scale s ∈ MERGE_SCALES, chosen on the mean validation
   accuracy over the tasks (s = 1 is the formula as published, also reported).

Default run: 20 minutes on a 2-core CPU (38 while other jobs shared it), with the base
model loaded from its checkpoint (pretraining it takes about 2 minutes more). ``--quick``
runs a tiny version (about 30 s). Writes
``finetune_merge.csv`` (every fine-tuning run and evaluation), ``finetune_merge.merging.csv``
(every merge and evaluation) and ``finetune_merge.md`` (the tables) to ``--out``
(default ``benchmarks/results/``; a ``--quick`` run without ``--out`` writes to a new temporary
folder, never over the committed results).

    python benchmarks/finetune_merge.py [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import pathlib
import sys
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import gpt_pretrain as gpt
import tasks as T

import ivon_jax
from ivon_jax import merging

RESULTS = gpt.RESULTS

# Disjoint label sets: packages of the standard library (present in Python 3.11 - 3.13).
TASKS = {
    "net": ("email", "http", "urllib", "xml"),
    "tools": ("idlelib", "importlib", "json", "unittest"),
    "runtime": ("logging", "multiprocessing", "re", "tkinter"),
}
BLOCK = 1024  # bytes per split block

# The same budget per method: eight configurations each, chosen per task on validation NLL.
# AdamW: learning rate x weight decay. IVON: three families.
# * "default": the path a user porting from AdamW gets, ivon(lr, ess=N, total_steps=T) and
#   nothing else (β₂ = 1 - 2/T, δ = 1e-3, h₀ = 1, rescaled learning rate).
# * "pilot": the configurations a short pilot on validation data found for this benchmark
#   (ess = N, a large h₀, β₂ = 0.99, δ = 1e-4, clipping at 1e-3, rescaled learning rate).
# * "recipe": the published IVON-LoRA regime (Cong et al. 2024, arXiv 2411.04421): ess far
#   above the training-set size, a small h₀, no learning-rate rescaling, element-wise
#   clipping of the preconditioned step at 1e-3, δ = 1e-4.
# Full fine-tuning anchors IVON's prior at the pretrained weights (prior_mean="init"), as the
# paper's guide advises for fine-tuning; the LoRA adapters keep the prior at zero (their
# start).
_PILOT = {"family": "pilot", "wd": 1e-4, "clip": 1e-3, "b2": 0.99}
_RECIPE = {"family": "recipe", "hess_init": 1e-3, "wd": 1e-4, "clip": 1e-3}
GRID = {
    "lora": {
        "AdamW": [{"lr": lr, "wd": wd} for lr in (1e-3, 3e-3, 1e-2, 3e-2) for wd in (1e-2, 1e-1)],
        "IVON": [
            {"family": "default", "lr": 0.3},
            {"family": "default", "lr": 1.0},
            *({**_PILOT, "lr": lr, "hess_init": h0} for lr, h0 in ((0.3, 10.0), (1.0, 10.0),
                                                                   (0.3, 100.0))),
            *({**_RECIPE, "lr": lr, "ess_factor": f} for f, lr in ((1e2, 0.03), (1e4, 0.03),
                                                                   (1e4, 0.3))),
        ],
    },
    "full": {
        "AdamW": [{"lr": lr, "wd": wd} for lr in (3e-5, 1e-4, 3e-4, 1e-3) for wd in (1e-2, 1e-1)],
        "IVON": [
            *({"family": "default", "lr": lr, "prior": "init"} for lr in (3e-3, 1e-2)),
            *({**_PILOT, "lr": lr, "hess_init": h0, "prior": "init"}
              for lr, h0 in ((3e-3, 100.0), (1e-2, 100.0), (3e-3, 300.0))),
            *({**_RECIPE, "lr": lr, "ess_factor": f, "prior": "init"}
              for f, lr in ((1e2, 0.03), (1e4, 0.03), (1e4, 0.3))),
        ],
    },
}
# Settings that select code, not values: they are static arguments of the jitted run.
STATIC_KEYS = ("family", "prior")
ADAMW_FIXED = {"b1": 0.9, "b2": 0.999}
SQ_GRAD_DELTA = 1e-4  # the prior precision of the squared-gradient merging baseline
PRUNE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)
MERGE_SCALES = (1.0, 1.5, 2.0, 3.0)
MODES = ("lora", "full")
METHODS = ("AdamW", "IVON")


# ----------------------------------------------------------------------------- data
def package_streams(packages) -> dict[str, bytes]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for pkg in packages:
        files = sorted(
            p for p in (root / pkg).rglob("*.py") if "test" not in p.parts and p.is_file()
        )
        if not files:
            raise SystemExit(f"package {pkg!r} not found under {root}")
        out[pkg] = b"\n".join(p.read_bytes() for p in files)
    return out


def check_unseen(corpus_mb: float) -> None:
    """The task packages sort after every file pretraining reads (``gpt.load_corpus`` takes
    the library's files in sorted order until ``corpus_mb`` MiB)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and p.is_file()
    )
    size, last = 0, files[-1]
    for p in files:
        size += p.stat().st_size
        if size >= corpus_mb * 2**20:
            last = p
            break
    first_task = min(root / pkg for pkgs in TASKS.values() for pkg in pkgs)
    if not last < first_task:
        raise SystemExit(
            f"--corpus-mb {corpus_mb}: pretraining would read {last}, at or after "
            f"the first task package {first_task}"
        )


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    x: dict[str, np.ndarray]  # split -> (n, seq) int32 bytes
    y: dict[str, np.ndarray]  # split -> (n,) int32


def make_task(name: str, seq: int, sizes: dict[str, int], seed: int) -> Task:
    """Balanced snippets of ``seq`` bytes per split; the same for every run (fixed ``seed``)."""
    rng = np.random.default_rng(seed)
    labels = TASKS[name]
    streams = package_streams(labels)
    xs = {s: [] for s in sizes}
    ys = {s: [] for s in sizes}
    for c, pkg in enumerate(labels):
        data = np.frombuffer(streams[pkg], np.uint8)
        starts = np.arange(0, len(data) - BLOCK + 1, BLOCK)
        split_of = {"test": 0, "val": 1}
        for split, n in sizes.items():
            k = split_of.get(split)
            blocks = starts[
                (np.arange(len(starts)) % 5 == k)
                if k is not None
                else (np.arange(len(starts)) % 5 >= 2)
            ]
            per = n // len(labels)
            b = rng.choice(blocks, per)
            off = b + rng.integers(0, BLOCK - seq + 1, per)
            xs[split].append(np.stack([data[o : o + seq] for o in off]))
            ys[split].append(np.full(per, c))
    return Task(
        name,
        labels,
        {s: np.concatenate(v).astype(np.int32) for s, v in xs.items()},
        {s: np.concatenate(v).astype(np.int32) for s, v in ys.items()},
    )


# ----------------------------------------------------------------------------- model
class Classifier(nnx.Module):
    """The pretrained GPT's blocks, mean-pooled over positions, and a linear head."""

    def __init__(self, backbone: gpt.GPT, width: int, classes: int, rngs: nnx.Rngs):
        self.backbone = backbone
        self.head = nnx.Linear(width, classes, kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        g = self.backbone
        x = g.tok(tokens) + g.pos[...][None, : tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in g.blocks:
            x = block(x, mask)
        return self.head(g.ln(x).mean(axis=1))


def add_lora(model: Classifier, rank: int, rngs: nnx.Rngs) -> None:
    """Wrap every block's MLP layers in ``nnx.LoRA`` (adapters are ``nnx.LoRAParam``)."""
    for block in model.backbone.blocks:
        for name in ("fc", "proj"):
            base = getattr(block, name)
            setattr(
                block,
                name,
                nnx.LoRA(base.in_features, rank, base.out_features, base_module=base, rngs=rngs),
            )


HEAD = nnx.PathContains("head")
# What each mode trains besides the head; the rest of the model is frozen.
SHARED = {"lora": nnx.LoRAParam, "full": nnx.Param}


def build(backbone_state, cfg, mode: str, seed: int):
    """``(graphdef, (head, shared), frozen)`` of a fresh classifier: pretrained backbone, head
    (and LoRA adapters) initialised from ``seed``. ``shared`` is what merging combines."""
    rngs = nnx.Rngs(seed)
    backbone = gpt.GPT(
        cfg["layers"], cfg["width"], cfg["heads"], cfg["seq"], jnp.float32, nnx.Rngs(0)
    )
    nnx.update(backbone, backbone_state)
    model = Classifier(backbone, cfg["width"], 4, rngs)
    if mode == "lora":
        add_lora(model, cfg["lora_rank"], rngs)
    graphdef, head, shared, frozen = nnx.split(model, HEAD, SHARED[mode], ...)
    return graphdef, (head, shared), frozen


# ----------------------------------------------------------------------------- pretraining
def pretrained_backbone(args) -> nnx.State:
    import orbax.checkpoint as ocp

    cfg = {
        k: getattr(args, k)
        for k in (
            "layers",
            "width",
            "heads",
            "seq",
            "pretrain_steps",
            "pretrain_batch",
            "corpus_mb",
        )
    }
    name = "_".join(f"{k}{v}" for k, v in cfg.items())
    path = (args.ckpt or args.out / "finetune_merge.base") / name
    init_params, loss_fn = gpt.build_model(
        args.layers, args.width, args.heads, args.seq, jnp.float32
    )
    abstract = jax.eval_shape(lambda: init_params(0))
    ckpt = ocp.StandardCheckpointer()
    if (path / "params").exists():
        params = ckpt.restore((path / "params").resolve(), abstract)
        info = json.loads((path / "info.json").read_text())
        print(
            f"base model: loaded {path} (pretrained {info['seconds']:.0f} s, validation "
            f"loss {info['val_loss']:.3f} nats/byte)"
        )
        return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params)
    start = time.perf_counter()
    train, val, _ = gpt.load_corpus(int(args.corpus_mb * 2**20))
    mesh, sharding = gpt.data_mesh(args.pretrain_batch)
    steps = args.pretrain_steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 20), steps)
    hp = gpt.DEFAULTS["AdamW"]
    step = gpt.make_step("AdamW", loss_fn, schedule, mesh)
    params = init_params(0)
    state = gpt.make_optimizer("AdamW", hp, schedule).init(params)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    for _ in range(steps):
        tokens = jax.device_put(gpt.batches(train, rng, args.pretrain_batch, args.seq), sharding)
        params, state, loss = step(params, state, key, tokens, gpt.as_arrays(hp))
    # Pretraining replicates the parameters over every device; the rest runs on one.
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), params)
    val_rng = np.random.default_rng(12345)
    val_loss = float(
        np.mean([loss_fn(params, gpt.batches(val, val_rng, 32, args.seq)) for _ in range(4)])
    )
    seconds = time.perf_counter() - start
    path.mkdir(parents=True, exist_ok=True)
    ckpt.save((path / "params").resolve(), params, force=True)
    ckpt.wait_until_finished()
    (path / "info.json").write_text(
        json.dumps({**cfg, "seconds": seconds, "val_loss": val_loss}, indent=1)
    )
    print(
        f"base model: pretrained {steps} steps with AdamW in {seconds:.0f} s (last training "
        f"loss {float(loss):.3f}, validation {val_loss:.3f} nats/byte); saved to {path}"
    )
    return params


# ----------------------------------------------------------------------------- fine-tuning
def make_optimizer(method: str, hp: dict, static: dict, schedule, n_train: int, steps: int):
    lr = lambda count: hp["lr"] * schedule(count)
    if method == "AdamW":
        return optax.adamw(lr, weight_decay=hp["wd"], **ADAMW_FIXED)
    prior = static.get("prior", "zero")
    if static["family"] == "default":
        return ivon_jax.ivon(lr, ess=float(n_train), total_steps=steps, prior_mean=prior)
    if static["family"] == "pilot":
        return ivon_jax.ivon(lr, ess=float(n_train), hess_init=hp["hess_init"], b2=hp["b2"],
                             weight_decay=hp["wd"], clip_radius=hp["clip"], prior_mean=prior)
    return ivon_jax.ivon(lr, ess=hp["ess_factor"] * n_train, total_steps=steps,
                         hess_init=hp["hess_init"], weight_decay=hp["wd"],
                         clip_radius=hp["clip"], rescale_lr=False, prior_mean=prior)


def describe(hp: dict) -> str:
    """A configuration in a few words (tables and logs)."""
    if "family" not in hp:
        return f"lr {hp['lr']:g}, wd {hp['wd']:g}"
    anchor = ", prior at init" if hp.get("prior") == "init" else ""
    if hp["family"] == "default":
        return f"default path, lr {hp['lr']:g}{anchor}"
    if hp["family"] == "pilot":
        return f"pilot: h₀ {hp['hess_init']:g}, β₂ {hp['b2']:g}, lr {hp['lr']:g}, clip{anchor}"
    return (f"recipe: ess {hp['ess_factor']:g}·N, h₀ {hp['hess_init']:g}, lr {hp['lr']:g}, "
            f"no rescale, clip {hp['clip']:g}{anchor}")


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class Runner:
    """Jitted fine-tuning and prediction for one (mode, method); hyper-parameters are traced
    arguments, so every configuration, seed and task (same shapes) reuses one compilation."""

    def __init__(self, graphdef, frozen, method: str, steps: int, batch: int, mc: int):
        self.method = method
        apply = lambda p, x: nnx.merge(graphdef, *p, frozen)(x)
        loss_fn = lambda p, x, y: xent(apply(p, x), y)
        schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 10), steps)
        self.apply, self.loss_fn = apply, loss_fn

        def run(trained, seed, hp, x, y, static=()):
            opt = make_optimizer(method, hp, dict(static), schedule, x.shape[0], steps)
            step = T.train_step(opt, loss_fn, method == "IVON")
            k_data, k_noise = jax.random.split(jax.random.key(seed))

            def body(carry, t):
                idx = jax.random.randint(jax.random.fold_in(k_data, t), (batch,), 0, x.shape[0])
                p, s, loss = step(*carry, jax.random.fold_in(k_noise, t), x[idx], y[idx])
                return (p, s), loss

            (p, s), losses = jax.lax.scan(body, (trained, opt.init(trained)), jnp.arange(steps))
            return p, s, losses

        self.run = jax.jit(run, static_argnums=5)
        self.mean = jax.jit(lambda p, x: jax.nn.softmax(apply(p, x)))
        self.mc = jax.jit(
            lambda k, p, s, x: ivon_jax.predictive.predict_proba(
                k, apply, p, s, x, num_samples=mc, chunk_size=min(mc, 8)
            )
        )
        # The squared-gradient Hessian: one pass of per-example gradients over (x, y).
        self.sq_grad = jax.jit(
            lambda p, x, y: merging.squared_gradient_hessian(
                loss_fn,
                p,
                (x, y),
                batch_size=64,
                ess=float(x.shape[0]),
                weight_decay=SQ_GRAD_DELTA,
            )
        )

    def predict(self, key, params, state, x) -> dict[str, jax.Array]:
        out = {"mean": self.mean(params, x)}
        if self.method == "IVON":
            out["mc"] = self.mc(key, params, state, x)
        return out


def predictor_name(method: str, kind: str, mc: int) -> str:
    return (
        method if method == "AdamW" else ("IVON@mean" if kind == "mean" else f"IVON ({mc} samples)")
    )


# ----------------------------------------------------------------------------- merging
@functools.partial(jax.jit, static_argnums=0)
def merge_shared(method: str, base, shared: list, hess: list | None, scale: float):
    """θ₀ + s · Σ_t w_t ⊙ (θ_t − θ₀); w_t = 1/T or the normalised Hessians."""
    if method == "task arithmetic":
        avg = merging.task_arithmetic(base, shared)  # weights 1/T
    else:
        avg = merging.merge(base, shared, hess)  # base_precision 0: weights h_t / Σ h
    return jax.tree.map(lambda b, m: b + scale * (m - b), base, avg)


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny version (CI)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64, help="snippet and context length (bytes)")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--pretrain-batch", type=int, default=32)
    ap.add_argument("--corpus-mb", type=float, default=2.0)
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--n-train", type=int, default=512, help="training snippets per task")
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps per run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mc-samples", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--ckpt",
        type=pathlib.Path,
        default=None,
        help="folder of base-model checkpoints (default OUT/finetune_merge.base)",
    )
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --quick run: a new temporary folder")
    args = ap.parse_args()
    # A --quick run never writes over the committed results of the full run.
    if args.out is None:
        quick_out = pathlib.Path(tempfile.mkdtemp(prefix="finetune_merge_")) if args.quick else None
        args.out = quick_out or RESULTS
    if args.quick:
        args.layers, args.width, args.heads, args.seq = 1, 32, 2, 32
        args.pretrain_steps, args.pretrain_batch, args.corpus_mb = 20, 8, 0.5
        args.n_train, args.n_val, args.n_test = 64, 32, 32
        args.steps, args.batch, args.mc_samples, args.lora_rank = 10, 8, 4, 2
        if len(args.seeds) == 3:
            args.seeds = [0, 1]
    start_all = time.perf_counter()
    check_unseen(args.corpus_mb)
    # --quick: the first and the last configuration of each grid (IVON: both families).
    grid = {m: {k: [v[0], v[-1]] for k, v in g.items()} if args.quick else g
            for m, g in GRID.items()}
    cfg = {k: getattr(args, k) for k in ("layers", "width", "heads", "seq", "lora_rank")}
    backbone_state = pretrained_backbone(args)
    sizes = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    tasks = [make_task(name, args.seq, sizes, seed=100 + i) for i, name in enumerate(TASKS)]
    print(
        "tasks: "
        + "; ".join(f"{t.name}: {', '.join(t.labels)}" for t in tasks)
        + f" — {args.n_train} train / {args.n_val} val / {args.n_test} test snippets each"
    )
    args.out.mkdir(parents=True, exist_ok=True)

    ft_rows, runs = [], {}  # runs[mode, method, task, seed] = (params, state, runner)
    key_eval = jax.random.key(10_000)
    for mode in MODES:
        graphdef, _, frozen = build(backbone_state, cfg, mode, 0)
        frozen_before = jax.tree.map(np.asarray, frozen)
        n_tr = sum(x.size for x in jax.tree.leaves(build(backbone_state, cfg, mode, 0)[1]))
        print(
            f"\n== {mode}: {n_tr:,} trained parameters (head included), "
            f"{sum(x.size for x in jax.tree.leaves(frozen)):,} frozen"
        )
        for method in METHODS:
            runner = Runner(graphdef, frozen, method, args.steps, args.batch, args.mc_samples)
            for task in tasks:
                x, y = jnp.asarray(task.x["train"]), jnp.asarray(task.y["train"])

                def one(
                    seed,
                    hp,
                    phase,
                    splits,
                    task=task,
                    x=x,
                    y=y,
                    runner=runner,
                    mode=mode,
                    method=method,
                ):
                    t0 = time.perf_counter()
                    trained = build(backbone_state, cfg, mode, seed)[1]
                    hpa = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()
                           if k not in STATIC_KEYS}
                    static = tuple(sorted((k, v) for k, v in hp.items() if k in STATIC_KEYS))
                    p, s, losses = runner.run(trained, seed, hpa, x, y, static)
                    jax.block_until_ready(p)
                    sec = time.perf_counter() - t0
                    res = {}
                    for split in splits:
                        preds = runner.predict(
                            jax.random.fold_in(key_eval, seed), p, s, jnp.asarray(task.x[split])
                        )
                        for kind, pr in preds.items():
                            sc = T.scores(pr, task.y[split], "classification")
                            res[split, kind] = sc
                            ft_rows.append(
                                {
                                    "phase": phase,
                                    "mode": mode,
                                    "method": method,
                                    "predictor": predictor_name(method, kind, args.mc_samples),
                                    "task": task.name,
                                    "seed": seed,
                                    "config": describe(hp),
                                    "lr": hp["lr"],
                                    "split": split,
                                    "acc": sc["acc"],
                                    "nll": sc["nll"],
                                    "ece": sc["ece"],
                                    "final_train_loss": float(losses[-10:].mean()),
                                    "seconds": sec,
                                }
                            )
                    return p, s, res

                pick = "mc" if method == "IVON" else "mean"
                tuned = []
                for hp in grid[mode][method]:
                    p, s, res = one(args.seeds[0], hp, "tune", ("val",))
                    tuned.append((res["val", pick]["nll"], hp, p, s))
                best_nll, best, p0, _ = min(tuned, key=lambda r: r[0])
                print(
                    f"{mode:4s} {method:5s} {task.name:8s} best {describe(best)} (val NLL "
                    f"{best_nll:.3f}; grid " + ", ".join(f"{r[0]:.3f}" for r in tuned) + ")"
                )
                for seed in args.seeds:
                    p, s, res = one(seed, best, "final", ("val", "test"))
                    runs[mode, method, task.name, seed] = (p, s, runner, best)
                    if seed == args.seeds[0]:
                        # Deterministic: the final seed-0 run repeats the tuning run exactly.
                        assert all(
                            np.array_equal(a, b)
                            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0), strict=True)
                        )
        # The frozen part never changed (no IVON noise, no step, no decay reaches it).
        assert all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before), strict=True)
        )
    ft_seconds = time.perf_counter() - start_all

    # ------------------------------------------------------------------- pruning
    # LoRA adapters pruned after training (the head is kept whole): IVON's by |m|/σ
    # (ivon_jax.prune_by_snr) and by |m|, AdamW's by magnitude; test accuracy and ECE of the
    # pruned model at its weights (IVON: its mean), every task and seed.
    prune_rows = []
    adapters_only = (False, True)  # (head, adapters)
    for task in tasks:
        x_te = jnp.asarray(task.x["test"])
        for seed in args.seeds:
            for method in METHODS:
                p, s, runner, _ = runs["lora", method, task.name, seed]
                rules = (("SNR", "magnitude") if method == "IVON"
                         else ("magnitude",))
                for rule in rules:
                    for frac in PRUNE_FRACTIONS:
                        if rule.startswith("SNR"):
                            pruned, _ = ivon_jax.prune_by_snr(p, s, frac, mask=adapters_only)
                        else:
                            pruned, _ = ivon_jax.prune_by_magnitude(p, frac, mask=adapters_only)
                        sc = T.scores(runner.mean(pruned, x_te), task.y["test"],
                                      "classification")
                        prune_rows.append({"method": method, "rule": rule, "fraction": frac,
                                           "task": task.name, "seed": seed, "acc": sc["acc"],
                                           "ece": sc["ece"], "nll": sc["nll"]})

    # ------------------------------------------------------------------- merging
    merge_rows = []
    merge_methods = [
        ("AdamW", "task arithmetic"),
        ("AdamW", "squared gradients"),
        ("IVON", "task arithmetic"),
        ("IVON", "squared gradients"),
        ("IVON", "IVON Hessians"),
    ]
    for mode in MODES:
        for seed in args.seeds:
            base = build(backbone_state, cfg, mode, seed)[1][1]
            for ft_method in METHODS:
                members = [runs[mode, ft_method, t.name, seed] for t in tasks]
                runner = members[0][2]
                shared = [m[0][1] for m in members]
                heads = [m[0][0] for m in members]
                hess = {}
                t0 = time.perf_counter()
                hess["squared gradients"] = [
                    runner.sq_grad(m[0], jnp.asarray(t.x["train"]), jnp.asarray(t.y["train"]))[1]
                    for m, t in zip(members, tasks, strict=True)
                ]
                jax.block_until_ready(hess["squared gradients"])
                sg_seconds = time.perf_counter() - t0
                if ft_method == "IVON":
                    hess["IVON Hessians"] = [
                        merging.hessian_from_state(m[1], m[0])[1] for m in members
                    ]

                def evaluate(merged_shared, split, runner=runner, heads=heads):
                    return [
                        T.scores(
                            runner.mean((h, merged_shared), jnp.asarray(t.x[split])),
                            t.y[split],
                            "classification",
                        )["acc"]
                        for h, t in zip(heads, tasks, strict=True)
                    ]

                def record(
                    method,
                    scale,
                    selection,
                    split,
                    accs,
                    extra=0.0,
                    mode=mode,
                    ft_method=ft_method,
                    seed=seed,
                ):
                    merge_rows.append(
                        {
                            "mode": mode,
                            "finetuned_with": ft_method,
                            "merge": method,
                            "seed": seed,
                            "scale": scale,
                            "selection": selection,
                            "split": split,
                            **{f"acc_{t.name}": a for t, a in zip(tasks, accs, strict=True)},
                            "acc_mean": float(np.mean(accs)),
                            "extra_seconds": extra,
                        }
                    )

                # References: each task's own model; the base with the tasks' heads (s = 0).
                for split in ("val", "test"):
                    own = [
                        T.scores(
                            runner.mean(m[0], jnp.asarray(t.x[split])), t.y[split], "classification"
                        )["acc"]
                        for m, t in zip(members, tasks, strict=True)
                    ]
                    record("each task's own model", "", "", split, own)
                    record("base + task heads", 0.0, "", split, evaluate(base, split))
                for _, method in (mm for mm in merge_methods if mm[0] == ft_method):
                    h = hess.get(method)
                    extra = sg_seconds if method == "squared gradients" else 0.0
                    val = {}
                    for scale in MERGE_SCALES:
                        val[scale] = evaluate(merge_shared(method, base, shared, h, scale), "val")
                        record(method, scale, "grid", "val", val[scale], extra)
                    best = max(MERGE_SCALES, key=lambda s_: np.mean(val[s_]))
                    test = {
                        s_: evaluate(merge_shared(method, base, shared, h, s_), "test")
                        for s_ in {1.0, best}
                    }
                    record(method, 1.0, "s = 1", "test", test[1.0], extra)
                    record(method, best, "tuned", "test", test[best], extra)
    wall = time.perf_counter() - start_all

    # ------------------------------------------------------------------- report
    write_csv(args.out / "finetune_merge.csv", ft_rows)
    write_csv(args.out / "finetune_merge.merging.csv", merge_rows)
    write_csv(args.out / "finetune_merge.pruning.csv", prune_rows)
    md = report(ft_rows, merge_rows, tasks, args, wall, ft_seconds) + pruning_report(prune_rows)
    (args.out / "finetune_merge.md").write_text(md)
    print("\n" + md)
    print(
        f"wrote {args.out / 'finetune_merge.csv'}, {args.out / 'finetune_merge.merging.csv'},"
        f" {args.out / 'finetune_merge.pruning.csv'} and {args.out / 'finetune_merge.md'}"
    )


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()})


def report(ft_rows, merge_rows, tasks, args, wall, ft_seconds) -> str:
    seeds = args.seeds
    out = [
        f"# Fine-tuning and merging (`benchmarks/finetune_merge.py"
        f"{' --quick' if args.quick else ''}`)",
        "",
        f"Wall time {wall / 60:.1f} min on {jax.device_count()} device(s) "
        f"({ft_seconds / 60:.1f} min to pretrain or load the base and fine-tune); "
        f"seeds {seeds}; {args.steps} steps of batch {args.batch}; "
        f"{args.n_train} / {args.n_val} / {args.n_test} snippets per task. "
        "Mean ± std (sample std over seeds).",
        "",
        "## Fine-tuning: test accuracy (%), NLL, ECE",
        "",
        "| mode | predictor | task | chosen config | acc | NLL | ECE |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    final = [r for r in ft_rows if r["phase"] == "final" and r["split"] == "test"]
    groups: dict[tuple, list] = {}
    for r in final:
        groups.setdefault((r["mode"], r["predictor"], r["task"]), []).append(r)
    for (mode, pred, task), rs in groups.items():
        hp = rs[0]["config"]
        out.append(
            f"| {mode} | {pred} | {task} | {hp} | "
            + " | ".join(
                T.mean_std([r[k] for r in rs], d) for k, d in (("acc", 1), ("nll", 3), ("ece", 3))
            )
            + " |"
        )
    out += [
        "",
        "Every seed (test):",
        "",
        "| mode | predictor | task | seed | acc | NLL | ECE |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in final:
        out.append(
            f"| {r['mode']} | {r['predictor']} | {r['task']} | {r['seed']} | "
            f"{r['acc']:.1f} | {r['nll']:.3f} | {r['ece']:.3f} |"
        )
    names = [t.name for t in tasks]
    out += [
        "",
        "## Merging: test accuracy (%) of the merged model on every task",
        "",
        "Scale s chosen on the mean validation accuracy (s = 1: the published formula).",
        "",
        "| mode | fine-tuned with | merge | s | " + " | ".join(names) + " | mean |",
        "|---|---|---|---|" + "---:|" * (len(names) + 1),
    ]
    test = [r for r in merge_rows if r["split"] == "test"]
    mgroups: dict[tuple, list] = {}
    for r in test:
        mgroups.setdefault((r["mode"], r["finetuned_with"], r["merge"], r["selection"]), []).append(
            r
        )
    for (mode, ftm, method, sel), rs in mgroups.items():
        label = (
            "tuned: " + ", ".join(f"{r['scale']:g}" for r in rs)
            if sel == "tuned"
            else sel or ("0" if method.startswith("base") else "—")
        )
        out.append(
            f"| {mode} | {ftm} | {method} | {label} | "
            + " | ".join(T.mean_std([r[f"acc_{n}"] for r in rs], 1) for n in names)
            + f" | {T.mean_std([r['acc_mean'] for r in rs], 1)} |"
        )
    out += [
        "",
        "Every seed (test, mean over tasks):",
        "",
        "| mode | fine-tuned with | merge | s | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|---|" + "---:|" * len(seeds),
    ]
    for (mode, ftm, method, sel), rs in mgroups.items():
        out.append(
            f"| {mode} | {ftm} | {method} | {sel or '—'} | "
            + " | ".join(f"{r['acc_mean']:.1f}" for r in rs)
            + " |"
        )
    return "\n".join(out) + "\n"


def pruning_report(rows: list[dict]) -> str:
    """The pruning table: test accuracy and ECE against the fraction of adapter weights
    pruned, mean ± std over the seeds of the task-averaged values."""
    out = [
        "",
        "## Pruning the LoRA adapters: test accuracy (%) and ECE against the fraction pruned",
        "",
        "SNR: the lowest m/σ in absolute value first (`ivon_jax.prune_by_snr`); magnitude: "
        "the lowest absolute weight first (`ivon_jax.prune_by_magnitude`). The head is kept "
        "whole; pruned weights are set to 0 and the model is evaluated at its weights (IVON: "
        "its mean). Mean over the tasks, then mean ± std over the seeds.",
        "",
        "| fine-tuned with | pruned by | " + " | ".join(
            f"{100 * f:.0f} %" for f in PRUNE_FRACTIONS) + " |",
        "|---|---|" + "---:|" * len(PRUNE_FRACTIONS),
    ]
    combos = list(dict.fromkeys((r["method"], r["rule"]) for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    for metric, digits in (("acc", 1), ("ece", 3)):
        for method, rule in combos:
            cells = []
            for f in PRUNE_FRACTIONS:
                per_seed = [np.mean([r[metric] for r in rows if r["method"] == method
                                     and r["rule"] == rule and r["fraction"] == f
                                     and r["seed"] == sd]) for sd in seeds]
                cells.append(T.mean_std(per_seed, digits))
            out.append(f"| {method} | {rule} ({'accuracy' if metric == 'acc' else 'ECE'}) | "
                       + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
