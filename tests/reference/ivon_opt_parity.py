"""Parity problem shared by the test vectors and the live check against ``ivon-opt``.

The reference implementation is the PyTorch package ``ivon-opt`` (``pip install
"ivon-jax[reference]"``). Both sides train the same float64 MLP (4-8-3, tanh, mean softmax
cross-entropy) on the same minibatches with the same standard-normal draws ε: on the
reference side ``torch.randn`` is replaced by the stored ε while the optimizer samples.

Regenerate the stored vectors with::

    python tests/reference/ivon_opt_parity.py

which writes ``tests/reference/ivon_opt_vectors.npz``: the problem (data, initial weights,
ε), and for every configuration the trajectory of m, g and h at the steps in ``CHECKPOINTS``.
"""

from __future__ import annotations

import itertools
import pathlib
from typing import Any

import numpy as np

VECTORS = pathlib.Path(__file__).with_name("ivon_opt_vectors.npz")

N, D, HIDDEN, CLASSES, BATCH = 48, 4, 8, 3, 16
STEPS = 120
MAX_SAMPLES = 3
CHECKPOINTS = (1, 2, 3, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120)
SHAPES = ((HIDDEN, D), (HIDDEN,), (CLASSES, HIDDEN), (CLASSES,))  # torch Linear layout
NUM_PARAMS = sum(int(np.prod(s)) for s in SHAPES)
# hess_init is a power of two: the reference fills its initial h through a float32 tensor
# (`torch.as_tensor(hess_init)` under the default dtype), which rounds e.g. 0.3 by 4e-8
# while its learning-rate rescaling uses the exact value.
COMMON = dict(lr=0.05, ess=float(N), hess_init=0.25, beta1=0.9, beta2=0.995)


def configs() -> list[dict[str, Any]]:
    """Every combination the parity test covers (name -> keyword arguments)."""
    out = []
    for wd, rescale, debias, clip, samples in itertools.product(
        (0.0, 1e-3), (True, False), (True, False), (None, 0.2), (1, MAX_SAMPLES)
    ):
        out.append(
            dict(weight_decay=wd, rescale_lr=rescale, debias=debias, clip_radius=clip,
                 mc_samples=samples, hess_approx="price")
        )
    for wd, samples in ((1e-3, 1), (0.0, 2)):
        out.append(
            dict(weight_decay=wd, rescale_lr=True, debias=True, clip_radius=None,
                 mc_samples=samples, hess_approx="gradsq")
        )
    return out


def config_name(cfg: dict[str, Any]) -> str:
    return (
        f"{cfg['hess_approx']}-wd{cfg['weight_decay']:g}-rescale{int(cfg['rescale_lr'])}"
        f"-debias{int(cfg['debias'])}-clip{cfg['clip_radius'] or 0:g}-S{cfg['mc_samples']}"
    )


def make_problem(seed: int = 20240227) -> dict[str, np.ndarray]:
    """Data, batch order, initial weights (torch layout, flattened in order) and ε."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    w_true = rng.normal(size=(D, CLASSES)) * 2.0
    y = np.argmax(x @ w_true + rng.gumbel(size=(N, CLASSES)), axis=1)
    order = np.concatenate([rng.permutation(N) for _ in range(STEPS * BATCH // N + 1)])
    batches = order[: STEPS * BATCH].reshape(STEPS, BATCH)
    init = np.concatenate([rng.normal(size=s).ravel() * 0.5 for s in SHAPES])
    eps = rng.normal(size=(STEPS, MAX_SAMPLES, NUM_PARAMS))
    return dict(x=x, y=y, batches=batches, init=init, eps=eps)


def reference_trajectory(cfg: dict[str, Any], problem: dict[str, np.ndarray]) -> dict[str, Any]:
    """Runs ``ivon.IVON`` on the problem and returns m, g, h at ``CHECKPOINTS``."""
    import ivon
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    ).double()
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(torch.from_numpy(problem["init"][offset : offset + p.numel()]).view_as(p))
            offset += p.numel()
    clip = cfg["clip_radius"] if cfg["clip_radius"] is not None else float("inf")
    opt = ivon.IVON(
        model.parameters(), lr=COMMON["lr"], ess=COMMON["ess"], hess_init=COMMON["hess_init"],
        beta1=COMMON["beta1"], beta2=COMMON["beta2"], weight_decay=cfg["weight_decay"],
        mc_samples=cfg["mc_samples"], hess_approx=cfg["hess_approx"], clip_radius=clip,
        debias=cfg["debias"], rescale_lr=cfg["rescale_lr"],
    )
    x = torch.from_numpy(problem["x"])
    y = torch.from_numpy(problem["y"]).long()
    real_randn = torch.randn
    out: dict[str, list[np.ndarray]] = {"m": [], "g": [], "h": [], "clipped": []}
    for t in range(STEPS):
        idx = torch.from_numpy(problem["batches"][t]).long()
        for s in range(cfg["mc_samples"]):
            eps = torch.from_numpy(problem["eps"][t, s].copy())
            torch.randn = lambda *a, _e=eps, **k: _e.clone()
            try:
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                    loss.backward()
            finally:
                torch.randn = real_randn
        group = opt.param_groups[0]
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.step()
        if t + 1 in CHECKPOINTS:
            m = torch.cat([p.detach().flatten() for p in model.parameters()])
            out["m"].append(m.numpy().copy())
            out["g"].append(group["momentum"].numpy().copy())
            out["h"].append(group["hess"].numpy().copy())
        if cfg["clip_radius"] is not None:
            step = (before - torch.cat([p.detach().flatten() for p in model.parameters()]))
            lr = COMMON["lr"] * ((COMMON["hess_init"] + cfg["weight_decay"])
                                 if cfg["rescale_lr"] else 1.0)
            out["clipped"].append(
                float((step.abs() >= lr * cfg["clip_radius"] * (1 - 1e-9)).double().mean())
            )
    return {
        "m": np.stack(out["m"]), "g": np.stack(out["g"]), "h": np.stack(out["h"]),
        "clipped_fraction": float(np.mean(out["clipped"])) if out["clipped"] else 0.0,
    }


def main() -> None:
    problem = make_problem()
    arrays: dict[str, np.ndarray] = dict(problem)
    for cfg in configs():
        name = config_name(cfg)
        traj = reference_trajectory(cfg, problem)
        for k in ("m", "g", "h"):
            arrays[f"{name}/{k}"] = traj[k]
        print(f"{name:48s} clipped={traj['clipped_fraction']:.3f} "
              f"h[min,max]=[{traj['h'].min():.3g}, {traj['h'].max():.3g}]")
    np.savez_compressed(VECTORS, **arrays)
    print(f"wrote {VECTORS} ({VECTORS.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
