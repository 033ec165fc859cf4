"""Training checkpoints: atomic directories, newest-complete lookup, keep-last-K pruning.

A checkpoint is `checkpoints/step-00000120/`. It is written as `step-00000120.partial/` by all
ranks (Accelerate `save_state`: model + ZeRO optimizer shards + RNG + EMA; plus one
`trainer_state_rank{r}.json` per rank) and renamed by the main process only after every rank
finished, so a directory without `.partial` is always complete; a crash mid-save leaves a
`.partial` that `--resume auto` ignores.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Write a complete checkpoint for `step` (call on every rank)."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    (partial / f"trainer_state_rank{accelerator.process_index}.json").write_text(json.dumps(trainer_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: Path, rank: int) -> dict:
    path = checkpoint / f"trainer_state_rank{rank}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: was {checkpoint} written by a run with fewer processes?")
    return json.loads(path.read_text())
