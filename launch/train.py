"""pg_train's training entry point for `accelerate launch launch/train.py [...]` (see pg_train/cli.py;
installed as the `pg-train` command too)."""

import sys

from pg_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
