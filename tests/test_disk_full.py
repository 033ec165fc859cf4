"""Disk full while checkpointing: the error says so, with path and space needed vs free, and the
CLI exits 74 leaving nothing complete-looking (issue 27)."""

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from test_train import FAST

from pg_train import exit_codes
from pg_train.cli import main as cli_main
from pg_train.disk_space import DiskFullError, is_disk_full


def cli(out: Path, *extra: str) -> int:
    return cli_main(["--output-dir", str(out), "--max-steps", "2", *FAST, "save_every=2", *extra])


def test_injected_enospc_while_checkpointing_exits_74_naming_path_and_sizes(tmp_path, monkeypatch, capsys):
    import pg_train.checkpointing as checkpointing

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 100)  # half a file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpointing.torch, "save", full)
    assert cli(tmp_path) == exit_codes.DISK_FULL
    err = capsys.readouterr().err
    assert f"no space left on device writing checkpoint {tmp_path / 'checkpoints' / 'step-00000002.partial'}" in err
    assert "it needs about 0." in err and "GiB" in err and " free there" in err
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the partial directory removed, nothing complete


def test_torch_write_failure_on_a_too_small_disk_is_disk_full(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as 'unexpected pos': the free space decides."""
    import pg_train.checkpointing as checkpointing
    import pg_train.disk_space as disk_space

    def failing(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4248")

    monkeypatch.setattr(checkpointing.torch, "save", failing)
    monkeypatch.setattr(disk_space, "free_bytes", lambda path: 1000)
    from pg_train.config import load_config
    from pg_train.train import train

    with pytest.raises(DiskFullError, match=r"needs about .* 0\.00 GiB \(1,000 bytes\) free there") as err:
        train(load_config([], [*FAST, f"output_dir={tmp_path}", "max_steps=1"]))
    assert err.value.needed > 1000 and err.value.free == 1000


def test_other_write_errors_are_not_called_disk_full():
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert is_disk_full(RuntimeError("wrapped")) is False
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("a library's own words") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (needs permission to mount; skipped elsewhere)."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_real_full_tmpfs_exits_74_and_leaves_no_complete_checkpoint(small_tmpfs, capsys):
    assert cli(small_tmpfs / "run") == exit_codes.DISK_FULL
    err = capsys.readouterr().err
    assert "no space left on device writing checkpoint" in err and "free there" in err
    assert list((small_tmpfs / "run" / "checkpoints").iterdir()) == []
    assert not (small_tmpfs / "run" / ".pg_train.lock").exists()
