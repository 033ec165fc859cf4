"""`pg-train-launch` (`python -m pg_train.launcher`): `accelerate launch` with pg_train's exit
codes and signals scoped to this job.

    pg-train-launch --config_file accelerate_configs/zero2_8gpu.yaml launch/train.py --resume auto ...

Every argument goes to `accelerate launch` unchanged. What this adds (issue 27):
- SIGTERM / SIGUSR1 / SIGINT to this command reach the training processes of this job only
  (their pid files in `PG_TRAIN_JOB_DIR`, pg_train.job), not `accelerate launch` itself: with
  one process Accelerate's launcher dies of SIGTERM and orphans its worker; with several,
  torch's elastic agent tears the workers down and exits 1. A signal that arrives before a
  worker has registered is delivered as soon as it does.
- The exit code is the workers' (pg_train/exit_codes.py): 75 when they checkpointed after a stop
  request, 73 / 74 / 2 as they said; Accelerate reports 1 for any non-zero worker.
- `accelerate launch` runs in its own session, so a terminal's Ctrl-C or a signal to this
  command's process group is not delivered to it twice.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import exit_codes
from .job import JOB_DIR_ENV, die_with_parent, live_workers, register_launcher, worker_exit_codes

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def job_exit_code(codes: dict[int, int | None], launcher_code: int) -> int:
    """The job's exit code from the workers' recorded codes and the launcher's own: all workers
    agreeing -> theirs; one that failed with a documented code -> that; a worker that died
    without recording one, or nothing recorded -> the launcher's (a signal -> 128 + its number)."""
    recorded = [c for c in codes.values() if c is not None]
    if codes and len(recorded) == len(codes):
        if len(set(recorded)) == 1:
            return recorded[0]
        failed = [c for c in recorded if c not in (exit_codes.DONE, exit_codes.REQUEUE)]
        if failed:
            return failed[0]
        return exit_codes.REQUEUE  # some finished, the rest stopped after a checkpoint
    if launcher_code < 0:
        return 128 - launcher_code
    return launcher_code or (exit_codes.ERROR if codes else exit_codes.DONE)


class Forwarder:
    """Signals received, delivered once to every worker of the job, including late ones."""

    def __init__(self, job_dir: Path):
        self.job_dir = job_dir
        self.received: list[int] = []
        self.delivered: dict[int, set[int]] = {}
        for sig in FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received.append(signum)

    def deliver(self) -> None:
        if not self.received:
            return
        for pid in live_workers(self.job_dir):
            done = self.delivered.setdefault(pid, set())
            for sig in self.received:
                if sig not in done:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                    done.add(sig)


def accelerate_command(argv: list[str]) -> list[str]:
    """`accelerate launch --quiet ARGS` with this interpreter's accelerate (`--quiet`: a worker's
    non-zero exit is reported by this launcher, not as Accelerate's CalledProcessError traceback)."""
    quiet = [] if {"-q", "--quiet"} & set(argv) else ["--quiet"]
    return [sys.executable, "-m", "accelerate.commands.launch", *quiet, *argv]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return exit_codes.DONE if argv else exit_codes.BAD_CONFIG
    given = os.environ.get(JOB_DIR_ENV)
    job_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="pg_train-job-"))
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*job_dir.glob("worker-rank*"), job_dir / "launcher.json"]:  # a requeued job reuses its dir
        stale.unlink(missing_ok=True)
    register_launcher(job_dir)
    forwarder = Forwarder(job_dir)
    child = subprocess.Popen(
        accelerate_command(argv),
        env={**os.environ, JOB_DIR_ENV: str(job_dir)},
        start_new_session=True,
        preexec_fn=die_with_parent,  # this launcher killed outright: accelerate is told too, and so its workers
    )
    try:
        while child.poll() is None:
            forwarder.deliver()
            time.sleep(0.1)
    finally:
        if child.poll() is None:  # this process is being torn down: the job must not outlive it unsignalled
            for pid in live_workers(job_dir):
                os.kill(pid, signal.SIGTERM)
            child.wait()
    code = job_exit_code(worker_exit_codes(job_dir), child.returncode)
    print(
        f"[pg_train/launch] workers exited with {worker_exit_codes(job_dir) or 'no record'}; exit {code}",
        file=sys.stderr,
    )
    if not given:
        shutil.rmtree(job_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
