#!/usr/bin/env bash
# One device call (< 8 min): the whole-step benchmark on Sa2VA-4B with random bf16 weights, ours vs
# the design note's literal step, batch 8 (BATCH to change) -> $OUT/bench_step_4b.{json,log}.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pg_train.bench.step --preset sa2va-4b --batch "${BATCH:-8}" --steps 3 --json "$OUT/bench_step_4b.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/bench_step_4b.log"
echo "exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/bench_step_4b.log"
