"""Preemption: SIGKILL a checkpointing IVON run again and again; the result must not change.

A training run (an MLP on a fixed synthetic data set, ``ivon_jax.ivon`` with a cosine
schedule, one posterior sample per step from ``ivon_jax.value_and_grad``) saves every
``--save-every`` steps with Orbax's ``CheckpointManager`` (asynchronous saves): the parameters,
IVON's state, the data position (the loop step: epoch and position in the epoch's shuffled
order are functions of it) and the PRNG key (its raw bits, ``jax.random.key_data``).

This script is the supervisor. It runs

1. the reference: the same training in one child process, never interrupted;
2. the preempted run: it starts the training child, waits for a random step, sleeps a random
   fraction of a save interval (saves are frequent and the state is large enough that a save
   takes a good part of the interval, so some kills land while a save is being written), and
   SIGKILLs the child; now and then it kills the child during start-up or restore instead.
   Each new child restores from ``CheckpointManager.latest_step()``, the newest *complete*
   checkpoint, and continues. After ``--kills`` kills the child is left to finish.

A kill counts as "during a save" when the last save the child had started is not among the
complete checkpoints afterwards (Orbax writes into a temporary directory and renames it when
done; the restarted child checks that ``latest_step()`` skips such leftovers).

It prints the kills, the restores, the kills during saves and the maximum absolute difference
between the final parameters + optimizer state + key of the two runs, and exits non-zero
unless that difference is 0 (and every kill happened). CPU only; all children get the same
``XLA_FLAGS`` and ``JAX_PLATFORMS=cpu``, so every step runs the same compiled program.

Usage::

    python benchmarks/preempt.py [--kills 20] [--steps 16*(kills+1)] [--save-every 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

SIZES = (64, 512, 512, 10)  # ~300k parameters: a save is ~3.6 MB (m, g, h)
EXAMPLES, BATCH = 4096, 1024


# ---------------------------------------------------------------------------------------------
# The training child.


def _child(directory: str, steps: int, save_every: int, seed: int, pause_at: int) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp

    import ivon_jax

    # The data set and the per-epoch shuffles are functions of the seed only.
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(EXAMPLES, SIZES[0])).astype(np.float32)
    teacher = rng.normal(size=(SIZES[0], SIZES[-1])).astype(np.float32)
    ys = np.argmax(xs @ teacher, axis=1).astype(np.int32)
    per_epoch = EXAMPLES // BATCH

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        """The batch at a data position: the epoch's shuffle from (seed, epoch)."""
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng((seed, epoch)).permutation(EXAMPLES)
        idx = order[pos * BATCH : (pos + 1) * BATCH]
        return xs[idx], ys[idx]

    def init_params(key: jax.Array) -> list[dict[str, jax.Array]]:
        keys = jax.random.split(key, len(SIZES) - 1)
        return [
            {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, SIZES[:-1], SIZES[1:], strict=True)
        ]

    def loss_fn(params, x, y):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        logits = x @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = ivon_jax.ivon(optax.cosine_decay_schedule(0.1, steps), ess=float(EXAMPLES), hess_init=0.1)
    vg = ivon_jax.value_and_grad(loss_fn)

    def fresh():
        params = init_params(jax.random.key(seed))
        return {
            "params": params,
            "opt_state": opt.init(params),
            "step": jnp.zeros([], jnp.int32),  # the data position
            "key": jax.random.key_data(jax.random.key(seed + 1)),
        }

    @jax.jit
    def train_step(train, x, y):
        key, sub = jax.random.split(jax.random.wrap_key_data(train["key"]))
        loss, grads, hess = vg(sub, train["params"], train["opt_state"], x, y)
        updates, opt_state = opt.update(grads, train["opt_state"], train["params"], hess=hess)
        return {
            "params": optax.apply_updates(train["params"], updates),
            "opt_state": opt_state,
            "step": train["step"] + 1,
            "key": jax.random.key_data(key),
        }, loss

    def say(*words) -> None:
        print(*words, flush=True)

    ckpt_dir = os.path.join(directory, "ckpt")
    mngr = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True),
    )
    latest = mngr.latest_step()
    complete = (
        sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
        if os.path.isdir(ckpt_dir)
        else []
    )
    leftovers = (
        sorted(n for n in os.listdir(ckpt_dir) if not n.isdigit())
        if os.path.isdir(ckpt_dir)
        else []
    )
    # Orbax must list only complete checkpoints: the newest fully renamed step directory.
    assert latest == (complete[-1] if complete else None), (latest, complete, leftovers)
    if latest is None:
        train = jax.jit(fresh)()
        say("fresh")
    else:
        abstract = jax.eval_shape(fresh)
        train = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        assert int(train["step"]) == latest
        say("restored", latest, "leftovers", ",".join(leftovers) or "-")
    train_step(train, *batch(int(train["step"])))[1].block_until_ready()  # compile
    say("ready", int(train["step"]))

    saving = 0  # the step being saved, while its save is in progress
    while int(train["step"]) < steps:
        train, loss = train_step(train, *batch(int(train["step"])))
        step = int(train["step"])
        say("step", step, float(loss))
        if saving and not mngr.is_saving_in_progress():
            say("saved", saving)
            saving = 0
        if step % save_every == 0:
            say("save", step)
            mngr.save(step, args=ocp.args.StandardSave(train))
            saving = step
        if step == pause_at:
            # Wait here to be killed: a run that is to be killed never finishes first.
            say("paused", step)
            time.sleep(3600)
    mngr.wait_until_finished()
    mngr.close()
    flat = jax.tree_util.tree_flatten_with_path(train)[0]
    np.savez(
        os.path.join(directory, "final.npz"),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat},
    )
    say("done")


