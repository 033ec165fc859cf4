"""Sa2VA model construction and the released checkpoint format."""

from .arch.build import build_model, build_offline, component_parameter_counts, enable_gradient_checkpointing
from .arch.presets import PRESETS, ModelPreset, get_preset
from .arch.sa2va import Sa2VAModel
from .io.checkpoint import CheckpointError, from_pretrained, save_pretrained, to_sa2va_state_dict

__all__ = [
    "build_model",
    "build_offline",
    "from_pretrained",
    "save_pretrained",
    "to_sa2va_state_dict",
    "CheckpointError",
    "component_parameter_counts",
    "enable_gradient_checkpointing",
    "PRESETS",
    "ModelPreset",
    "get_preset",
    "Sa2VAModel",
]
