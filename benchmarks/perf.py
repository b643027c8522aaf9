"""IVON's cost against optax's AdamW (and SGD with momentum), measured in one run.

    python benchmarks/perf.py            # the full suite (a few minutes on 2 CPU cores)
    python benchmarks/perf.py --smoke    # a tiny version (CI runs it through the tests)

Everything is jitted, with parameters and optimizer state donated; times are medians of
repeated calls after warm-up, with ``block_until_ready``, the contenders of a row called in
turn. Ratios are IVON / AdamW from the same run (on a shared, noisy machine absolute times
matter less than ratios).

Sections:
  1. Whole train step (forward, backward, optimizer; one MC sample): MLP 784-500-300-10
     (0.55M, batch 128), MLP of 10M, a small CNN, a GPT of ~3M (seq 128, batch 16).
  2. Optimizer alone: sample + estimate + update vs AdamW's update, at 1M, 10M and 50M
     parameters as a few large leaves and as many small ones.
  3. Memory: optimizer-state bytes, and peak memory of the compiled train step
     (``compiled.memory_analysis()``) for S = 1, S = 8 vectorised and S = 8 sequential.
  4. First-step compile time: the MLP step, and the whole step and the optimizer alone
     with 50, 200 and 1,000 leaves of 16x16.
  5. The noise generators alone.
  6. The non-finite guard: the whole MLP steps with IVON's default guard, without it
     (``skip_nonfinite=False``) and with the generic wrapper ``ivon_jax.skip_nonfinite``.

Writes ``benchmarks/results/perf.md`` (Markdown tables) and ``benchmarks/results/perf.png``
(``--out DIR`` elsewhere; a ``--smoke`` run without ``--out`` writes to a new temporary folder).
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ivon_jax

RESULTS = pathlib.Path(__file__).with_name("results")


# ----------------------------------------------------------------------------- timing
def interleaved_medians(
    fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 3
) -> dict[str, float]:
    """Median time of each function, calling them in turn (A, B, C, C, A, B, ...) so that a
    slow spell of the shared machine hits all of them alike rather than one. The order is
    shuffled every round: a fixed order was seen to favour one position by up to 10 % (two
    copies of the same compiled step, timed in turn)."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng = np.random.default_rng(0)
    names = list(fns)
    for _ in range(reps):
        for i in rng.permutation(len(names)):
            name, fn = names[i], fns[names[i]]
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- models
def mlp(sizes: tuple[int, ...], key: jax.Array):
    keys = jax.random.split(key, len(sizes) - 1)
    params = [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]

    def apply(p, x):
        for layer in p[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
        return x @ p[-1]["w"] + p[-1]["b"][None, :]

    return params, apply


def cnn(key: jax.Array):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "c1": jax.random.normal(k1, (3, 3, 1, 32)) * 0.3,
        "c2": jax.random.normal(k2, (3, 3, 32, 64)) * 0.06,
        "d": jax.random.normal(k3, (7 * 7 * 64, 10)) * 0.02,
    }

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def pool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")

    def apply(p, x):
        x = pool(jax.nn.relu(conv(x, p["c1"])))
        x = pool(jax.nn.relu(conv(x, p["c2"])))
        return x.reshape(x.shape[0], -1) @ p["d"]

    return params, apply


def gpt(key: jax.Array, layers=4, width=256, heads=4, seq=128, vocab=256):
    keys = iter(jax.random.split(key, 4 * layers + 2))
    norm = lambda shape, s=0.02: jax.random.normal(next(keys), shape) * s
    params = {
        "tok": norm((vocab, width)),
        "pos": norm((seq, width)),
        "blocks": [
            {"qkv": norm((width, 3 * width)), "o": norm((width, width)),
             "fc": norm((width, 4 * width)), "proj": norm((4 * width, width))}
            for _ in range(layers)
        ],
    }
    mask = jnp.tril(jnp.ones((seq, seq), bool))

    def ln(x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    def apply(p, tokens):
        b, t = tokens.shape
        x = p["tok"][tokens] + p["pos"][None, :t]
        for blk in p["blocks"]:
            q, k, v = jnp.split(ln(x) @ blk["qkv"], 3, axis=-1)
            split = lambda a: a.reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
            q, k, v = split(q), split(k), split(v)
            att = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(q.shape[-1])
            att = jax.nn.softmax(jnp.where(mask[None, None, :t, :t], att, -1e9), axis=-1)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, width)
            x = x + y @ blk["o"]
            x = x + jax.nn.gelu(ln(x) @ blk["fc"]) @ blk["proj"]
        return ln(x) @ p["tok"].T

    return params, apply


