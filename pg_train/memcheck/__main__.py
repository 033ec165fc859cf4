"""`python -m pg_train.memcheck`: the command line (memcheck/args.py) is parsed before anything
heavy is imported, so `--help` and usage errors cost no torch start-up; the work is memcheck/cli.py.
Everything else (`build`, `deployment_from`, ...) is imported from memcheck/cli.py itself."""

from __future__ import annotations

import sys

from .args import parse_args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .cli import run  # torch, the model, the measured run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
