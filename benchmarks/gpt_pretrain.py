"""Pretrain a small GPT with IVON and with AdamW on the same data, data-parallel on all devices.

The corpus is the Python standard library's own source files, read as bytes (vocabulary 256),
so the example runs offline on any machine: files are sorted by path; every 20th file (index
% 20 == 0) is held out for validation, the files with index % 20 == 10 form a separate tuning
split that only ``gpt_tune.py`` reads, and the rest is training data. The model is a
nanoGPT-like Flax NNX transformer (pre-LayerNorm, GELU MLP, no biases, no dropout, tied
input/output embedding). Both optimizers see the same batches in the same order; each step is
data-parallel over every visible device with ``jax.shard_map`` — for IVON every device draws
its own weight perturbation (``ivon_jax.value_and_grad(..., axis_name="data")``). Each seed
(``--seeds``, default ``0 1``) has its own initialisation and data order.

IVON uses the paper's transformer recipe: element-wise clipping of the preconditioned step at
1e-3, no lr rescaling, weight decay 1e-6. Both optimizers use the same schedule (linear warm-up
over the first 5 % of the steps, then cosine decay to 0, times the peak lr). Their defaults are
the best configurations of ``gpt_tune.py``'s grid (a staged coordinate search, 19
configurations per optimizer, each a 300-step run of this model scored on the tuning split;
``benchmarks/results/gpt_tune.csv``):

- AdamW: lr 2e-3, b1 0.7, b2 0.9, weight decay 0.01 (searched: lr 5e-4 – 1.6e-2, weight decay
  0 – 0.3, b1 0.6 – 0.95, b2 0.9 – 0.999).
- IVON: lr 1.0, ess 1e8, hess_init 1e-2, b1 0.6, b2 0.999 (searched: ess 1e7 – 1e10, lr
  0.25 – 4, hess_init 1e-4 – 1e-1, b1 0.6 – 0.95, b2 0.999 – 0.99999).

Default run (10 – 20 minutes per seed on 2 CPU cores)::

    python benchmarks/gpt_pretrain.py

Bigger, on a GPU::

    python benchmarks/gpt_pretrain.py --layers 6 --width 384 --heads 6 --seq 256 \\
        --batch 64 --steps 5000 --dtype bfloat16

It prints validation loss for both optimizers during training, the final validation loss of
every seed with mean ± std, tokens/s of each and their ratio, and writes
``benchmarks/results/gpt_pretrain.{csv,png}`` (every seed's curve).
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import ivon_jax

RESULTS = pathlib.Path(__file__).with_name("results")


# ----------------------------------------------------------------------------- data
def load_corpus(max_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard-library sources as uint8 streams: (train, validation, tune).

    Files are sorted by path; file i goes to validation if i % 20 == 0, to the tuning split
    (used only by ``gpt_tune.py``'s grid search) if i % 20 == 10, and to training otherwise.
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and p.is_file()
    )
    train, val, tune = [], [], []
    size = 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % 20 == 0 else tune if i % 20 == 10 else train).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    return join(train), join(val), join(tune)


def batches(stream: np.ndarray, rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    return np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int32)


# ----------------------------------------------------------------------------- model
class Block(nnx.Module):
    def __init__(self, width: int, heads: int, dtype, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, use_bias=False, dtype=dtype, param_dtype=dtype,
                                 rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, use_bias=False, decode=False,
            dtype=dtype, param_dtype=dtype, rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(width, use_bias=False, dtype=dtype, param_dtype=dtype,
                                 rngs=rngs)
        self.fc = nnx.Linear(width, 4 * width, use_bias=False, dtype=dtype, param_dtype=dtype,
                             rngs=rngs)
        self.proj = nnx.Linear(4 * width, width, use_bias=False, dtype=dtype,
                               param_dtype=dtype, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))


class GPT(nnx.Module):
    def __init__(self, layers: int, width: int, heads: int, seq: int, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.tok = nnx.Embed(256, width, dtype=dtype, param_dtype=dtype,
                             embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (seq, width), dtype))
        self.blocks = nnx.List([Block(width, heads, dtype, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(width, use_bias=False, dtype=dtype, param_dtype=dtype,
                                rngs=rngs)

    def __call__(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos[...][None, :t]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.tok.attend(self.ln(x)).astype(jnp.float32)


# ----------------------------------------------------------------------------- optimizers
# IVON settings the grid does not search (the paper's transformer recipe with clipping).
IVON_FIXED = {"weight_decay": 1e-6, "clip_radius": 1e-3, "rescale_lr": False}
# The defaults: the best configuration of each optimizer in gpt_tune.py's grid (see the
# module docstring and benchmarks/results/gpt_tune.csv).
DEFAULTS = {
    "AdamW": {"lr": 2e-3, "b1": 0.7, "b2": 0.9, "wd": 0.01},
    "IVON": {"lr": 1.0, "ess": 1e8, "hess_init": 1e-2, "b1": 0.6, "b2": 0.999},
}


def make_optimizer(name: str, hp: dict, schedule) -> optax.GradientTransformation:
    """The optimizer ``name`` with hyper-parameters ``hp`` (plain floats, or scalar arrays
    that may be traced: a jitted step can take them as arguments and so compile once for a
    whole grid). ``hp["lr"]`` multiplies ``schedule``."""
    lr = lambda count: hp["lr"] * schedule(count)
    if name == "AdamW":
        return optax.adamw(lr, b1=hp["b1"], b2=hp["b2"], weight_decay=hp["wd"])
    if name == "IVON":
        return ivon_jax.ivon(lr, ess=hp["ess"], hess_init=hp["hess_init"], b1=hp["b1"],
                             b2=hp["b2"],
                             **IVON_FIXED)
    raise ValueError(name)


def as_arrays(hp: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}


def make_step(name: str, loss_fn, schedule, mesh):
    """A jitted, data-parallel training step ``(params, state, key, tokens, hp) -> (params,
    state, loss)``; the batch is split over the mesh's "data" axis, the hyper-parameters
    ``hp`` (see :func:`as_arrays`) are arguments, so one compilation serves every setting.
    For IVON every device draws its own weight perturbation."""
    ivon_vg = ivon_jax.value_and_grad(loss_fn, axis_name="data")

    def step(params, state, key, tokens, hp):
        tx = make_optimizer(name, hp, schedule)
        if name == "IVON":
            loss, grads, hess = ivon_vg(key, params, state, tokens)
            updates, state = tx.update(grads, state, params, hess=hess)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            loss, grads = jax.lax.pmean((loss, grads), "data")
            updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    spec = (P(), P(), P(), P("data"), P())
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=(P(), P(), P())))


def build_model(layers: int, width: int, heads: int, seq: int, dtype):
    """Returns ``(init_params, loss_fn)``: ``init_params(seed)`` draws the parameters of a
    fresh model, ``loss_fn(params, tokens)`` is the mean next-byte cross-entropy."""
    make = lambda seed: GPT(layers, width, heads, seq, dtype, nnx.Rngs(seed))
    graphdef, _ = nnx.split(make(0), nnx.Param)

    def init_params(seed: int):
        return nnx.split(make(seed), nnx.Param)[1]

    def loss_fn(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return init_params, loss_fn


def data_mesh(batch: int):
    n_dev = jax.device_count()
    if batch % n_dev:
        raise SystemExit(f"--batch {batch} must be divisible by {n_dev} devices")
    mesh = jax.make_mesh((n_dev,), ("data",))
    return mesh, NamedSharding(mesh, P("data"))


def add_model_args(ap: argparse.ArgumentParser, steps: int) -> None:
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="parameter/activation dtype (IVON's statistics stay float32)")
    ap.add_argument("--corpus-mb", type=float, default=8.0)


# ----------------------------------------------------------------------------- training
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap, steps=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    for name, hp in DEFAULTS.items():
        for k, v in hp.items():
            ap.add_argument(f"--{name.lower()}-{k.replace('_', '-')}", type=float, default=v)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="one run of both optimizers per seed (its own init and data order)")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    hps = {name: {k: getattr(args, f"{name.lower()}_{k}") for k in hp}
           for name, hp in DEFAULTS.items()}

    train, val, _ = load_corpus(int(args.corpus_mb * 2**20))  # the tune split is not used
    mesh, data_sharding = data_mesh(args.batch)
    init_params, loss_fn = build_model(args.layers, args.width, args.heads, args.seq, dtype)
    n_params = sum(x.size for x in jax.tree.leaves(init_params(0)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, args.steps // 20, args.steps)
    steps = {name: make_step(name, loss_fn, schedule, mesh) for name in DEFAULTS}
    hp_arrays = {name: as_arrays(hp) for name, hp in hps.items()}

    eval_loss = jax.jit(loss_fn)
    val_rng = np.random.default_rng(12345)
    val_batches = [batches(val, val_rng, args.batch, args.seq) for _ in range(args.eval_batches)]

    def evaluate(p):
        return float(np.mean([eval_loss(p, b) for b in val_batches]))

    summary = getattr(ivon_jax, "state_summary", None)  # newer ivon_jax: IVON's h and σ
    summarize = jax.jit(summary) if summary is not None else None

    print(f"GPT {args.layers}x{args.width}, {n_params / 1e6:.2f}M parameters ({args.dtype}), "
          f"seq {args.seq}, global batch {args.batch}, {jax.device_count()} device(s); corpus "
          f"{len(train) / 2**20:.1f} MiB train / {len(val) / 2**20:.2f} MiB validation; "
          f"seeds {args.seeds}")
    for name, hp in hps.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:g}" for k, v in hp.items()))

    timing = {name: [0.0, 0] for name in DEFAULTS}  # seconds, timed steps (all seeds)
    curves = {}  # (seed, optimizer) -> [(step, val loss)]
    start_all = time.perf_counter()
    for seed in args.seeds:
        params = init_params(seed)
        runs = {name: {"params": params,
                       "state": make_optimizer(name, hps[name], schedule).init(params)}
                for name in DEFAULTS}
        for name in runs:
            curves[seed, name] = []
        rng = np.random.default_rng(seed)
        key = jax.random.key(seed)
        postfix = {}
        bar = tqdm(range(1, args.steps + 1), desc=f"seed {seed}", unit="step")
        for t in bar:
            tokens = jax.device_put(batches(train, rng, args.batch, args.seq), data_sharding)
            step_key = jax.random.fold_in(key, t)
            for name, r in runs.items():
                start = time.perf_counter()
                r["params"], r["state"], loss = steps[name](
                    r["params"], r["state"], step_key, tokens, hp_arrays[name])
                jax.block_until_ready(loss)
                if t > 3:  # exclude compilation and warm-up
                    timing[name][0] += time.perf_counter() - start
                    timing[name][1] += 1
                postfix[name.lower()] = f"{float(loss):.3f}"
            if t % args.eval_every == 0 or t == args.steps:
                for name, r in runs.items():
                    curves[seed, name].append((t, evaluate(r["params"])))
                line = f"seed {seed} step {t:5d}  val loss" + "".join(
                    f"  {name} {curves[seed, name][-1][1]:.4f}" for name in runs)
                if summarize is not None:
                    s = summarize(runs["IVON"]["state"])
                    postfix["σ_med"] = f"{float(s['sigma_p50']):.2e}"
                    postfix["h_med"] = f"{float(s['h_p50']):.2e}"
                    line += f"  (IVON median σ {postfix['σ_med']}, median h {postfix['h_med']})"
                bar.write(line)
            bar.set_postfix(postfix)
    wall = time.perf_counter() - start_all

    tokens_per_step = args.batch * args.seq
    tps = {n: steps_ * tokens_per_step / sec if sec else math.nan  # steps 1-3 are not timed
           for n, (sec, steps_) in timing.items()}
    finals = {name: [curves[s, name][-1][1] for s in args.seeds] for name in DEFAULTS}
    print(f"\nfinal validation loss after {args.steps} steps (nats/byte); "
          f"wall time {wall / 60:.1f} min")
    print("| optimizer | " + " | ".join(f"seed {s}" for s in args.seeds)
          + " | mean ± std | tokens/s |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    for name, vals in finals.items():
        std = np.std(vals, ddof=1) if len(vals) > 1 else 0.0
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals)
              + f" | {np.mean(vals):.4f} ± {std:.4f} | {tps[name]:,.0f} |")
    print("(std: sample standard deviation over seeds, ddof=1)")
    diff = np.array(finals["IVON"]) - np.array(finals["AdamW"])
    print("IVON − AdamW per seed: " + ", ".join(f"{d:+.4f}" for d in diff))
    print(f"\nIVON/AdamW tokens/s ratio: {tps['IVON'] / tps['AdamW']:.3f} "
          f"(step time ratio {tps['AdamW'] / tps['IVON']:.3f})")

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "gpt_pretrain.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "optimizer", "step", "val_loss"])
        for (seed, name), curve in curves.items():
            for t, v in curve:
                w.writerow([seed, name, t, f"{v:.5f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot")
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colors = {"AdamW": "tab:blue", "IVON": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for (seed, name), curve in curves.items():
        steps_, losses = zip(*curve, strict=True)
        i = args.seeds.index(seed)
        ax.plot(steps_, losses, marker="o", markersize=3, color=colors[name],
                linestyle=styles[i % len(styles)], label=f"{name}, seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"GPT {n_params / 1e6:.2f}M on stdlib sources")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "gpt_pretrain.png", dpi=120)
    print(f"wrote {args.out / 'gpt_pretrain.csv'} and {args.out / 'gpt_pretrain.png'}")


if __name__ == "__main__":
    main()
