"""Pretrain a small GPT with IVON and with AdamW on the same data, data-parallel on all devices.

The corpus is the Python standard library's own source files, read as bytes (vocabulary 256),
so the example runs offline on any machine: files are sorted by path and every 20th file is
held out for validation. The model is a nanoGPT-like Flax NNX transformer (pre-LayerNorm,
GELU MLP, no biases, no dropout, tied input/output embedding). Both optimizers see the same
batches in the same order; each step is data-parallel over every visible device with
``jax.shard_map`` — for IVON every device draws its own weight perturbation
(``ivon_jax.value_and_grad(..., axis_name="data")``).

IVON uses the paper's transformer recipe scaled down: element-wise clipping of the
preconditioned step at 1e-3, a large effective sample size, small weight decay.

Default run (about 10 minutes on 2 CPU cores)::

    python benchmarks/gpt_pretrain.py

Bigger, on a GPU::

    python benchmarks/gpt_pretrain.py --layers 6 --width 384 --heads 6 --seq 256 \\
        --batch 64 --steps 5000 --dtype bfloat16

It prints validation loss for both optimizers during training, the final validation loss,
tokens/s of each and their ratio, and writes ``benchmarks/results/gpt_pretrain.{csv,png}``.
"""

from __future__ import annotations

import argparse
import csv
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
def load_corpus(max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard-library sources as uint8 streams: (train, validation)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and p.is_file()
    )
    train, val = [], []
    size = 0
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % 20 == 0 else train).append(data)
        size += len(data)
        if size >= max_bytes:
            break
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    return join(train), join(val)


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


# ----------------------------------------------------------------------------- training
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="parameter/activation dtype (IVON's statistics stay float32)")
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--adamw-lr", type=float, default=1e-3)
    ap.add_argument("--ivon-lr", type=float, default=1.0)
    ap.add_argument("--ivon-ess", type=float, default=1e7)
    ap.add_argument("--ivon-hess-init", type=float, default=1e-3)
    ap.add_argument("--ivon-b2", type=float, default=0.9999)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32

    train, val = load_corpus(int(args.corpus_mb * 2**20))
    n_dev = jax.device_count()
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} must be divisible by {n_dev} devices")
    mesh = jax.make_mesh((n_dev,), ("data",))
    data_sharding = NamedSharding(mesh, P("data"))

    model = GPT(args.layers, args.width, args.heads, args.seq, dtype, nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    def loss_fn(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1.0, args.steps // 20, args.steps)
    adamw = optax.adamw(lambda c: args.adamw_lr * schedule(c), b2=0.95, weight_decay=0.1)
    ivon = ivon_jax.ivon(
        lambda c: args.ivon_lr * schedule(c), ess=args.ivon_ess,
        hess_init=args.ivon_hess_init, b2=args.ivon_b2, weight_decay=1e-6,
        clip_radius=1e-3, rescale_lr=False,
    )
    ivon_vg = ivon_jax.value_and_grad(loss_fn, axis_name="data")

    def shard(f):
        spec = (P(), P(), P(), P("data"))
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=(P(), P(), P())))

    @shard
    def adamw_step(params, state, key, tokens):
        del key
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        loss, grads = jax.lax.pmean((loss, grads), "data")
        updates, state = adamw.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    @shard
    def ivon_step(params, state, key, tokens):
        loss, grads, hess = ivon_vg(key, params, state, tokens)
        updates, state = ivon.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, loss

    eval_loss = jax.jit(loss_fn)
    val_rng = np.random.default_rng(12345)
    val_batches = [batches(val, val_rng, args.batch, args.seq) for _ in range(args.eval_batches)]

    def evaluate(p):
        return float(np.mean([eval_loss(p, b) for b in val_batches]))

    runs = {
        "AdamW": {"step": adamw_step, "params": params, "state": adamw.init(params)},
        "IVON": {"step": ivon_step, "params": params, "state": ivon.init(params)},
    }
    for r in runs.values():
        r.update(time=0.0, timed_steps=0, curve=[])
    print(f"GPT {args.layers}x{args.width}, {n_params / 1e6:.2f}M parameters ({args.dtype}), "
          f"seq {args.seq}, global batch {args.batch}, {n_dev} device(s); corpus "
          f"{len(train) / 2**20:.1f} MiB train / {len(val) / 2**20:.2f} MiB validation")

    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    bar = tqdm(range(1, args.steps + 1), desc="pretraining", unit="step")
    for t in bar:
        tokens = jax.device_put(batches(train, rng, args.batch, args.seq), data_sharding)
        step_key = jax.random.fold_in(key, t)
        for r in runs.values():
            start = time.perf_counter()
            r["params"], r["state"], loss = r["step"](r["params"], r["state"], step_key, tokens)
            jax.block_until_ready(loss)
            if t > 3:  # exclude compilation and warm-up
                r["time"] += time.perf_counter() - start
                r["timed_steps"] += 1
            r["loss"] = float(loss)
        if t % args.eval_every == 0 or t == args.steps:
            for r in runs.values():
                r["curve"].append((t, evaluate(r["params"])))
            bar.write(f"step {t:5d}  val loss  AdamW {runs['AdamW']['curve'][-1][1]:.4f}  "
                      f"IVON {runs['IVON']['curve'][-1][1]:.4f}")
        bar.set_postfix(adamw=f"{runs['AdamW']['loss']:.3f}", ivon=f"{runs['IVON']['loss']:.3f}")

    tokens_per_step = args.batch * args.seq
    tps = {n: r["timed_steps"] * tokens_per_step / r["time"] for n, r in runs.items()}
    print("\n| optimizer | final val loss (nats/byte) | tokens/s |")
    print("|---|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {r['curve'][-1][1]:.4f} | {tps[name]:,.0f} |")
    print(f"\nIVON/AdamW tokens/s ratio: {tps['IVON'] / tps['AdamW']:.3f} "
          f"(step time ratio {tps['AdamW'] / tps['IVON']:.3f})")

    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "gpt_pretrain.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "adamw_val_loss", "ivon_val_loss"])
        for (t, a), (_, i) in zip(runs["AdamW"]["curve"], runs["IVON"]["curve"], strict=True):
            w.writerow([t, f"{a:.5f}", f"{i:.5f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, r in runs.items():
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"GPT {n_params / 1e6:.2f}M on stdlib sources")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "gpt_pretrain.png", dpi=120)
    print(f"wrote {RESULTS / 'gpt_pretrain.csv'} and {RESULTS / 'gpt_pretrain.png'}")


if __name__ == "__main__":
    main()
