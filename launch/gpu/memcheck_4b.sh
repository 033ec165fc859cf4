#!/usr/bin/env bash
# One device call (< 8 min): Sa2VA-4B with random bf16 weights on one GPU, a few real steps,
# predicted vs measured per component and phase -> $OUT/memcheck_b1.json (+ a batch-4 run with
# gradient checkpointing), logs beside them.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pg_train.memcheck --batch-size 1 --steps 2 --json "$OUT/memcheck_b1.json" 2>&1 | tee "$OUT/memcheck_b1.log"
echo "exit code (batch 1): ${PIPESTATUS[0]}" | tee -a "$OUT/memcheck_b1.log"
python3 -m pg_train.memcheck --batch-size 4 --gradient-checkpointing --steps 2 --json "$OUT/memcheck_b4_ckpt.json" 2>&1 | tee "$OUT/memcheck_b4_ckpt.log"
echo "exit code (batch 4, checkpointing): ${PIPESTATUS[0]}" | tee -a "$OUT/memcheck_b4_ckpt.log"
