#!/bin/bash
# Runs once per node (srun --overlap from train.sbatch): send a signal to THIS job's training on
# this node, found by the pid files the job wrote in $PG_TRAIN_JOB_DIR (the launcher's, which
# forwards to its workers; else the workers'), each checked to still be the process that wrote
# it. Never a pattern over the node's command lines: that stopped every pg_train job on the node.
SIG=${1:-USR1}
: "${PG_TRAIN_JOB_DIR:?not set: the job directory train.sbatch exports}"
exec "${PYTHON:-python}" -m pg_train.job signal "$PG_TRAIN_JOB_DIR" "$SIG"
