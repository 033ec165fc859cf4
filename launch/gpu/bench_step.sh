#!/usr/bin/env bash
# One device call (~6-8 min on an H200): the whole-step benchmark on Sa2VA-4B with random bf16
# weights, the largest batch memcheck predicts to fit (BATCH to set one; refused if predicted not
# to fit), gradient checkpointing (CKPT=0: off), captions of 64 then 16 tokens (CAPTION_LENS;
# the summary gives the marginal decoding cost per token), cuDNN attention off
# (training's default), for our step with the teacher decoding replayed from CUDA graphs (`ours`:
# objective.static_cache + cuda_graphs), the same without graphs (`nographs`) and the design
# note's literal step (`seed`), each variant with one more step under
# torch.cuda.set_sync_debug_mode("warn") (host syncs per stage) -> $OUT/bench_step_4b_graphs.{json,log};
# then, if the image has pytest, the CUDA test of capture/replay against eager decoding on the tiny
# model -> $OUT/graph_replay_test.log. Every command runs under a timeout so the call ends in time;
# the JSON is rewritten after every variant, so a killed run keeps what it measured. The logs are
# raw (nothing filtered: the warning that says why a capture fell back stays).
#
# Before the call, here: `bash launch/gpu/fetch_wheels.sh` (once), then run it with carry [".whl"]:
#   bash launch/gpu/bench_step.sh
# DRY_RUN=1 runs the same logic on this machine's CPU (tiny preset, short captions, no install).
# Knobs: BATCH, CKPT, STEPS (3: one warm-up + 2 timed), CAPTION_LENS (64,16), STEP_VARIANTS
# (ours,nographs,seed), BENCH_TIMEOUT (400 s), TEST_TIMEOUT (60 s), CUDNN=1 (PyTorch's default
# attention backends instead), PRESET (sa2va-4b).
set -uo pipefail
OUT=${OUT:-/tmp}
DRY_RUN=${DRY_RUN:-0}
PY=${PY:-python3}
if [ "$DRY_RUN" = 1 ]; then
  PY=${PY_DRY:-.venv/bin/python}
  PRESET=${PRESET:-tiny}
  BATCH=${BATCH:-2}
  STEPS=${STEPS:-2}
  CAPTION_LENS=${CAPTION_LENS:-8,4}
  EXTRA=(--device cpu)
  echo "DRY_RUN: would install: $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl" | tee "$OUT/gpu.txt"
else
  ls .whl/*.whl > /dev/null || { echo "no .whl/*.whl: run launch/gpu/fetch_wheels.sh here and carry .whl"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  EXTRA=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
export PYTHONUNBUFFERED=1
[ "${CUDNN:-0}" = 1 ] || EXTRA+=(--no-cudnn-attention)
[ "${CKPT:-1}" = 1 ] && EXTRA+=(--gradient-checkpointing)
[ -n "${BATCH:-}" ] && EXTRA+=(--batch "$BATCH")
git log -1 --format='commit %H %cd' 2> /dev/null | tee -a "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

log="$OUT/bench_step_4b_graphs.log"
timeout -k 10 "${BENCH_TIMEOUT:-400}" $PY -m pg_train.bench.step --preset "${PRESET:-sa2va-4b}" \
  --steps "${STEPS:-3}" --caption-lens "${CAPTION_LENS:-64,16}" --variants "${STEP_VARIANTS:-ours,nographs,seed}" \
  --sync-debug "${EXTRA[@]}" --json "$OUT/bench_step_4b_graphs.json" 2>&1 | tee "$log"
echo "exit code: ${PIPESTATUS[0]} (124: timed out; the JSON holds the variants that finished)" | tee -a "$log"

test_log="$OUT/graph_replay_test.log"
if $PY -c "import pytest" 2> /dev/null; then
  timeout -k 5 "${TEST_TIMEOUT:-60}" $PY -m pytest -q -p no:cacheprovider tests/test_generate.py \
    -k "cuda_graph_replay or graph_step_equals" 2>&1 | tail -15 | tee "$test_log"
  echo "exit code: ${PIPESTATUS[0]}" | tee -a "$test_log"
else
  echo "pytest not in this image: the capture/replay test was not run" | tee "$test_log"
fi
