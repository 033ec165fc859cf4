"""Training checkpoints: atomic directories, newest-complete lookup, keep-last-K pruning.

A checkpoint is `checkpoints/step-00000120/`. It is written as `step-00000120.partial/` by all
ranks (Accelerate `save_state`: model + ZeRO optimizer shards + RNG + EMA; plus one
`trainer_state_rank{r}.json` and `rng_state_rank{r}.pt` per rank) and renamed by the main process only after every rank
finished, so a directory without `.partial` is always complete; a crash mid-save leaves a
`.partial` that `--resume auto` ignores.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .disk_space import writing

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


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict,
    keep_last: int,
    ema=None,
    needed_bytes: int | None = None,
) -> Path:
    """Write a complete checkpoint for `step` (call on every rank); with `ema`, its shadow also
    as `ema.safetensors` (ema_file.write_ema_file; the same on every rank, so main writes it).
    A full disk is a DiskFullError naming the path, `needed_bytes` (about; the state's tensors)
    and the space free, with the partial directory removed."""
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    random_state = rng_state()
    accelerator.wait_for_everyone()
    with writing(
        partial, needed_bytes, "writing checkpoint", cleanup=lambda: shutil.rmtree(partial, ignore_errors=True)
    ):
        accelerator.save_state(str(partial))
        (partial / f"trainer_state_rank{accelerator.process_index}.json").write_text(json.dumps(trainer_state))
        torch.save(random_state, partial / f"rng_state_rank{accelerator.process_index}.pt")
        if ema is not None and accelerator.is_main_process:
            from .ema_file import write_ema_file

            write_ema_file(ema, partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def rng_state() -> dict:
    """This process's global random state: Python, NumPy, torch CPU and the current CUDA device
    (what LoRA dropout and a sampling teacher draw from). Tensors and plain values only, so it
    loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_state(checkpoint: Path, rank: int) -> dict | None:
    """This rank's saved random state; None for a checkpoint written before pg_train saved it.

    Accelerate's `load_state` restores its own copy too, but logs a failure only at info level
    and goes on with the fresh seed; this file is read strictly, and a resumed run restores it
    as the last thing before its first step, so nothing drawn while resuming can shift it."""
    path = checkpoint / f"rng_state_rank{rank}.pt"
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def load_trainer_state(checkpoint: Path, rank: int) -> dict:
    path = checkpoint / f"trainer_state_rank{rank}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: was {checkpoint} written by a run with fewer processes?")
    return json.loads(path.read_text())


def check_resume_weights(checkpoint: Path, model, ema, *, allow_nonfinite: bool = False) -> None:
    """Refuse a checkpoint whose model weights or EMA shadow would not load completely, before
    `accelerator.load_state` copies anything: Accelerate (and DeepSpeed) call
    `load_state_dict(strict=True)`, which overwrites every matching tensor before raising, and
    the model loads before the EMA. `model` is the unwrapped module. Names, shapes, dtype kinds
    (exact: a training checkpoint holds what the model held) and finiteness are checked
    (`model.io.state_check`); the rest of the checkpoint: `checkpoint_check`."""
    import torch

    from .model.io.state_check import CheckpointError, check_safetensors_file, check_state_dict

    single = checkpoint / "model.safetensors"  # Accelerate without DeepSpeed
    deepspeed = checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt"  # DeepSpeed's module weights
    expected = model.state_dict()
    if single.is_file():
        check_safetensors_file(single, expected, allow_nonfinite=allow_nonfinite, exact_dtype=True)
    elif deepspeed.is_file():
        try:
            module_state = torch.load(deepspeed, map_location="cpu", weights_only=False, mmap=True)["module"]
        except Exception as err:
            raise CheckpointError(
                f"{deepspeed}: unreadable DeepSpeed model state ({type(err).__name__}: {err})"
            ) from err
        check_state_dict(expected, module_state, deepspeed, allow_nonfinite=allow_nonfinite, exact_dtype=True)
    else:
        raise CheckpointError(f"{checkpoint}: holds neither {single.name} nor {deepspeed.relative_to(checkpoint)}")
    ema_file = checkpoint / "custom_checkpoint_0.pkl"  # the EMA, the one object registered for checkpointing
    try:
        ema_state = torch.load(ema_file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{ema_file}: unreadable EMA state ({type(err).__name__}: {err})") from err
    try:
        ema.check_state_dict(ema_state, allow_nonfinite=allow_nonfinite)
    except CheckpointError as err:
        raise CheckpointError(f"{ema_file}: {err}") from err
