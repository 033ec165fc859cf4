#!/usr/bin/env bash
# The first device call of a session with a GPU (issue 28): one call of at most ~7.5 min, six
# stages in order, each under its own timeout and cut to what is left of TOTAL_S, each writing one
# JSON line to $OUT/stages.jsonl (stage, rc, timed_out, skipped, seconds, cpu_s, limit_s, the last
# output lines). Everything the stages print goes, unfiltered, to $OUT/first_call.log.
#
#   1. smoke      import pg_train on the GPU, the tiny model's teacher captions with the defaults, the versions
#                 (static cache + CUDA graphs on CUDA), TF32 and the precision helpers
#   2. graphs     tests/test_generate.py's CUDA tests: replay == eager on the same bucket (fp32, bf16,
#                 trimmed or not) and replay with exact shapes == static-cache eager (fp32, bf16)
#   3. bench      pg_train.bench.step on Sa2VA-4B (random bf16 weights), gradient checkpointing, batch 8
#                 checked against memcheck's prediction, ours and the literal step, 64- then 16-token
#                 captions (marginal ms per token, ratio to the literal step, MFU)
#   4. memcheck   configs/sa2va_4b_zero2.yaml on one GPU, fast decoding on: predicted vs measured,
#                 the decoding bucket included
#   5. ema        EMA placement=cpu: the update at Sa2VA-4B's sizes from the GPU (1 host thread vs the
#                 default), then the non-blocking-copy race check
#   6. train      4 steps of the real loop: accelerate launch --config_file accelerate_configs/single_gpu.yaml
#                 launch/train.py (tiny preset, Pseudo-Gumbel, bf16 autocast: the teacher under the
#                 student's autocast, graph-captured)
# Files back (<= 8): stages.jsonl, first_call.log, env.txt, bench.json, memcheck.json, ema_cpu.json,
# ema_race.json, train_metrics.jsonl.
#
# Here, once: `bash launch/gpu/fetch_wheels.sh` (.whl/). Device call: command
# "bash launch/gpu/first_call.sh", carry [".whl"], timeout_s 480.
# DRY_RUN=1 runs the same stages on this machine's CPU with tiny shapes (the suite runs it:
# tests/test_first_call.py), each stage's python forked from one server that imported torch & co
# once (launch/gpu/warm_python.py; WARM=0: a fresh interpreter per stage). Knobs: TOTAL_S (440), BENCH_VARIANTS (ours,seed; nographs,eagerbuckets,
# exactshapes locate a bf16 caption divergence, docs/benchmarks.md), CAPTION_LENS (64,16), BATCH (8;
# empty: the largest predicted to fit).
set -uo pipefail
OUT=${OUT:-/tmp/first_call}
mkdir -p "$OUT"
DRY_RUN=${DRY_RUN:-0}
LOG="$OUT/first_call.log"
STAGES="$OUT/stages.jsonl"
: > "$LOG"
: > "$STAGES"
export PYTHONUNBUFFERED=1
START=$(date +%s)
WORK=$(mktemp -d)
if [ "$DRY_RUN" = 1 ]; then
  PY=${PY_DRY:-.venv/bin/python}
  PLAIN_PY=$PY
  ACCELERATE=${ACCELERATE_DRY:-.venv/bin/accelerate}
  TOTAL_S=${TOTAL_S:-600}
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  # One intra-op thread: tiny shapes gain nothing from more, and on shared cores the waiting
  # threads cost more CPU than the work (the smoke stage's two generations: 6.3 s -> 0.1 s CPU).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # the smallest shapes that still run every code path: tiny at 112 px (16 image tokens), batch 1,
  # two caption lengths (the marginal cost per token), top-16, both lengths in one process
  BENCH_ARGS=(--preset tiny-112 --batch "${BATCH:-1}" --steps 1 --caption-lens 2,1 --topk 16 --variants "${BENCH_VARIANTS:-ours}" --device cpu --in-process)
  MEMCHECK_ARGS=(--preset tiny --no-measure)
  EMA_ARGS=(--preset tiny --repeats 2 --device cpu)
  SMOKE_PRESET=tiny-112 SMOKE_PX=112  # on the CPU the first decoding steps of a new shape dominate
  echo "DRY_RUN on $(uname -m): would install .whl/*.whl into /tmp/site" > "$OUT/env.txt"
  if [ "${WARM:-1}" = 1 ]; then
    # torch + transformers + peft + pg_train imported once, by a server that every stage's `python`
    # is forked from (launch/gpu/warm_python.py): each stage stays its own command and process
    # under its own timeout, without ~4 s of CPU of imports each. Started after the exports above
    # (the children see the server's import-time environment). WARM=0: a fresh interpreter each.
    export WARM_PYTHON="$WORK/warm.sock"
    $PY launch/gpu/warm_python.py --serve "$WARM_PYTHON" pg_train.model peft pg_train.objectives.teacher \
      pg_train.memcheck.cli pg_train.bench.ema accelerate.commands.launch >> "$LOG" 2>&1 &
    export WARM_PYTHON_PID=$!
    trap 'kill "$WARM_PYTHON_PID" 2> /dev/null; wait "$WARM_PYTHON_PID" 2> /dev/null' EXIT  # wait: its CPU in /usr/bin/time
    ACCELERATE=${ACCELERATE_DRY:-"$PY launch/gpu/warm_python.py -m accelerate.commands.accelerate_cli"}
    PY="$PY launch/gpu/warm_python.py"
  fi
