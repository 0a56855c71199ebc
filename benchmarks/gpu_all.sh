#!/usr/bin/env bash
# The GPU measurements docs/speed.md reports, in one run from the repository root, each step under
# its own time limit (seconds) so that one slow compilation cannot use up the others' time:
#
#   benchmarks/gpu_all.sh [SEPVIT_REPO]
#
# 1. DeiT-S train step, bf16, batch 256, with XLA's and cuDNN's attention, and with
#    dataset.on_accelerator (resampling and DeiT's augmentation in the step), beside timm under
#    torch.compile (benchmarks/gpu.py; appends to benchmarks/results/gpu.md);
# 2. token reduction inference, bf16, batch 64 and 256 (benchmarks/results/token_reduction_gpu.md);
# 3. SepViT-T train step beside the authors' module (SEPVIT_REPO: a liwei109/SepViT checkout).
# Needs jax with CUDA, flax, optax, ml_collections, torch and timm; not TensorFlow. On a GPU machine
# without a package index, install ml_collections elsewhere with
# `pip install --no-deps --target .devdeps ml_collections` and copy .devdeps/ along: it is put on
# PYTHONPATH here.
set -u
sepvit=${1:-}
export PYTHONPATH=".devdeps${PYTHONPATH:+:$PYTHONPATH}"
python -c "import ml_collections" || { echo "ml_collections is missing (see above)"; exit 1; }
step() {
  local limit=$1
  shift
  echo "== $* (limit ${limit} s)"
  timeout "$limit" "$@" || echo "== exit status $?: $*"
}
step 260 python benchmarks/gpu.py --sections train --models deit_small_patch16_224
step 120 python benchmarks/token_reduction.py --platform gpu --dtype bfloat16 --batches 64,256 \
  --groups deit_small_patch16_224 --out benchmarks/results/token_reduction_gpu.md
step 240 python benchmarks/gpu.py --sections train --models sepvit_t --steps 10 --no-on-accelerator \
  ${sepvit:+--sepvit-repo "$sepvit"}
