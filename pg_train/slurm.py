"""Render and submit `launch/slurm/train.sbatch`.

    python -m pg_train.slurm submit --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        [--dry-run] -- --config my.yaml --output-dir /shared/runs/x optim.lr=2e-5

`--dry-run` prints the rendered script instead of submitting it. Everything after `--` goes to
`launch/train.py` (the script always adds `--resume auto`, so a requeued job continues).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "launch" / "slurm" / "train.sbatch"


def render(
    *,
    nodes: int,
    gpus_per_node: int,
    train_args: list[str],
    partition: str | None = None,
    time: str = "24:00:00",
    job_name: str = "pg_train",
    cpus_per_task: int | None = None,
    signal_seconds: int = 300,
    max_restarts: int = 5,
    template: Path = TEMPLATE,
) -> str:
    """The sbatch script for N nodes x G GPUs with the training arguments baked in."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least 1 node and 1 GPU per node, got {nodes} x {gpus_per_node}")
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", time):
        raise ValueError(f"--time {time!r}: expected SLURM time like 24:00:00 or 2-00:00:00")
    text = template.read_text()
    header = {
        "job-name": job_name,
        "nodes": str(nodes),
        "gpus-per-node": str(gpus_per_node),
        "time": time,
        "signal": f"B:USR1@{signal_seconds}",
    }
    if cpus_per_task:
        header["cpus-per-task"] = str(cpus_per_task)
    for key, value in header.items():
        text, n = re.subn(rf"^#SBATCH --{key}=.*$", f"#SBATCH --{key}={value}", text, flags=re.M)
        if n != 1:
            raise ValueError(f"template {template}: expected one '#SBATCH --{key}=' line, found {n}")
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    settings = [f"export GPUS_PER_NODE={gpus_per_node}", f"export MAX_RESTARTS={max_restarts}"]
    if train_args:
        settings.append("set -- " + " ".join(shlex.quote(a) for a in train_args))
    return text.replace("# @TRAIN_ARGS@", "\n".join(extra + settings))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m pg_train.slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="render launch/slurm/train.sbatch and sbatch it")
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--partition")
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--job-name", default="pg_train")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--signal-seconds", type=int, default=300, help="USR1 this long before the time limit")
    s.add_argument("--max-restarts", type=int, default=5)
    s.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    args = parser.parse_args(argv)
    script = render(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        train_args=train_args,
        partition=args.partition,
        time=args.time,
        job_name=args.job_name,
        cpus_per_task=args.cpus_per_task,
        signal_seconds=args.signal_seconds,
        max_restarts=args.max_restarts,
    )
    if args.dry_run:
        print(script)
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", prefix="pg_train-", dir=Path.cwd(), delete=False) as f:
        f.write(script)
    result = subprocess.run(["sbatch", f.name], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode == 0:
        print(f"[pg_train/slurm] submitted {f.name}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
