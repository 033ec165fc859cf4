"""One run per output directory (issue 27): the lock, its refusal, stale recovery and release."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, wait_for_metric_lines
from test_train import FAST

from pg_train import exit_codes
from pg_train.procinfo import process_start
from pg_train.run_lock import LOCK_NAME, OutputDirLocked, acquire


def write_lock(directory: Path, pid: int, host: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "pid_start": process_start(pid), "host": host or socket.gethostname(), "token": "x"}
    (directory / LOCK_NAME).write_text(json.dumps(holder))


def test_second_acquire_is_refused_naming_the_owner_and_release_frees_it(tmp_path):
    first = acquire(tmp_path)
    with pytest.raises(OutputDirLocked, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
        acquire(tmp_path)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with acquire(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_owner_is_taken_over(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_lock(tmp_path, gone.pid)
    said = []
    with acquire(tmp_path, say=said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock taken over" in said[0] and f"pid {gone.pid}" in said[0]


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The lock records the owner's start time: another process that now has the pid is not the owner."""
    write_lock(tmp_path, os.getpid())
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    holder["pid_start"] -= 1
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with acquire(tmp_path, say=lambda _: None):
        pass


def test_live_owner_and_other_host_are_refused(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path / "a", sleeper.pid)
        with pytest.raises(OutputDirLocked, match=f"pid {sleeper.pid}"):
            acquire(tmp_path / "a")
    finally:
        sleeper.kill()
        sleeper.wait()
    write_lock(tmp_path / "b", 1, host="elsewhere-node-17")  # cannot be checked from here
    with pytest.raises(OutputDirLocked, match=r"elsewhere-node-17.*delete .*\.pg_train\.lock"):
        acquire(tmp_path / "b")


def test_release_leaves_another_runs_lock_alone(tmp_path):
    mine = acquire(tmp_path)
    write_lock(tmp_path, os.getpid())  # replaced behind our back (token "x")
    mine.release()
    assert (tmp_path / LOCK_NAME).exists()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def train_cmd(out: Path, max_steps: int, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "launch/train.py",
        "--output-dir",
        str(out),
        "--max-steps",
        str(max_steps),
        *FAST,
        *overrides,
    ]


def test_second_run_on_a_busy_directory_refuses_and_changes_nothing_then_the_lock_is_released(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        train_cmd(out, 500, "save_every=2"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_metric_lines(out / "metrics.jsonl", 2, first)
        first.send_signal(signal.SIGSTOP)  # frozen: its files cannot change while we compare them
        before = snapshot(out)
        assert LOCK_NAME in before and "metrics.jsonl" in before
        second = subprocess.run(train_cmd(out, 3), cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == exit_codes.OUTPUT_DIR_LOCKED, second.stderr[-3000:]
        assert f"is in use by another pg_train run (pid {first.pid}" in second.stderr
        assert snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == exit_codes.REQUEUE, stderr[-3000:]
    assert not (out / LOCK_NAME).exists()  # released on the stop path


def test_lock_is_released_when_the_run_fails(tmp_path, monkeypatch):
    from pg_train.config import load_config
    from pg_train.train import train

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("pg_train.train.optimizer_window", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        train(load_config([], [*FAST, f"output_dir={tmp_path}", "max_steps=2"]))
    assert not (tmp_path / LOCK_NAME).exists()
