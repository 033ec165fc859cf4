"""The job's own processes, by files the job writes: signals reach this job and no other.

A launcher (`pg_train.launcher`, one per node) sets `PG_TRAIN_JOB_DIR` to a directory of its
own; each training process registers there (`worker-rank{R}.json`: pid and kernel start time)
and records its exit code (`worker-rank{R}.exit`); the launcher registers itself too
(`launcher.json`). `signal_job(dir, sig)` signals the launcher of that directory (which forwards
to its workers, also to those that register later) or, without one, the registered workers —
each only if it is still the process that registered (pid and start time), never by a pattern
over the machine's command lines (which stopped every pg_train job on a node).

    python -m pg_train.job signal DIR USR1     # what launch/slurm/signal_workers.sh runs
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from .procinfo import is_running, process_start

JOB_DIR_ENV = "PG_TRAIN_JOB_DIR"
LAUNCHER_FILE = "launcher.json"


def _record(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "pid_start": process_start(pid)}))
    tmp.replace(path)  # whole or absent: a reader never sees half a record


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def register_worker() -> Path | None:
    """In a training process under a pg_train launcher: its pid file. Also asks the kernel for
    SIGTERM when the parent (the `accelerate launch` process) dies, so a launcher killed
    outright never leaves its worker training on alone: the worker checkpoints and exits 75."""
    die_with_parent()
    directory = os.environ.get(JOB_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / f"worker-rank{_rank()}.json"
    _record(path, os.getpid())
    return path


_EARLY_STOP: list[int] = []


def catch_stop_signals_early() -> None:
    """From the first moment of a training process: SIGTERM/SIGUSR1 while it is still importing
    and building (minutes for a large model) are remembered, not fatal; the run's stop flag
    (pg_train.train.StopFlag) takes them over, so the run still ends with a checkpoint and 75."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: _EARLY_STOP.append(signum))


def stop_requested_early() -> bool:
    return bool(_EARLY_STOP)


def record_exit(code: int) -> None:
    """This worker's exit code, for the launcher (accelerate's own launcher reports 1 for any failure)."""
    directory = os.environ.get(JOB_DIR_ENV)
    if directory:
        (Path(directory) / f"worker-rank{_rank()}.exit").write_text(str(int(code)))


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def register_launcher(directory: Path) -> None:
    _record(directory / LAUNCHER_FILE, os.getpid())


def _live(path: Path) -> int | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid, start = record.get("pid"), record.get("pid_start")
    return pid if isinstance(pid, int) and is_running(pid, start) else None


def live_workers(directory: Path) -> list[int]:
    """Pids of the registered workers of this job still running."""
    return [pid for path in sorted(directory.glob("worker-rank*.json")) if (pid := _live(path)) is not None]


def worker_exit_codes(directory: Path) -> dict[int, int | None]:
    """rank -> recorded exit code (None: registered, no code: it died without exiting normally)."""
    codes = {}
    for path in directory.glob("worker-rank*.json"):
        rank = int(path.stem.removeprefix("worker-rank"))
        exit_file = path.with_suffix(".exit")
        codes[rank] = int(exit_file.read_text()) if exit_file.is_file() else None
    return codes


def signal_job(directory: Path, sig: int) -> list[int]:
    """Send `sig` to the job of `directory`: its live launcher, else its live workers. Returns
    the pids signalled (empty: nothing of this job is running)."""
    launcher = _live(directory / LAUNCHER_FILE)
    targets = [launcher] if launcher is not None and launcher != os.getpid() else live_workers(directory)
    for pid in targets:
        os.kill(pid, sig)
    return targets


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "signal":
        print("usage: python -m pg_train.job signal JOB_DIR SIGNAL (e.g. USR1, TERM)", file=sys.stderr)
        return 2
    directory, name = Path(argv[1]), argv[2].upper()
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        print(f"unknown signal {argv[2]!r}", file=sys.stderr)
        return 2
    pids = signal_job(directory, sig)
    print(
        f"[pg_train/job] {directory}: sent {sig.name} to {pids}"
        if pids
        else f"[pg_train/job] {directory}: nothing running"
    )
    return 0 if pids else 1


if __name__ == "__main__":
    sys.exit(main())
