#!/usr/bin/env bash
# One device call (< 8 min): the whole-step benchmark on Sa2VA-4B with random bf16 weights, ours vs
# the design note's literal step, batch 8 (BATCH to change), with PyTorch's default attention
# backends and with cuDNN attention off -> $OUT/bench_step_4b{,_nocudnn}.{json,log}
# (VARIANTS="nocudnn" for the second only, VARIANTS="default" for the first only;
# STEP_VARIANTS=ours,untrimmed,seed adds our step without the last-layer trim).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
for name in ${VARIANTS:-default nocudnn}; do
  variant=""; flag=""; [ "$name" = nocudnn ] && variant="_nocudnn" && flag="--no-cudnn-attention"
  python3 -m pg_train.bench.step --preset sa2va-4b --batch "${BATCH:-8}" --steps "${STEPS:-3}" --variants "${STEP_VARIANTS:-ours,seed}" $flag --json "$OUT/bench_step_4b$variant.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/bench_step_4b$variant.log"
  echo "exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_step_4b$variant.log"
done
