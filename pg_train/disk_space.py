"""Disk full, said so: the path, the space needed and the space free (exit code 74).

A checkpoint that does not fit used to fail inside torch ("unexpected pos") or safetensors
("I/O error ... os error 28"), naming neither the disk nor the sizes. `writing(path, needed)`
turns any write failure that is a full disk — ENOSPC anywhere in the exception's chain, or a
failure while the file system has less free space than the write needs — into `DiskFullError`.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

_NO_SPACE_TEXT = ("No space left on device", "os error 28", "ENOSPC")


class DiskFullError(OSError):
    """No space left while writing: `path`, `needed` and `free` bytes (exit code 74)."""

    def __init__(self, message: str, path: Path, needed: int | None, free: int | None):
        super().__init__(errno.ENOSPC, message, str(path))
        self.message, self.path, self.needed, self.free = message, path, needed, free

    def __str__(self) -> str:
        return self.message


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC in the exception or anything it was raised from (libraries wrap it in their own)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if any(text in str(err) for text in _NO_SPACE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB ({n:,} bytes)"


@contextlib.contextmanager
def writing(path: str | Path, needed: int | None, what: str = "writing", cleanup=None) -> Iterator[None]:
    """Run a write of about `needed` bytes under `path`; a full disk becomes DiskFullError
    (after `cleanup()`, e.g. removing the half-written files, so `free` is what is really free)."""
    try:
        yield
    except Exception as err:
        full = is_disk_full(err) or (needed is not None and (free_bytes(path) or 0) < needed)
        if not full:
            raise
        if cleanup is not None:
            cleanup()
        free = free_bytes(path)
        raise DiskFullError(
            f"no space left on device {what} {path}: it needs about {gib(needed)}, {gib(free)} free there "
            f"({type(err).__name__}: {err}). Free space or use another --output-dir; nothing complete-looking was left.",
            Path(path),
            needed,
            free,
        ) from err
