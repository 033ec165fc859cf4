#!/usr/bin/env bash
# One device call: install the carried wheels (.whl: transformers 5.24, peft, sam2, hydra, ...),
# then sweep Sa2VA-4B steps over batch sizes on the GPU; the report lands in $OUT/real_step.json.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 launch/gpu/real_step.py "${OUT:-/tmp}/real_step.json" --batches "${BATCHES:-1,4,8}" 2>&1 | tee "${OUT:-/tmp}/real_step.log"