# ---------------------------------------------------------------------------------------------
# The supervisor.


class Child:
    """A training child whose stdout lines arrive, time-stamped, on a queue."""

    def __init__(self, directory: str, args: argparse.Namespace, pause_at: int = 0):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.stderr = open(os.path.join(directory, "stderr.log"), "a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                directory,
                "--steps",
                str(args.steps),
                "--save-every",
                str(args.save_every),
                "--seed",
                str(args.seed),
                "--pause-at",
                str(pause_at),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.split()))
        self.lines.put((time.monotonic(), None))

    def next(self, timeout: float | None = None) -> tuple[float, list[str] | None] | None:
        """The next line (None at end of output), or None on timeout."""
        try:
            item = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        if item[1] is not None:
            self.log.append(" ".join(item[1]))
        return item

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        """Reads the rest of the output and waits for the exit."""
        while (item := self.next()) is not None and item[1] is not None:
            pass
        rc = self.proc.wait()
        self.stderr.close()
        return rc


def _run_to_end(directory: str, args: argparse.Namespace) -> Child:
    child = Child(directory, args)
    rc = child.finish()
    if rc != 0 or not child.log or child.log[-1] != "done":
        with open(os.path.join(directory, "stderr.log")) as f:
            sys.exit(f"training child failed (exit {rc}):\n{f.read()[-3000:]}")
    return child


def _complete_steps(directory: str) -> set[int]:
    ckpt = os.path.join(directory, "ckpt")
    return {int(n) for n in os.listdir(ckpt) if n.isdigit()} if os.path.isdir(ckpt) else set()


def _last(log: list[str], word: str) -> int | None:
    hits = [int(line.split()[1]) for line in log if line.startswith(word + " ")]
    return hits[-1] if hits else None


