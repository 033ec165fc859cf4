"""A training checkpoint's weights, whatever wrote them; the EMA shadow as a safetensors file.

Three layouts are read (`checkpoint_layout`):

    released    config.json + safetensors: a model directory (`save_pretrained`, `pg-train-export`)
    accelerate  model.safetensors: a training checkpoint written without DeepSpeed
    deepspeed   pytorch_model/ (+ `latest`): DeepSpeed ZeRO shards as Accelerate's `save_state` writes them

A DeepSpeed checkpoint is consolidated with DeepSpeed's own API
(`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`: the fp32 master
weights gathered from every rank's optimizer shard, the frozen tensors from the model state),
so no one has to run `zero_to_fp32.py` by hand. Every reader names the command the user ran
(`pg-train-evaluate`, `pg-train-export`, `model.init_from`) in its errors.

The EMA teacher's shadow is read from `ema.safetensors` (`ema_file`).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from .checkpointing import newest_checkpoint
from .ema_file import read_ema_shadow  # noqa: F401 (readers of a checkpoint import it from here)
from .model.io.state_check import CheckpointError, read_safetensors

RELEASED, ACCELERATE, DEEPSPEED = "released", "accelerate", "deepspeed"
ACCELERATE_WEIGHTS = "model.safetensors"
DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate's save_state gives DeepSpeed's save_checkpoint
# pg-train-export writes the run's resolved config next to the model: evaluation and prediction
# of the exported model then use the run's objective settings and held-out data, as training did.
TRAINING_CONFIG = "training_config.yaml"


@contextlib.contextmanager
def errors_naming(command: str):
    """CheckpointErrors raised inside (by `state_check`'s readers, which know no command)
    prefixed with the command the user ran."""
    try:
        yield
    except CheckpointError as err:
        if str(err).startswith(f"{command}:"):
            raise
        raise CheckpointError(f"{command}: {err}") from err


def checkpoint_layout(path: str | Path, command: str) -> str:
    """released | accelerate | deepspeed; anything else is refused naming what was looked for."""
    path = Path(path)
    if (path / "config.json").is_file():
        return RELEASED
    if (path / ACCELERATE_WEIGHTS).is_file():
        return ACCELERATE
    if _deepspeed_tag(path) is not None:
        return DEEPSPEED
    if not path.exists():
        raise CheckpointError(f"{command}: {path} does not exist")
    raise CheckpointError(
        f"{command}: {path} is no checkpoint pg_train can read: expected a model directory (config.json + "
        f"safetensors), a training checkpoint holding {ACCELERATE_WEIGHTS} (Accelerate) or "
        f"{DEEPSPEED_TAG}/*model_states.pt (DeepSpeed), or a run directory with checkpoints/step-N"
    )


def _deepspeed_tag(path: Path) -> str | None:
    """The tag folder of a DeepSpeed checkpoint: the one `latest` names, else pytorch_model."""
    latest = path / "latest"
    tag = latest.read_text().strip() if latest.is_file() else DEEPSPEED_TAG
    return tag if any((path / tag).glob("*model_states.pt")) else None


def resolve_checkpoint(path: str | Path, command: str) -> Path:
    """A run directory means its newest complete checkpoint; anything else is itself."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not (path / "config.json").is_file():
        newest = newest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{command}: {path} is a run directory without a complete checkpoint")
        return newest
    return path


def run_config_path(checkpoint: Path) -> Path:
    """The run's resolved config: config.yaml two levels above a `checkpoints/step-N`, or the
    training_config.yaml an exported model directory carries."""
    if (checkpoint / "config.json").is_file():
        return checkpoint / TRAINING_CONFIG
    return checkpoint.parent.parent / "config.yaml"


def training_state_dict(checkpoint: str | Path, command: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The student's full state dict (its module names, LoRA unmerged) and the path to name in
    errors, from an Accelerate or a DeepSpeed checkpoint."""
    checkpoint = Path(checkpoint)
    layout = checkpoint_layout(checkpoint, command)
    if layout == ACCELERATE:
        weights = checkpoint / ACCELERATE_WEIGHTS
        with errors_naming(command):
            return read_safetensors(weights), weights
    if layout == DEEPSPEED:
        return consolidated_zero_state_dict(checkpoint, command), checkpoint / _deepspeed_tag(checkpoint)
    raise CheckpointError(
        f"{command}: {checkpoint} is a model directory, not a training checkpoint (start from it with model.checkpoint)"
    )


def consolidated_zero_state_dict(checkpoint: Path, command: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's consolidation of a ZeRO checkpoint into one fp32 state dict (every rank's
    optimizer shard read; frozen tensors included). DeepSpeed prints its progress; kept quiet."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = _deepspeed_tag(checkpoint)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    except Exception as err:  # a missing rank's shard, a truncated file: DeepSpeed's message names no command
        raise CheckpointError(
            f"{command}: {checkpoint / tag}: DeepSpeed could not consolidate the ZeRO shards ({type(err).__name__}: {err})"
        ) from err
    return dict(state)


def with_ema(
    state: dict[str, torch.Tensor], shadow: dict[str, torch.Tensor], where: Path, command: str
) -> dict[str, torch.Tensor]:
    """The student's state dict with its trainable tensors replaced by the EMA shadow's: the
    teacher (the frozen base is shared, so the student's frozen tensors are the teacher's)."""
    unknown = sorted(set(shadow) - set(state))
    wrong = sorted(n for n in set(shadow) & set(state) if shadow[n].shape != state[n].shape)
    if unknown or wrong:
        raise CheckpointError(
            f"{command}: {where}: the EMA shadow does not match the checkpoint's weights "
            f"(unknown names {unknown[:5]}, wrong shapes {wrong[:5]})"
        )
    return {**state, **shadow}


def load_training_weights(
    model, checkpoint: str | Path, *, command: str = "model.init_from", allow_nonfinite: bool = False
) -> None:
    """A training checkpoint's weights (Accelerate or DeepSpeed) into `model`, all-or-nothing:
    names, shapes, dtype kinds and finiteness are checked before any tensor is copied
    (`load_state_dict(strict=True)` alone copies the matching tensors first and raises after)."""
    from .model.io.state_check import load_state_dict_checked

    state, where = training_state_dict(checkpoint, command)
    # Accelerate's file holds the tensors as the model held them: exact dtypes (a float64 tensor
    # there was not written by training); DeepSpeed's consolidation is float32 whatever the model.
    exact = checkpoint_layout(Path(checkpoint), command) == ACCELERATE
    with errors_naming(command):
        load_state_dict_checked(model, state, where, allow_nonfinite=allow_nonfinite, exact_dtype=exact)
