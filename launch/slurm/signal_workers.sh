#!/bin/bash
# Runs once per node (srun --overlap from train.sbatch): send a signal to this node's training
# workers — the `python -u .../launch/train.py` processes started by accelerate/torchrun — and not
# to the launcher itself, which would die on USR1 and orphan them mid-checkpoint.
SIG=${1:-USR1}
pkill "-$SIG" -f -- "python[0-9.]* -u .*launch/train\.py" && echo "[pg_train/slurm] $(hostname): sent $SIG to the training workers" \
    || echo "[pg_train/slurm] $(hostname): no training worker to signal"
