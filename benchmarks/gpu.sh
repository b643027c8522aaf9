#!/usr/bin/env bash
# Run the performance suite and a short GPT pretraining comparison on an accelerator.
# Needs a CUDA/TPU build of jaxlib (e.g. `pip install -U "jax[cuda12]"`); about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print(jax.devices())"
python benchmarks/perf.py --reps 50 --out benchmarks/results/gpu
python benchmarks/gpt_pretrain.py --layers 6 --width 384 --heads 6 --seq 256 --batch 64 \
  --steps 600 --eval-every 200 --dtype bfloat16
