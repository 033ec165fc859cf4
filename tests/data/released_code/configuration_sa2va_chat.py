"""Stand-in for a released Sa2VA checkpoint's configuration module (the real one defines the
InternVL + Qwen2 sub-configs); what pg-train-export must copy, and transformers must import."""

from transformers import PretrainedConfig


class Sa2VAChatConfig(PretrainedConfig):
    model_type = "sa2va_chat"

    def __init__(self, llm_config=None, vision_config=None, template=None, **kwargs):
        super().__init__(**kwargs)
        self.llm_config = llm_config or {}
        self.vision_config = vision_config or {}
        self.template = template