else
  PY=${PY:-python3}
  PLAIN_PY=$PY
  ACCELERATE=${ACCELERATE:-accelerate}
  TOTAL_S=${TOTAL_S:-440}
  ls .whl/*.whl > /dev/null || { echo "no .whl/*.whl: run launch/gpu/fetch_wheels.sh here and carry .whl"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  # batch 8: the issue's goals are stated there; memcheck still checks it fits (23.4 GiB predicted
  # with checkpointing); BATCH= (empty) lets the bench take the largest predicted to fit (16).
  BENCH_ARGS=(--preset sa2va-4b --steps 2 --caption-lens "${CAPTION_LENS:-64,16}" --variants "${BENCH_VARIANTS:-ours,seed}" --no-cudnn-attention)
  [ -n "${BATCH-8}" ] && BENCH_ARGS+=(--batch "${BATCH-8}")
  MEMCHECK_ARGS=(--config configs/sa2va_4b_zero2.yaml --world-size 1 --zero-stage 0 --steps 2)
  EMA_ARGS=(--repeats 3 --stages 1 4)  # k=1 (today) and k=4 (the <= 10% update): the 60 s stage fits
  SMOKE_PRESET=tiny SMOKE_PX=448
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/env.txt" 2>&1
fi
git log -1 --format='commit %H %cd' >> "$OUT/env.txt" 2> /dev/null
# (the versions line is the smoke stage's: a Python start-up with torch and transformers costs seconds)

# stage NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of TOTAL_S), output to the log,
# one JSON line to stages.jsonl (wall seconds and the CPU seconds the stage's processes used:
# under load the wall time says little); a stage with under 10 s left is skipped (and says so).
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_S - ($(date +%s) - START)))
  local budget=$((limit < left ? limit : left))
  local part="$WORK/$name.out" rc=0 skipped=false t0 t1 cpu0 cpu1
  t0=$(date +%s.%N)
  times > "$WORK/$name.cpu0"  # user and system time of this shell's finished children (no subshell: its own are 0)
  cpu0=$(tail -1 "$WORK/$name.cpu0")
  if [ "$budget" -lt 10 ]; then
    skipped=true rc=-1
    echo "skipped: ${left}s left of TOTAL_S=$TOTAL_S" > "$part"
  else
    echo "=== stage $name (limit ${budget}s): $*" >> "$LOG"
    WARM_CPU_FILE="$WORK/$name.warm_cpu" timeout -k 10 "$budget" "$@" > "$part" 2>&1
    rc=$?
  fi
  t1=$(date +%s.%N)
  times > "$WORK/$name.cpu1"
  cpu1=$(tail -1 "$WORK/$name.cpu1")
  cat "$part" >> "$LOG"
  NAME=$name RC=$rc SKIPPED=$skipped T0=$t0 T1=$t1 CPU0=$cpu0 CPU1=$cpu1 LIMIT=$budget PART=$part WARM_CPU="$WORK/$name.warm_cpu" $PLAIN_PY - >> "$STAGES" << 'EOF'
import json, os, re

def cpu(text):  # bash `times`: "0m1.234s 0m0.056s" (user, system)
    return sum(60 * float(m) + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", text))

# DRY_RUN's forked stages (warm_python.py): their CPU is the server's children's, written here
warm = sum(map(float, open(os.environ["WARM_CPU"]).read().split())) if os.path.exists(os.environ["WARM_CPU"]) else 0.0

lines = [l.rstrip() for l in open(os.environ["PART"], errors="replace") if l.strip()]
rc = int(os.environ["RC"])
print(json.dumps({
    "stage": os.environ["NAME"], "rc": rc, "timed_out": rc in (124, 137), "skipped": os.environ["SKIPPED"] == "true",
    "seconds": round(float(os.environ["T1"]) - float(os.environ["T0"]), 1), "limit_s": int(os.environ["LIMIT"]),
    "cpu_s": round(cpu(os.environ["CPU1"]) - cpu(os.environ["CPU0"]) + warm, 1),
    "tail": lines[-4:],
}))
EOF
  echo "stage $name: rc $rc" | tee -a "$LOG"
}

stage smoke 60 $PY -c "
import sys, torch, transformers
with open('$OUT/env.txt', 'a') as env:
    print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, file=env)
from pg_train.accel import build_accelerator
from pg_train.model import build_model
from pg_train.model.decoding import graph_decode
from pg_train.model.text.regions import region_cells
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema
build_accelerator()  # TF32 on, as training builds it
device = 'cuda' if torch.cuda.is_available() else 'cpu'
model = build_model('$SMOKE_PRESET', seed=0).eval().to(device)
pixel_values = torch.randn(2, 3, $SMOKE_PX, $SMOKE_PX, device=device)
masks = torch.zeros(2, $SMOKE_PX, $SMOKE_PX)
masks[:, 100 * $SMOKE_PX // 448 : 300 * $SMOKE_PX // 448, 120 * $SMOKE_PX // 448 : 260 * $SMOKE_PX // 448] = 1
cells, _ = region_cells(masks, model.grid_size)
for _ in range(2):
    ids, lengths = generate_pseudo_tokens_with_ema(model, pixel_values, cells, PseudoGumbelConfig(max_caption_len=8))
print('device', device, 'tf32', torch.backends.cuda.matmul.allow_tf32, 'captions', ids.shape, 'decode stats', dict(graph_decode.STATS))
"

stage graphs 100 $PY -m pytest -q -p no:cacheprovider tests/test_generate.py -k "cuda_graph" -rs

stage bench 170 $PY -m pg_train.bench.step "${BENCH_ARGS[@]}" --gradient-checkpointing --json "$OUT/bench.json"

stage memcheck 130 $PY -m pg_train.memcheck "${MEMCHECK_ARGS[@]}" --json "$OUT/memcheck.json"

if [ "$DRY_RUN" = 1 ]; then
  stage ema 40 $PY launch/gpu/ema_cpu_check.py --timing "${EMA_ARGS[@]}" --json "$OUT/ema_cpu.json"
else
  stage ema 60 bash -c "$PY launch/gpu/ema_cpu_check.py --timing ${EMA_ARGS[*]} --json $OUT/ema_cpu.json; a=\$?
    $PY launch/gpu/ema_cpu_check.py --steps 20 --json $OUT/ema_race.json; b=\$?; exit \$((a > b ? a : b))"
fi

RUN="$WORK/run"
stage train 90 $ACCELERATE launch --config_file accelerate_configs/single_gpu.yaml --num_cpu_threads_per_process 1 \
  launch/train.py --max-steps 4 --output-dir "$RUN" objective_kind=pseudo_gumbel batch_size=2 \
  objective.max_caption_len=8 objective.topk=16 data.num_samples=16 eval_every=0 report=false tensorboard=false \
  progress=false save_every=1000
[ -f "$RUN/metrics.jsonl" ] && cp "$RUN/metrics.jsonl" "$OUT/train_metrics.jsonl"
rm -rf "$WORK"
echo "first_call: $(($(date +%s) - START)) s; stages:" | tee -a "$LOG"
cat "$STAGES"