def n_params(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- steps
def cross_entropy(apply):
    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()
    return loss_fn


def ivon_train_step(vg, tx):
    """One IVON train step ``(params, state, key, x, y) -> (params, state, loss)`` with
    ``vg = ivon_jax.value_and_grad(loss)`` and the optimizer ``tx``."""
    def step(params, state, key, x, y):
        loss, grads, hess = vg(key, params, state, x, y)
        updates, state = tx.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, loss
    return step


def make_steps(apply, n_train: int, samples: int = 1, mode: str = "vmap"):
    loss_fn = cross_entropy(apply)
    adamw = optax.adamw(1e-3, weight_decay=1e-4)
    sgd = optax.sgd(1e-2, momentum=0.9)
    ivon = ivon_jax.ivon(0.1, ess=float(n_train))
    vg = ivon_jax.value_and_grad(loss_fn, num_samples=samples, mode=mode)

    def baseline(tx):
        def step(params, state, key, x, y):
            del key
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss
        return step

    return {"AdamW": (adamw, baseline(adamw)), "SGD": (sgd, baseline(sgd)),
            "IVON": (ivon, ivon_train_step(vg, ivon))}


def donated_caller(step, tx, params, key, *args) -> Callable[[], Any]:
    """A no-argument function running jitted ``step(params, state, key, *args)`` on its own
    copy of the parameters and a fresh state, both donated and carried from call to call;
    it returns the step's third output."""
    jitted = jax.jit(step, donate_argnums=(0, 1))
    carry = {"p": jax.tree.map(jnp.copy, params)}
    carry["s"] = tx.init(carry["p"])

    def call():
        carry["p"], carry["s"], extra = jitted(carry["p"], carry["s"], key, *args)
        return extra

    return call


def time_train_steps(name, params, apply, x, y, reps, out):
    steps = make_steps(apply, n_train=50_000)
    row = {"model": name, "params": n_params(params)}
    calls = {
        opt_name: donated_caller(step, tx, params, jax.random.key(0), x, y)
        for opt_name, (tx, step) in steps.items()
    }
    row.update(interleaved_medians(calls, reps))
    row["IVON/AdamW"] = row["IVON"] / row["AdamW"]
    out.append(row)
    print(f"  {name:10s} {row['params'] / 1e6:6.2f}M  AdamW {1e3 * row['AdamW']:8.2f} ms  "
          f"SGD {1e3 * row['SGD']:8.2f} ms  IVON {1e3 * row['IVON']:8.2f} ms  "
          f"ratio {row['IVON/AdamW']:.3f}", flush=True)


def optimizer_alone_steps():
    """AdamW's update and IVON's sample + estimate + update for given gradients, both as
    ``(params, state, key, grads) -> (params, state, extra)`` (AdamW ignores the key)."""
    adamw, ivon = optax.adamw(1e-3, weight_decay=1e-4), ivon_jax.ivon(0.1, ess=1e4)

    def adam_step(params, state, key, grads):
        del key
        updates, state = adamw.update(grads, state, params)
        return optax.apply_updates(params, updates), state, params

    def ivon_step(params, state, key, grads):
        sampled, noise = ivon_jax.sample_params(key, params, state)
        hess = ivon_jax.estimate_hessian(grads, noise, state)
        updates, state = ivon.update(grads, state, params, hess=hess)
        return optax.apply_updates(params, updates), state, sampled  # θ feeds the forward

    return adamw, ivon, adam_step, ivon_step


def time_optimizer_alone(total: int, leaves: int, reps: int, out):
    size = total // leaves
    params = {f"p{i:04d}": jnp.full((size,), 0.1, jnp.float32) for i in range(leaves)}
    grads = jax.tree.map(lambda p: p * 0.01, params)
    adamw, ivon, adam_step, ivon_step = optimizer_alone_steps()
    row = {"params": total, "leaves": leaves}
    calls = {
        name: donated_caller(step, tx, params, jax.random.key(1), grads)
        for name, tx, step in (("AdamW", adamw, adam_step), ("IVON", ivon, ivon_step))
    }
    row.update(interleaved_medians(calls, reps))
    row["IVON/AdamW"] = row["IVON"] / row["AdamW"]
    out.append(row)
    print(f"  {total / 1e6:5.0f}M in {leaves:5d} leaves  AdamW {1e3 * row['AdamW']:8.2f} ms  "
          f"IVON {1e3 * row['IVON']:8.2f} ms  ratio {row['IVON/AdamW']:.3f}", flush=True)


def memory_rows(params, apply, x, y, out):
    """Peak memory of one compiled train step with parameters and state donated (as a real
    loop runs it): arguments + outputs - aliased + XLA temporaries."""
    param_bytes = tree_bytes(params)
    configs = [("AdamW", 1, "vmap"), ("IVON S=1", 1, "vmap"), ("IVON S=8 vmap", 8, "vmap"),
               ("IVON S=8 scan", 8, "scan")]
    for label, samples, mode in configs:
        steps = make_steps(apply, 50_000, samples, mode)
        tx, step = steps["AdamW" if label == "AdamW" else "IVON"]
        state = tx.init(params)
        m = (jax.jit(step, donate_argnums=(0, 1))
             .lower(params, state, jax.random.key(0), x, y).compile().memory_analysis())
        total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
        out.append({"config": label, "peak_bytes": total, "temp_bytes": m.temp_size_in_bytes,
                    "state_bytes": tree_bytes(state), "param_bytes": param_bytes})
        temp = m.temp_size_in_bytes / 2**20
        print(f"  {label:14s} step peak {total / 2**20:8.2f} MiB (temp {temp:.2f})"
              f"  optimizer state {tree_bytes(state):,} B  (params {param_bytes / 2**20:.2f} MiB)",
              flush=True)


def _many_leaves(leaves: int):
    params = {f"w{i:04d}": jnp.full((16, 16), 0.01, jnp.float32) for i in range(leaves)}

    def apply(p, x):
        h = x
        for k in sorted(p):
            h = jnp.tanh(h @ p[k])
        return h[:, :10]

    return params, apply


def _compile_seconds(fn, *args) -> float:
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - start


def compile_rows(out, leaf_counts: tuple[int, ...], sizes: tuple[int, ...]):
    """Trace + compile time of the first step: the whole train step (MLP, and a tanh chain of
    16x16 leaves) and the optimizer alone (IVON: sample + estimate + update; AdamW: update)."""
    cases = [("MLP", "whole step", mlp(sizes, jax.random.key(0)))]
    cases += [(f"{n} leaves", "whole step", _many_leaves(n)) for n in leaf_counts]
    cases += [(f"{n} leaves", "optimizer alone", _many_leaves(n)) for n in leaf_counts]
    for name, what, (params, apply) in cases:
        in_dim = 784 if name.startswith("MLP") else 16
        x = jnp.ones((32, in_dim))
        y = jnp.zeros((32,), jnp.int32)
        row = {"model": name, "what": what}
        if what == "whole step":
            for opt_name, (tx, step) in make_steps(apply, 50_000).items():
                if opt_name != "SGD":
                    row[opt_name] = _compile_seconds(
                        step, params, tx.init(params), jax.random.key(0), x, y)
        else:
            grads = jax.tree.map(lambda p: p * 0.01, params)
            adamw, ivon, adam_step, ivon_step = optimizer_alone_steps()
            row["AdamW"] = _compile_seconds(
                adam_step, params, adamw.init(params), jax.random.key(0), grads)
            row["IVON"] = _compile_seconds(
                ivon_step, params, ivon.init(params), jax.random.key(0), grads)
        row["IVON/AdamW"] = row["IVON"] / row["AdamW"]
        out.append(row)
        print(f"  {name:12s} {what:15s} compile AdamW {row['AdamW']:6.2f} s  "
              f"IVON {row['IVON']:6.2f} s  ratio {row['IVON/AdamW']:.3f}", flush=True)


def guard_rows(name, params, apply, x, y, reps, out):
    """The whole IVON step with the default non-finite guard, without it, and with the
    generic wrapper, in one run; two copies of the unguarded step show the timing noise."""
    vg = ivon_jax.value_and_grad(cross_entropy(apply))
    unguarded = lambda: ivon_jax.ivon(0.1, ess=50_000.0, skip_nonfinite=False)
    txs = {"off": unguarded(), "off (again)": unguarded(),
           "default": ivon_jax.ivon(0.1, ess=50_000.0),
           "wrapper": ivon_jax.skip_nonfinite(unguarded())}

    calls = {k: donated_caller(ivon_train_step(vg, tx), tx, params, jax.random.key(0), x, y)
             for k, tx in txs.items()}
    t = interleaved_medians(calls, reps)
    off = (t["off"] + t["off (again)"]) / 2
    row = {"model": name, "params": n_params(params), **t,
           "default/off": t["default"] / off, "wrapper/off": t["wrapper"] / off,
           "noise": abs(t["off"] - t["off (again)"]) / off}
    out.append(row)
    print(f"  {name:10s} off {1e3 * off:8.2f} ms  default guard {1e3 * t['default']:8.2f} ms "
          f"({row['default/off']:.3f})  wrapper {1e3 * t['wrapper']:8.2f} ms "
          f"({row['wrapper/off']:.3f})  off vs off {row['noise']:.3f}", flush=True)


def noise_rows(total: int, reps: int, out):
    key = jax.random.key(0)
    shape = (total,)
    state = ivon_jax.ivon(0.1, ess=1.0).init({"w": jnp.zeros(shape)})
    calls = {}
    for gen in ("threefry", "fast"):
        f = jax.jit(lambda k, gen=gen: ivon_jax.sample_params(
            k, {"w": jnp.zeros(shape)}, state, generator=gen)[1]["w"])
        calls[gen] = lambda f=f: f(key)
    for gen, t in interleaved_medians(calls, reps).items():
        out.append({"generator": gen, "numbers": total, "seconds": t})
        print(f"  {gen:9s} {total / 1e6:.0f}M normals (sample_params) {1e3 * t:8.2f} ms",
              flush=True)


# ----------------------------------------------------------------------------- report
def fmt_count(n: float) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def fmt_ms(s: float) -> str:
    return f"{1e3 * s:.2f}"


def write_report(res: dict, args) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, "
             f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s) "
             f"({jax.devices()[0].device_kind}); jax {jax.__version__}; "
             f"{'smoke run' if args.smoke else 'full run'}.", ""]
    lines += ["**Whole train step** (one MC sample; median ms)", "",
              "| model | params | AdamW | SGD+mom | IVON | IVON/AdamW |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in res["train"]:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {fmt_ms(r['AdamW'])} | "
                     f"{fmt_ms(r['SGD'])} | {fmt_ms(r['IVON'])} | {r['IVON/AdamW']:.2f} |")
    lines += ["", "**Optimizer alone** (IVON: sample + estimate + update; AdamW: update; "
              "median ms)", "", "| params | leaves | AdamW | IVON | IVON/AdamW |",
              "|---:|---:|---:|---:|---:|"]
    for r in res["opt"]:
        lines.append(f"| {fmt_count(r['params'])} | {r['leaves']} | {fmt_ms(r['AdamW'])} | "
                     f"{fmt_ms(r['IVON'])} | {r['IVON/AdamW']:.2f} |")
    lines += ["", "**Memory** (MLP train step, parameters and state donated; peak = arguments "
              "+ outputs − aliased + temporaries of the compiled step)", "",
              "| config | step peak (MiB) | of which temporaries | optimizer state (bytes) |",
              "|---|---:|---:|---:|"]
    for r in res["mem"]:
        lines.append(f"| {r['config']} | {r['peak_bytes'] / 2**20:.2f} | "
                     f"{r['temp_bytes'] / 2**20:.2f} | {r['state_bytes']:,} |")
    lines.append(f"\nParameters: {res['mem'][0]['param_bytes'] / 2**20:.2f} MiB.")
    lines += ["", "**First-step compile time** (trace + compile, s)", "",
              "| model | AdamW | IVON | IVON/AdamW |", "|---|---:|---:|---:|"]
    for r in res["compile"]:
        lines.append(f"| {r['model']}, {r['what']} | {r['AdamW']:.2f} | {r['IVON']:.2f} | "
                     f"{r['IVON/AdamW']:.2f} |")
    lines += ["", "**Noise alone** (`sample_params` on one leaf, median ms)", "",
              "| generator | normals | ms |", "|---|---:|---:|"]
    for r in res["noise"]:
        lines.append(f"| {r['generator']} | {fmt_count(r['numbers'])} | {fmt_ms(r['seconds'])} |")
    lines += ["", "**Non-finite guard** (whole IVON step, median ms; `off` = "
              "`skip_nonfinite=False`, the mean of two copies timed apart)", "",
              "| model | off | default guard | wrapper `skip_nonfinite(tx)` | default/off | "
              "wrapper/off | off vs off again |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["guard"]:
        off = (r["off"] + r["off (again)"]) / 2
        lines.append(f"| {r['model']} | {fmt_ms(off)} | {fmt_ms(r['default'])} | "
                     f"{fmt_ms(r['wrapper'])} | {r['default/off']:.3f} | {r['wrapper/off']:.3f} | "
                     f"{100 * r['noise']:.1f} % |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [r["model"] for r in res["train"]]
    axes[0].bar(labels, [r["IVON/AdamW"] for r in res["train"]])
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("IVON / AdamW step time")
    axes[0].set_title("whole train step")
    labels = [f"{r['params'] / 1e6:.0f}M/{r['leaves']}" for r in res["opt"]]
    axes[1].bar(labels, [r["IVON/AdamW"] for r in res["opt"]])
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_title("optimizer alone (params/leaves)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="default: benchmarks/results/; a --smoke run: a new temporary folder")
    args = ap.parse_args()
    # A --smoke run never writes over the committed results of the full run.
    if args.out is None:
        args.out = pathlib.Path(tempfile.mkdtemp(prefix="perf_")) if args.smoke else RESULTS
    reps = args.reps or (3 if args.smoke else 30)
    scale = 0.001 if args.smoke else 1.0
    key = jax.random.key(0)
    res: dict[str, list] = {"train": [], "opt": [], "mem": [], "compile": [], "noise": [],
                            "guard": []}

    print("Whole train step", flush=True)
    batch = 128
    x = jax.random.normal(key, (batch, 784))
    y = jax.random.randint(key, (batch,), 0, 10)
    sizes = (784, 32, 10) if args.smoke else (784, 500, 300, 10)
    p, f = mlp(sizes, key)
    time_train_steps("MLP tiny" if args.smoke else "MLP 0.55M", p, f, x, y, reps, res["train"])
    if not args.smoke:
        big_p, big_f = mlp((784, 2500, 2500, 784), key)
        yb = jax.random.randint(key, (batch,), 0, 784)
        time_train_steps("MLP 10M", big_p, big_f, x, yb, max(reps // 3, 5), res["train"])
        p, f = cnn(key)
        xi = jax.random.normal(key, (batch, 28, 28, 1))
        time_train_steps("CNN", p, f, xi, y, reps, res["train"])
        p, f = gpt(key)
        tok = jax.random.randint(key, (16, 128), 0, 256)
        time_train_steps("GPT", p, f, tok, tok, max(reps // 3, 5), res["train"])

    print("Optimizer alone", flush=True)
    totals = (10_000,) if args.smoke else (1_000_000, 10_000_000, 50_000_000)
    for total in totals:
        for leaves in ((4,) if args.smoke else (4, 400)):
            time_optimizer_alone(total, leaves, max(reps // 3, 3), res["opt"])

    print("Memory", flush=True)
    p, f = mlp(sizes, key)
    memory_rows(p, f, x, y, res["mem"])

    print("Compile time", flush=True)
    compile_rows(res["compile"], (5,) if args.smoke else (50, 200, 1000), sizes=sizes)

    print("Noise generators", flush=True)
    noise_rows(max(int(10_000_000 * scale), 1000), max(reps // 3, 3), res["noise"])

    print("Non-finite guard", flush=True)
    p, f = mlp(sizes, key)
    guard_rows("MLP tiny" if args.smoke else "MLP 0.55M", p, f, x, y, reps, res["guard"])
    if not args.smoke:
        guard_rows("MLP 10M", big_p, big_f, x, yb, max(reps // 2, 5), res["guard"])

    args.out.mkdir(parents=True, exist_ok=True)
    report = write_report(res, args)
    (args.out / "perf.md").write_text(report)
    plot(res, args.out / "perf.png")
    print("\n" + report)
    print(f"wrote {args.out / 'perf.md'}")


if __name__ == "__main__":
    main()
