"""Stand-in for a released Sa2VA checkpoint's modeling module (the real one builds InternViT,
Qwen2 and SAM2); what pg-train-export must copy and auto_map must resolve."""

from transformers import PreTrainedModel

from .configuration_sa2va_chat import Sa2VAChatConfig


class Sa2VAChatModel(PreTrainedModel):
    config_class = Sa2VAChatConfig
    base_model_prefix = ""
