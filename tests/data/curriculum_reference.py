"""Writes tests/data/curriculum_reference.json: a short curriculum run (tiny preset, 2 supervised
steps then 2 Pseudo-Gumbel steps, its own lr restart and teacher restart) as the one-stream
curriculum computed it BEFORE it became a two-stream schedule (h26), so
`test_the_curriculum_shorthand_reproduces_the_one_stream_curriculum` compares the schedule-driven
run with numbers the new code did not compute.

    PYTHONPATH=<checkout> .venv/bin/python tests/data/curriculum_reference.py OUT_DIR   # from the repo root

Recorded from git main 3b0e391 (objective_kind=curriculum switched objectives inside one loader;
the first recording, from a9544ed, matched the new code too, before a prompt change moved both).
The record holds every step's loss bits, lr, objective and EMA update count, a SHA-256 of the
trainable tensors' bytes at the end, and pg_step_reference's canary (a plain segmentation pass),
so a machine whose kernels round differently is told apart from a changed run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import pg_step_reference  # noqa: E402
from test_train import FAST  # noqa: E402

from pg_train.config import load_config  # noqa: E402
from pg_train.distributed import unwrap  # noqa: E402
from pg_train.train import train  # noqa: E402

ARGS = [
    *FAST,
    "save_every=100",
    "max_steps=4",
    "objective_kind=curriculum",
    "curriculum.supervised_steps=2",
    "curriculum.lr=0.002",
    "optim.lr=0.001",
    "optim.warmup_steps=1",
    "ema.decay=0.9",
]


def run(out_dir: Path, args: list[str] = ARGS) -> dict:
    """The run's record (a test reruns this with the code under test, or with an explicit schedule)."""
    result = train(load_config([], [*args, f"output_dir={out_dir}"]))
    trainable = [p for p in unwrap(result.model).parameters() if p.requires_grad]
    digest = hashlib.sha256(b"".join(p.detach().float().numpy().tobytes() for p in trainable)).hexdigest()
    history = result.history
    return {
        "loss": [float(r["loss"]).hex() for r in history],
        "lr": [r["lr"] for r in history],
        "objective": [r["objective"] for r in history],
        "ema_updates": [r["ema_updates"] for r in history],
        "trainable_sha256": digest,
        "ema_checksum": result.ema.checksum(),
    }


if __name__ == "__main__":
    record = {"canary": pg_step_reference.canary(), "args": ARGS, **run(Path(sys.argv[1])), "torch": torch.__version__}
    (HERE / "curriculum_reference.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(json.dumps(record, indent=1))
