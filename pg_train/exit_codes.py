"""The exit codes of `pg-train` / `launch/train.py` and of the launcher wrapper (README, "Exit
codes"): one place, so the CLI, the launcher, the SLURM script's requeue and the tests agree."""

DONE = 0
ERROR = 1  # anything else (the message names it)
BAD_CONFIG = 2  # configuration or data refused before anything was built
OUTPUT_DIR_LOCKED = 73  # EX_CANTCREAT: another run owns the output directory (nothing was written)
DISK_FULL = 74  # EX_IOERR: no space left while writing (path, bytes needed vs free in the message)
REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and resume
