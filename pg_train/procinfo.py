"""Which process is which: a pid plus its kernel start time identifies one process for good
(a pid alone is reused once its owner exits). The output-directory lock and the launcher's pid
files record both, so a stale lock is recognised and a signal never reaches a stranger."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 on (state, ppid, ...); None without such a process or /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: fields after the last ')'
    return stat[stat.rindex(")") + 2 :].split()


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None where
    there is no such process or no /proc."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_running(pid: int, start: int | None) -> bool:
    """Whether the process `pid` that started at `start` still exists (not just some process
    that now has its pid). `start` None (recorded without /proc): the pid alone decides."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: the pid alone decides
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return start is None or int(fields[19]) == start
