"""How long `pg-train --help` takes in two source trees, alternated (issue 29: parse before torch).

    .venv/bin/python scripts/time_help.py --before /path/to/older/tree --rounds 5 --json docs/measurements/cli_help_time.json

Each round runs `python -c "from pg_train.cli import main; main(['--help'])"` once with each tree
first on PYTHONPATH (what the `pg-train` console script does), so both see the same machine load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELP = "from pg_train.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"


def time_help(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    # cwd=tree: `python -c` puts the working directory first on sys.path
    subprocess.run([sys.executable, "-c", HELP], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def git(*args: str, tree: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the older tree (a checkout or worktree)")
    parser.add_argument("--after", type=Path, default=ROOT, help="the newer tree (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the times and the stamp here")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            times[name].append(time_help(getattr(args, name)))
    report = {
        "command": "python -c \"from pg_train.cli import main; main(['--help'])\" (PYTHONPATH=tree)",
        "before_commit": git("rev-parse", "HEAD", tree=args.before),
        "after_commit": git("rev-parse", "HEAD", tree=args.after),
        "after_dirty": bool(git("status", "--porcelain", "--untracked-files=no", tree=args.after)),
        "seconds": times,
        "median_s": {name: statistics.median(v) for name, v in times.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(report["median_s"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
