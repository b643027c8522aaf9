#!/usr/bin/env bash
# The performance suite and a GPT pretraining comparison (AdamW vs IVON) on one accelerator.
# Needs a CUDA or TPU build of jaxlib (e.g. `pip install -U "jax[cuda12]"`). Sized to finish
# within 10 minutes on one GPU (it has not been run on one yet). Writes
# benchmarks/results/gpu/ (perf.md and .png, gpt_pretrain.csv, .png and .txt), apart from the
# CPU results, and prints the tables at the end.
#
#   bash benchmarks/gpu.sh                 # on the accelerator
#   bash benchmarks/gpu.sh --smoke [DIR]   # tiny sizes on any device, output in DIR (a check
#                                          # of the script itself; tests/test_benchmarks.py)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu
perf_args=(--reps 50)
gpt_args=(--layers 6 --width 384 --heads 6 --seq 256 --batch 64 --steps 600 --eval-every 200
          --dtype bfloat16)
if [[ "${1:-}" == "--smoke" ]]; then
  out=${2:-$(mktemp -d)}
  perf_args=(--smoke)
  gpt_args=(--layers 1 --width 32 --heads 2 --seq 32 --batch 8 --steps 6 --eval-every 3
            --eval-batches 1 --seeds 0 --corpus-mb 0.25)
fi
mkdir -p "$out"
python -c "import jax; print('devices:', jax.devices())"
python benchmarks/perf.py "${perf_args[@]}" --out "$out"
python benchmarks/gpt_pretrain.py "${gpt_args[@]}" --out "$out" | tee "$out/gpt_pretrain.txt"
echo
cat "$out/perf.md"