def _leftovers(log: list[str]) -> set[str]:
    names = [line.split()[3] for line in log if line.startswith("restored ")]
    return {n for names_ in names if names_ != "-" for n in names_.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: 16 * (kills + 1))"
    )
    parser.add_argument("--save-every", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--startup-kill-prob",
        type=float,
        default=0.15,
        help="chance that a kill is aimed at start-up / restore",
    )
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--pause-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.steps, args.save_every, args.seed, args.pause_at)
        return
    if args.steps is None:
        args.steps = 16 * (args.kills + 1)
    segment = args.steps // (args.kills + 1)
    if segment < 2 * args.save_every:
        parser.error("--steps must be at least 2 * save_every * (kills + 1)")

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    work = tempfile.mkdtemp(prefix="ivon_preempt_")
    child: Child | None = None
    try:
        ref_dir, run_dir = os.path.join(work, "reference"), os.path.join(work, "preempted")
        os.makedirs(ref_dir)
        os.makedirs(run_dir)
        _run_to_end(ref_dir, args)

        kills = restores = during_save = during_startup = redone = 0
        leftovers: set[str] = set()  # incomplete checkpoint directories seen at restores
        startup_estimate = 3.0
        interval_estimate = 0.2
        while kills < args.kills:
            # This kill's step: random within its segment of the run, after the checkpoint
            # the child will restore; the child pauses two save intervals later (never at the
            # end), so the kill always lands before it finishes.
            resume_at = max(_complete_steps(run_dir) or {0})
            target = int(rng.integers(kills * segment + 1, (kills + 1) * segment))
            target = min(max(target, resume_at + 1), args.steps - 1)
            pause_at = min(target + 2 * args.save_every, args.steps - 1)
            launched = time.monotonic()
            child = Child(run_dir, args, pause_at)
            # Kill during start-up or restore (before the child is ready), now and then.
            if rng.random() < args.startup_kill_prob:
                deadline = launched + rng.uniform(0.1, 1.0) * startup_estimate
                while (left := deadline - time.monotonic()) > 0:
                    item = child.next(timeout=left)
                    if item is None or item[1] is None or item[1][0] == "ready":
                        break
                if not any(line.startswith("ready") for line in child.log):
                    child.kill()
                    kills += 1
                    during_startup += 1
                    restores += any(line.startswith("restored") for line in child.log)
                    leftovers |= _leftovers(child.log)
                    continue
            # Otherwise: wait for a random step in this kill's segment of the run.
            while not any(line.startswith("ready") for line in child.log):
                item = child.next()
                assert item is not None and item[1] is not None, child.log
                startup_estimate = item[0] - launched
            ready = _last(child.log, "ready") or 0
            assert ready == resume_at, (ready, resume_at)
            saves: list[float] = []
            step = ready
            while step < target:
                when, words = child.next()  # type: ignore[misc]
                assert words is not None, child.log
                if words[0] == "step":
                    step = int(words[1])
                elif words[0] == "save":
                    saves.append(when)
            # ...then a random fraction of a save interval, and SIGKILL.
            time.sleep(rng.uniform(0.0, interval_estimate))
            child.kill()
            kills += 1
            restores += any(line.startswith("restored") for line in child.log)
            leftovers |= _leftovers(child.log)
            if len(saves) > 1:
                interval_estimate = float(np.mean(np.diff(saves))) * 1.5
            last_save = _last(child.log, "save")
            if last_save is not None and last_save not in _complete_steps(run_dir):
                during_save += 1
            redone += (_last(child.log, "step") or ready) - max(_complete_steps(run_dir) or {0})
        final = _run_to_end(run_dir, args)
        restores += any(line.startswith("restored") for line in final.log)
        leftovers |= _leftovers(final.log)

        ref = np.load(os.path.join(ref_dir, "final.npz"))
        got = np.load(os.path.join(run_dir, "final.npz"))
        assert sorted(ref.files) == sorted(got.files)
        max_diff = max(
            float(
                np.max(np.abs(ref[k].astype(np.float64) - got[k].astype(np.float64)), initial=0.0)
            )
            for k in ref.files
        )
        identical = all(
            ref[k].dtype == got[k].dtype and np.array_equal(ref[k], got[k]) for k in ref.files
        )
    finally:
        if child is not None and child.proc.poll() is None:
            child.proc.kill()  # the supervisor failed: leave no paused child behind
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"steps: {args.steps}, saves every {args.save_every} steps (async), "
        f"{sum(ref[k].size for k in ref.files if 'params' in k):,} parameters"
    )
    print(
        f"kills: {kills} (during a save: {during_save}, during start-up/restore: {during_startup})"
    )
    print(f"restores: {restores} (incomplete checkpoints skipped: {len(leftovers)})")
    print(f"steps redone after kills: {redone}")
    print(f"max difference: {max_diff}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    if kills != args.kills or max_diff != 0.0 or not identical:
        print("FAIL: the preempted run differs from the uninterrupted one")
        sys.exit(1)


if __name__ == "__main__":
    main()
