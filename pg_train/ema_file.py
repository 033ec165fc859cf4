"""`ema.safetensors`: the EMA teacher's shadow in a training checkpoint, readable without unpickling.

Written into every checkpoint next to Accelerate's files: the fp32 shadow under the student's
parameter names (its trainable tensors: LoRA, mlp1, text_hidden_fcs, the SAM2 mask decoder),
with decay, warm-up and update count in the metadata. These are the weights one usually wants
to export (`pg-train-export --weights ema`). Resume still restores the EMA from Accelerate's
`custom_checkpoint_0.pkl`, which a checkpoint written before `ema.safetensors` existed is read
from too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model.io.state_check import CheckpointError, read_safetensors

EMA_FILE = "ema.safetensors"
EMA_PICKLE = "custom_checkpoint_0.pkl"  # Accelerate's copy of the one object registered for checkpointing


def write_ema_file(ema, directory: str | Path) -> Path:
    """`ema.safetensors` in `directory` from an EMATeacher (its `state_dict()`)."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    path = Path(directory) / EMA_FILE
    metadata = {"format": "pt", "content": "pg_train EMA teacher shadow (fp32, the student's trainable tensors)"}
    metadata.update({k: json.dumps(state[k]) for k in ("decay", "warmup", "num_updates")})
    save_file(dict(zip(state["names"], (s.contiguous() for s in state["shadow"]))), str(path), metadata=metadata)
    return path


def read_ema_shadow(checkpoint: str | Path, command: str) -> tuple[dict[str, torch.Tensor], Path]:
    """{student parameter name: fp32 shadow tensor} and the file it came from: ema.safetensors,
    or Accelerate's pickle for a checkpoint written before it existed. Errors name `command`."""
    checkpoint = Path(checkpoint)
    path = checkpoint / EMA_FILE
    if path.is_file():
        try:
            return read_safetensors(path), path
        except CheckpointError as err:
            raise CheckpointError(f"{command}: {err}") from err
    pickle = checkpoint / EMA_PICKLE
    if not pickle.is_file():
        raise CheckpointError(f"{command}: {checkpoint} holds no EMA teacher (neither {EMA_FILE} nor {EMA_PICKLE})")
    try:
        state = torch.load(pickle, map_location="cpu", weights_only=False)
        return dict(zip(state["names"], state["shadow"], strict=True)), pickle
    except Exception as err:
        raise CheckpointError(f"{command}: {pickle}: unreadable EMA state ({type(err).__name__}: {err})") from err
