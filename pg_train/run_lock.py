"""One run per output directory: `OUTPUT_DIR/.pg_train.lock`, taken before anything is written.

Two runs writing one directory truncate each other's metrics.jsonl and interleave checkpoints,
and both report success. The lock file holds the owner's pid, its kernel start time, the host
and the wall-clock start; it is created with O_EXCL, so exactly one run holds it. A second run
is refused (`OutputDirLocked`, exit code 73) naming the owner. A lock whose owner is gone (same
host, that pid no longer the process that wrote it: killed with -9, machine crash before a
reboot's /tmp cleanup) is stale and is taken over, saying so. A lock from another host cannot be
checked from here: it is refused, and the message says how to remove it if that run is gone.

Taking over a stale lock runs under `flock` on the directory itself, so two runs recovering the
same stale lock at once cannot both win.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

from .procinfo import is_running, process_start

LOCK_NAME = ".pg_train.lock"


class OutputDirLocked(RuntimeError):
    """Another run owns the output directory (nothing was written)."""


class OutputLock:
    """A held lock; `release()` removes the file if it is still this run's (idempotent)."""

    def __init__(self, path: Path, owner: dict):
        self.path = path
        self.owner = owner

    def release(self) -> None:
        if self.owner is None:
            return
        try:
            if _read(self.path).get("token") == self.owner["token"]:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.owner = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unreadable lock file"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _stale_reason(holder: dict, host: str) -> str | None:
    """Why the holder is known to be gone; None while it may still be running."""
    if not holder:
        return None  # being written by a run that has not finished writing it, or damaged: not ours to judge
    if holder.get("host") != host:
        return None
    pid, start = holder.get("pid"), holder.get("pid_start")
    if not isinstance(pid, int) or not is_running(pid, start if isinstance(start, int) else None):
        return f"its owner ({_describe(holder)}) is no longer running"
    return None


def acquire(output_dir: str | Path, say=print) -> OutputLock:
    """Take `output_dir`'s lock (creating the directory), or raise `OutputDirLocked`."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    host, pid = socket.gethostname(), os.getpid()
    owner = {
        "pid": pid,
        "pid_start": process_start(pid),
        "host": host,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "token": secrets.token_hex(8),
    }
    guard = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # every acquirer on this host: create-or-recover is one step
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                reason = _stale_reason(holder, host)
                if reason is None:
                    raise OutputDirLocked(
                        f"{directory} is in use by another pg_train run ({_describe(holder)}; lock file {path}). "
                        f"Use another --output-dir, or wait for that run to end. If it is gone (e.g. it ran on "
                        f"another machine and was killed), delete {path} and run again."
                    ) from None
                say(f"[pg_train] {path}: stale lock taken over ({reason})")
                path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            return OutputLock(path, owner)
        raise OutputDirLocked(f"{path}: could not be taken")  # pragma: no cover (another host raced us)
    finally:
        fcntl.flock(guard, fcntl.LOCK_UN)
        os.close(guard)
