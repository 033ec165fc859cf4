"""How long commands take in two source trees, alternated: wall and CPU seconds (issue 29: parse
before torch; issue 28: import costs and first_call.sh's dry run).

    .venv/bin/python scripts/time_help.py --before /path/to/older/tree --rounds 5 --json docs/measurements/cli_help_time.json
    .venv/bin/python scripts/time_help.py --before /tmp/before --rounds 3 \\
        --command 'first_call=DRY_RUN=1 bash launch/gpu/first_call.sh' --command 'memcheck=.venv/bin/python -m pg_train.memcheck --help'

Each round runs every command once in each tree (`bash -c COMMAND`, working directory and
PYTHONPATH the tree, OUT a fresh folder), so both see the same machine load; without --command
the command is `pg-train --help` (`python -c "from pg_train.cli import main; main(['--help'])"`).
CPU seconds are the user + system time of the command and every process it waited for (under
load the wall time says little). A command that leaves `$OUT/stages.jsonl` (first_call.sh) has
its last round's stage lines kept in the report.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELP = "from pg_train.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
DEFAULT = f"help={shlex.quote(sys.executable)} -c {shlex.quote(HELP)}"


def time_command(command: str, tree: Path) -> tuple[float, float, list[dict] | None]:
    """(wall s, CPU s, the stage lines of $OUT/stages.jsonl if the command wrote one)."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "OUT": out}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        # cwd=tree: `python -c` puts the working directory first on sys.path
        subprocess.run(["bash", "-c", command], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        stages = Path(out, "stages.jsonl")
        lines = [json.loads(line) for line in stages.read_text().splitlines()] if stages.exists() else None
    return wall, cpu, lines


def git(*args: str, tree: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True).stdout.strip()


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the older tree (a checkout or worktree)")
    parser.add_argument("--after", type=Path, default=ROOT, help="the newer tree (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--command", action="append", metavar="NAME=COMMAND", help="a bash command line to time (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="write the times and the stamp here")
    args = parser.parse_args(argv)
    commands = dict(spec.split("=", 1) for spec in args.command or [DEFAULT])
    trees = {"before": args.before, "after": args.after}
    runs = {name: {tree: {"wall_s": [], "cpu_s": [], "stages": None} for tree in trees} for name in commands}
    load_at_start = os.getloadavg()
    for _ in range(args.rounds):
        for name, command in commands.items():
            for tree, path in trees.items():
                wall, cpu, stages = time_command(command, path)
                record = runs[name][tree]
                record["wall_s"].append(round(wall, 3))
                record["cpu_s"].append(round(cpu, 3))
                record["stages"] = stages
    report = {
        "commands": commands,
        "environment": "PYTHONPATH=<tree>, cwd <tree>, OUT=<fresh folder>; run with `bash -c`",
        "before_commit": git("rev-parse", "HEAD", tree=args.before),
        "after_commit": git("rev-parse", "HEAD", tree=args.after),
        "after_dirty": bool(git("status", "--porcelain", "--untracked-files=no", tree=args.after)),
        "runs": runs,
        "median": {
            name: {tree: {k: statistics.median(r[k]) for k in ("wall_s", "cpu_s")} for tree, r in by_tree.items()}
            for name, by_tree in runs.items()
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": versions(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "nice": os.nice(0),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(report["median"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
