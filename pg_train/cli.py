"""`pg-train` (and `launch/train.py`): parse flags and `key=value` overrides, train.

    accelerate launch launch/train.py                      # the embedded default (tiny + synthetic)
    accelerate launch --config_file accelerate_configs/zero2_8gpu.yaml launch/train.py \\
        --config configs/sa2va_4b_zero2.yaml model.checkpoint=/path/to/Sa2VA-4B --resume auto

Flags override the config files; `key=value` arguments (dotted keys, YAML values) override
both. Exit codes (pg_train/exit_codes.py): 0 done, 1 error, 2 bad configuration, 73 the output
directory is in use by another run, 74 disk full, 75 stopped by SIGTERM/SIGUSR1 after a checkpoint
(requeue and run again with --resume auto).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_JOB = Path(__file__).with_name("default_job.yaml")  # what runs without --config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shipped configs: configs/sa2va_4b_zero2.yaml (Sa2VA-4B, 8 GPUs, ZeRO-2), "
        "configs/learn_tiny_warmup.yaml + configs/learn_tiny_pg.yaml (the tiny learning recipe).",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="YAML config file (repeatable; later files win). Without one: the embedded default job, "
        "pg_train/default_job.yaml (a short curriculum on the tiny-112 preset)",
    )
    parser.add_argument("--output-dir", help="where metrics, TensorBoard events and checkpoints go")
    parser.add_argument("--max-steps", type=int, help="optimizer steps to train")
    parser.add_argument(
        "--resume", help="'auto' (newest complete checkpoint in the output dir, if any) or a checkpoint directory"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=1e-4 data.source=manifest"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # first, so `--help` and a bad flag answer without importing torch (~0.1 s, not ~9)
    from . import exit_codes, job

    job.catch_stop_signals_early()  # a stop request during start-up still ends in a checkpoint and 75
    job.register_worker()  # under pg-train-launch: its pid file, so signals reach this job only
    code = exit_codes.ERROR
    try:
        code = _main(args)
    finally:  # an uncaught error records 1 (its traceback follows)
        job.record_exit(code)
    return code


def _main(args: argparse.Namespace) -> int:
    from . import exit_codes
    from .accel import DeepSpeedConfigNotFound, configure_environment

    try:
        configure_environment()  # before DeepSpeed is imported: its CPU accelerator, the JIT ops' cache, its config
    except DeepSpeedConfigNotFound as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    from .config import ConfigError, load_config

    overrides = list(args.overrides)
    for flag, key in ((args.output_dir, "output_dir"), (args.max_steps, "max_steps"), (args.resume, "resume")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    try:
        cfg = load_config(args.config or [DEFAULT_JOB], overrides)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return exit_codes.BAD_CONFIG
    from .run_lock import OutputDirLocked
    from .train import train

    try:
        return train(cfg).exit_code
    except OutputDirLocked as err:
        print(f"[pg_train] refused: {err}", file=sys.stderr)
        return exit_codes.OUTPUT_DIR_LOCKED
    except ConfigError as err:  # found while opening the data, before the model is built
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from .disk_space import DiskFullError, free_bytes, gib, is_disk_full

        if not is_disk_full(err):
            raise
        if not isinstance(err, DiskFullError):  # a write outside the checkpoint (metrics, report)
            where = err.filename or cfg.output_dir
            err = f"no space left on device writing {where} ({gib(free_bytes(where))} free there): {err}"
        print(f"[pg_train] disk full: {err}", file=sys.stderr)
        return exit_codes.DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
