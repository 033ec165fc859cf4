#!/usr/bin/env bash
# One device call (< 5 min): torch.profiler tables of one warm step, ours and the literal step -> $OUT/profile_*.txt
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
python3 launch/gpu/profile_step.py "${OUT:-/tmp}" --batch "${BATCH:-8}" 2>&1 | cut -c1-220
