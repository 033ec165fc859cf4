"""Take a trained model out: a training run or checkpoint -> the released Sa2VA Hugging Face layout.

    pg-train-export RUN_DIR|CHECKPOINT OUT_DIR [--weights ema|student] [--dtype bf16|fp32]
                    [--code-from RELEASED_DIR] [--max-shard-size 4GB]

Reads a run directory (its newest complete checkpoint), a training checkpoint of any layout
(Accelerate, or DeepSpeed ZeRO consolidated with DeepSpeed's own API; `checkpoint_files`) or a
model directory, and writes OUT_DIR in the released layout: safetensors shards + index (one
`model.safetensors` when it fits one shard), `config.json` with the released keys and pg_train's
preset, the tokenizer files, `generation_config.json`, and `training_config.yaml` (the run's
resolved config: the data it trained and is evaluated on). `from_pretrained` loads it strictly.

- `--weights ema` (default): the EMA teacher (`ema.safetensors` of the checkpoint), the weights
  Pseudo-Gumbel's teacher captioned with; `student`: the optimised weights.
- LoRA is merged into the base weights in fp32 (W + alpha/r * B @ A), then cast to `--dtype`.
- `--code-from DIR`: DIR is a released checkpoint (e.g. ByteDance/Sa2VA-4B): its modeling `*.py`
  files are copied, and its config.json is the base ours is laid over (its `auto_map`, and keys
  its code reads that pg_train does not write, are kept), so
  `AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)` takes the export.

Nothing is written half-way: the export is built in a hidden sibling folder and renamed to
OUT_DIR only when complete. It refuses (exit 2, naming the file) an unknown layout, weights
holding NaN or Inf (after the merge and the cast), `--weights ema` for a checkpoint without an
EMA, and an OUT_DIR that already exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

COMMAND = "pg-train-export"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GENERATION_CONFIG = "generation_config.json"


def parse_size(text: str) -> int:
    """'4GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 4GB, 500MB or 1000000")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(number * scale[unit])


def released_code(directory: str | Path) -> tuple[dict, list[Path]]:
    """(config.json, modeling *.py files) of a released checkpoint directory, checked before
    anything is loaded: the config must carry an `auto_map` whose modules are among the files."""
    from .model.io.state_check import CheckpointError

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{COMMAND}: --code-from {directory}: no config.json (expected a released checkpoint)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{COMMAND}: --code-from {config_path}: not valid JSON ({err})") from err
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or not auto_map:
        raise CheckpointError(f"{COMMAND}: --code-from {config_path}: no auto_map (the official loader needs it)")
    files = sorted(directory.glob("*.py"))
    modules = {f.stem for f in files}
    missing = sorted({ref.split(".")[0] for ref in auto_map.values() if isinstance(ref, str)} - modules)
    if missing:
        raise CheckpointError(
            f"{COMMAND}: --code-from {directory}: auto_map names modules with no .py file here: {missing}"
        )
    return config, files


def _laid_over(base: dict, ours: dict) -> dict:
    """`base` with `ours` written over it, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in ours.items():
        merged[key] = (
            _laid_over(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def _check_finite_after_cast(model, dtype: torch.dtype) -> None:
    """Refuse weights that hold NaN or Inf once LoRA is merged and cast (a finite fp32 value
    can still overflow a narrower dtype), one tensor at a time, naming each."""
    from .model.io.checkpoint import to_sa2va_state_dict
    from .model.io.state_check import CheckpointError, nonfinite_report

    report = []
    for name, tensor in to_sa2va_state_dict(model).items():
        report += nonfinite_report({name: tensor.to(dtype) if tensor.is_floating_point() else tensor})
    if report:
        raise CheckpointError(
            f"{COMMAND}: {len(report)} tensors hold NaN or Inf after merging LoRA (nothing was written):\n    "
            + "\n    ".join(report[:30])
        )


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    weights: str = "ema",
    dtype: str = "bf16",
    code_from: str | Path | None = None,
    max_shard_bytes: int = 4 * 10**9,
) -> Path:
    """Write `source`'s model to `out_dir` in the released layout (see the module docstring)."""
    import yaml

    from .builders import load_checkpoint
    from .checkpoint_files import TRAINING_CONFIG, resolve_checkpoint
    from .config import to_dict
    from .model.io.checkpoint import save_pretrained
    from .model.io.state_check import CheckpointError

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{COMMAND}: {out} already exists (nothing was written); choose a new directory")
    code_config, code_files = released_code(code_from) if code_from is not None else (None, [])
    checkpoint = resolve_checkpoint(source, COMMAND)
    model, cfg = load_checkpoint(checkpoint, "cpu", command=COMMAND, weights=weights)
    model.float()  # LoRA merged in fp32, cast after
    _check_finite_after_cast(model, DTYPES[dtype])

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_pretrained(model, partial, dtype=DTYPES[dtype], max_shard_bytes=max_shard_bytes)
        _write_generation_config(model, partial)
        config = json.loads((partial / "config.json").read_text())
        config["pg_train"]["export"] = {"source": str(checkpoint), "weights": weights, "dtype": dtype}
        if code_config is not None:
            config = _laid_over(code_config, config)
            for file in code_files:
                shutil.copy2(file, partial / file.name)
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        if cfg is not None:
            (partial / TRAINING_CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _write_generation_config(model, directory: Path) -> None:
    """generation_config.json as transformers writes it: greedy, stopping at the chat template's
    end-of-turn token."""
    from transformers import GenerationConfig

    tokenizer = model.tokenizer
    eos = model.token_ids.get("<|im_end|>", getattr(tokenizer, "eos_token_id", None))
    pad = getattr(tokenizer, "pad_token_id", None)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(str(directory))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source", help="a run directory (its newest complete checkpoint), a checkpoint or a model directory"
    )
    parser.add_argument("out_dir", help="where to write the model (must not exist)")
    parser.add_argument("--weights", choices=("ema", "student"), default="ema")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--code-from", help="a released Sa2VA checkpoint directory: copy its modeling code and auto_map"
    )
    parser.add_argument(
        "--max-shard-size", type=parse_size, default="4GB", help="largest safetensors shard (default 4GB)"
    )
    args = parser.parse_args(argv)
    from .model.io.state_check import CheckpointError

    try:
        out = export(
            args.source,
            args.out_dir,
            weights=args.weights,
            dtype=args.dtype,
            code_from=args.code_from,
            max_shard_bytes=args.max_shard_size,
        )
    except (CheckpointError, FileNotFoundError) as err:
        print(f"{COMMAND}: error: {err}" if not str(err).startswith(COMMAND) else f"error: {err}", file=sys.stderr)
        return 2
    files = sorted(p.name for p in out.iterdir())
    print(f"{COMMAND}: wrote {out} ({args.weights} weights, {args.dtype}): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
