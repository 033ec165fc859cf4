"""The network: InternVL vision tower, Qwen2 decoder, SAM2 grounding, presets and model building.

Depends on `text` (prompt builder, special tokens); nothing here reads files or decodes loops."""
