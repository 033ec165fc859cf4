#!/usr/bin/env bash
# The learning recipe and its ablation on the synthetic data (issue 9), from random weights:
#   stage 1  configs/learn_tiny_warmup.yaml   supervised warm-up          -> runs/learn_tiny/warmup
#   stage 2  configs/learn_tiny_pg.yaml       Pseudo-Gumbel from stage 1  -> runs/learn_tiny/pg
#   ablation stage 2 with mask_ratio 0, tau 0.3, tau 1.0                  -> runs/learn_tiny/pg_*
#   control  stage 1 continued 600 steps (ground-truth text)              -> runs/learn_tiny/sup_more
# then the table and docs/learning/curves.png (python -m pg_train.report --compare). SKIP_ABLATION=1 runs the recipe only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { local dir=$1; shift; rm -rf "$dir"; "$PY" launch/train.py "$@" output_dir="$dir" progress=false; }
SECONDS=0
run runs/learn_tiny/warmup --config configs/learn_tiny_warmup.yaml
run runs/learn_tiny/pg --config configs/learn_tiny_pg.yaml
echo "[learn_tiny] recipe (warm-up + Pseudo-Gumbel) took ${SECONDS} s"
if [ -z "${SKIP_ABLATION:-}" ]; then
  run runs/learn_tiny/pg_mask0 --config configs/learn_tiny_pg.yaml objective.mask_ratio=0.0
  run runs/learn_tiny/pg_tau0.3 --config configs/learn_tiny_pg.yaml objective.tau=0.3
  run runs/learn_tiny/pg_tau1.0 --config configs/learn_tiny_pg.yaml objective.tau=1.0
  # control: the warm-up continued for as many steps, with ground-truth text and stage 2's schedule
  run runs/learn_tiny/sup_more --config configs/learn_tiny_warmup.yaml model.init_from=runs/learn_tiny/warmup/checkpoints/step-00002000 \
    max_steps=600 eval_every=100 save_every=600 optim.lr=0.0003 ema.decay=0.99
fi
runs=("warm-up only=runs/learn_tiny/warmup" "+warm-up + Pseudo-Gumbel=runs/learn_tiny/pg")
[ -z "${SKIP_ABLATION:-}" ] && runs+=("+PG mask_ratio 0=runs/learn_tiny/pg_mask0" "+PG tau 0.3=runs/learn_tiny/pg_tau0.3" "+PG tau 1.0=runs/learn_tiny/pg_tau1.0" "+warm-up continued (supervised)=runs/learn_tiny/sup_more")
"$PY" -m pg_train.report --out docs/learning --compare "${runs[@]}"
