"""Model presets as data: one table of dimensions per preset, no subclasses.

`sa2va-4b` is the released Sa2VA-4B layout (InternViT-300M-448px-V2_5 + Qwen2.5-3B + SAM2
hiera-large v1). `tiny` keeps every structural choice (448 px, 16x16 token grid, pixel shuffle
v2, untied lm_head, SAM2 with high-res features and object scores) but shrinks widths and depths
so that it builds in well under a second and runs on two CPU cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class VisionDims:
    """InternViT: LayerNorm blocks with layer-scale, qkv bias, CLS token, no final norm."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    downsample_ratio: float = 0.5  # pixel shuffle: 32x32 patches -> 16x16 tokens
    # InternVL dynamic tiling (config.json keys of the same names; pg_train.data.tiling): up to
    # max_dynamic_patch tiles chosen by aspect ratio, plus a thumbnail. Off: one view.
    dynamic_image_size: bool = False
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = False

    @property
    def grid_size(self) -> int:
        """Side of the token grid after pixel shuffle (16 for 448 px / patch 14)."""
        return int(self.image_size // self.patch_size * self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def shuffled_size(self) -> int:
        """Channels after pixel shuffle (4x the ViT width for ratio 0.5)."""
        return int(self.hidden_size / self.downsample_ratio**2)


@dataclass(frozen=True)
class LanguageDims:
    """Qwen2 decoder; Sa2VA-4B uses an untied lm_head."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class Sam2Dims:
    """SAM2 (v1 layout: object scores + object pointers, no `no_obj_embed_spatial`)."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    d_model: int = 256
    mem_dim: int = 64
    memory_attention_layers: int = 4
    memory_attention_ffn: int = 2048
    fuser_layers: int = 2
    num_maskmem: int = 7
    image_size: int = 1024
    # The arithmetic of the input's ImageNet normalisation (data.images.image_tensor): float32
    # as the official training normalises, or bfloat16 as its HF inference does
    # (`model.sam2_normalise`; docs/fidelity.md).
    normalise_dtype: str = "float32"

    @property
    def backbone_channel_list(self) -> list[int]:
        return [self.embed_dim * 2**i for i in reversed(range(len(self.stages)))]

    @property
    def mask_logits_size(self) -> int:
        """The decoder predicts masks at 1/4 of the SAM2 input (256 for 1024 px)."""
        return self.image_size // 4


@dataclass(frozen=True)
class LoraDims:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_embed_tokens: bool = False
    train_lm_head: bool = False


@dataclass(frozen=True)
class ObjectiveDefaults:
    """Objective settings whose right value depends on the model's scale: a run, `evaluate` and
    memcheck take them from the preset (or the checkpoint) unless the config sets them. The
    defaults are SPEC §3's real-scale values (top-k 128 of Sa2VA-4B's 151,679 ids, 64-token
    captions); the tiny presets override them to stay small (their vocabulary has ~500 ids)."""

    topk: int = 128
    max_caption_len: int = 64


@dataclass(frozen=True)
class ModelPreset:
    name: str
    vision: VisionDims
    language: LanguageDims
    sam2: Sam2Dims
    lora: LoraDims = field(default_factory=LoraDims)
    objective: ObjectiveDefaults = field(default_factory=ObjectiveDefaults)
    template: str = "phi3_chat"
    # Expected single-token ids of the special tokens; None = whatever the tokenizer assigns
    # (the tiny tokenizer), checked to be single tokens all the same.
    special_token_ids: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SA2VA_4B_SPECIAL_TOKEN_IDS = {
    "<img>": 151665,
    "</img>": 151666,
    "<IMG_CONTEXT>": 151667,
    "[SEG]": 151674,
    "<p>": 151675,
    "</p>": 151676,
    "<vp>": 151677,
    "</vp>": 151678,
    "<|im_end|>": 151645,
}

TINY_VISION = VisionDims(hidden_size=32, num_layers=2, num_heads=2, mlp_size=64)
TINY_SAM2 = Sam2Dims(
    embed_dim=8,
    num_heads=1,
    stages=(1, 2, 2, 1),
    global_att_blocks=(4,),
    window_spec=(8, 4, 4, 2),
    window_pos_embed_bkg_spatial_size=(4, 4),
    d_model=32,
    mem_dim=16,
    memory_attention_layers=1,
    memory_attention_ffn=64,
    fuser_layers=1,
    image_size=128,
)

TINY = ModelPreset(
    name="tiny",
    vision=TINY_VISION,
    language=LanguageDims(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=0,  # 0: taken from the tiny tokenizer
        max_position_embeddings=2048,
    ),
    sam2=TINY_SAM2,
    lora=LoraDims(r=8, alpha=16, dropout=0.0),
    objective=ObjectiveDefaults(topk=64, max_caption_len=24),
)

PRESETS: dict[str, ModelPreset] = {
    "sa2va-4b": ModelPreset(
        name="sa2va-4b",
        vision=VisionDims(
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            mlp_size=4096,
            dynamic_image_size=True,
            min_dynamic_patch=1,
            max_dynamic_patch=12,
            use_thumbnail=True,
        ),
        language=LanguageDims(
            hidden_size=2048,
            num_layers=36,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=11008,
            vocab_size=151_679,
        ),
        sam2=Sam2Dims(
            embed_dim=144,
            num_heads=2,
            stages=(2, 6, 36, 4),
            global_att_blocks=(23, 33, 43),
            window_spec=(8, 4, 16, 8),
            window_pos_embed_bkg_spatial_size=(7, 7),
        ),
        special_token_ids=SA2VA_4B_SPECIAL_TOKEN_IDS,
    ),
    "tiny": TINY,
    # The tiny preset at 112 px: a 4x4 token grid (16 image tokens instead of 256) for learning
    # experiments on a CPU (configs/learn_tiny_*.yaml). Everything else is the tiny preset's.
    "tiny-112": dataclasses.replace(TINY, name="tiny-112", vision=dataclasses.replace(TINY_VISION, image_size=112)),
    # CPU benchmark preset (pg_train.bench.step): Sa2VA-4B's vocabulary (151,679) and LLM width
    # (2048) so vocabulary-sized costs (lm_head rows, top-k over V, the Gumbel mixture at D=2048)
    # are real, with two LLM layers and the tiny vision / SAM2 towers so a step fits a CPU.
    "bench": ModelPreset(
        name="bench",
        vision=TINY_VISION,
        language=LanguageDims(
            hidden_size=2048,
            num_layers=2,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=11008,
            vocab_size=151_679,
            max_position_embeddings=4096,
        ),
        sam2=TINY_SAM2,
        lora=LoraDims(r=16, alpha=32, dropout=0.0),
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def preset_from_dict(data: dict[str, Any]) -> ModelPreset:
    """Inverse of `ModelPreset.to_dict` (used by checkpoints written by pg_train)."""
    return ModelPreset(
        name=data["name"],
        vision=_from_dict(VisionDims, data["vision"]),
        language=_from_dict(LanguageDims, data["language"]),
        sam2=_from_dict(Sam2Dims, data["sam2"]),
        lora=_from_dict(LoraDims, data.get("lora", {})),
        # a checkpoint written before presets carried objective defaults: its registry preset's
        objective=_from_dict(ObjectiveDefaults, data["objective"])
        if "objective" in data
        else PRESETS[data["name"]].objective
        if data["name"] in PRESETS
        else ObjectiveDefaults(),
        template=data.get("template", "phi3_chat"),
        special_token_ids=data.get("special_token_ids"),
    )
