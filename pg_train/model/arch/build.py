"""`build_model(preset)`: the single way to construct a Sa2VA model (timm's create_model idea)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..text.tokenizer import load_tiny_tokenizer, special_token_ids
from .optional_bnb import bitsandbytes_hidden
from .presets import PRESETS, LoraDims, ModelPreset, get_preset
from .sa2va import Sa2VAModel

# Trainable parts besides LoRA (SPEC §1); everything else is frozen.
TRAINABLE_PREFIXES = ("mlp1.", "text_hidden_fcs.", "grounding_encoder.sam2_model.sam_mask_decoder.")


def apply_lora(model: Sa2VAModel, lora: LoraDims) -> None:
    """Inject PEFT LoRA adapters into the language model in place (names stay
    `language_model.model.layers.N...`, plus `.base_layer` / `.lora_A.default` / `.lora_B.default`).
    bitsandbytes stays unimported unless the model is quantized (optional_bnb: ~1 s of CPU)."""
    with bitsandbytes_hidden():
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
        )
        inject_adapter_in_model(config, model.language_model)


def set_trainable(model: Sa2VAModel, lora: LoraDims | None) -> None:
    """Freeze everything, then unfreeze LoRA, mlp1, text_hidden_fcs, the SAM2 mask decoder and,
    when configured, embed_tokens / lm_head."""
    for name, param in model.named_parameters():
        trainable = name.startswith(TRAINABLE_PREFIXES) or "lora_" in name
        if lora is not None:
            trainable |= lora.train_embed_tokens and name.startswith("language_model.model.embed_tokens.")
            trainable |= lora.train_lm_head and name.startswith("language_model.lm_head.")
        param.requires_grad_(trainable)


def resolve_preset(preset: str | ModelPreset, tokenizer) -> ModelPreset:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.language.vocab_size == 0:
        if tokenizer is None:
            raise ValueError(f"preset {preset.name!r} takes its vocabulary size from a tokenizer; none given")
        preset = dataclasses.replace(preset, language=dataclasses.replace(preset.language, vocab_size=len(tokenizer)))
    return preset


def build_model(
    preset: str | ModelPreset = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    lora: LoraDims | None | bool = True,
    tokenizer=None,
    template: str = "sa2va",
    seed: int | None = None,
    quantize_4bit: bool = False,
) -> Sa2VAModel:
    """Build a randomly initialised Sa2VA model.

    `lora`: True = the preset's LoRA, a LoraDims to override it, False/None = no adapters.
    `tokenizer`: defaults to the offline tiny tokenizer for `tiny`; `sa2va-4b` has no tokenizer
    offline, so its special-token ids come from the preset (from_pretrained verifies the real one).
    `device="meta"` builds the full architecture without memory (for counts and budgets).
    `quantize_4bit`: the frozen LLM projections in NF4 (QLoRA; bitsandbytes), before LoRA.
    """
    name = preset if isinstance(preset, str) else preset.name
    if tokenizer is None and name in PRESETS and PRESETS[name].special_token_ids is None:  # tiny, tiny-112, bench
        tokenizer = load_tiny_tokenizer()
    preset = resolve_preset(preset, tokenizer)
    if tokenizer is not None:
        token_ids = special_token_ids(tokenizer, preset.special_token_ids)
        if len(tokenizer) > preset.language.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model vocabulary is {preset.language.vocab_size}"
            )
    elif preset.special_token_ids is not None:
        token_ids = dict(preset.special_token_ids)
    else:
        raise ValueError(f"preset {preset.name!r} needs a tokenizer to know its special-token ids")

    lora_dims = preset.lora if lora is True else (lora or None)
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device)
    with torch.device(device):
        model = Sa2VAModel(preset, token_ids, tokenizer=tokenizer, template=template)
    model.grounding_encoder.to(device)
    model.to(dtype=dtype)
    if quantize_4bit:
        from .quantize import quantize_llm_base_4bit

        quantize_llm_base_4bit(model, compute_dtype=dtype)
    if lora_dims is not None:
        with torch.device(device):
            apply_lora(model, lora_dims)
        _cast_floating(model, dtype)
    model.lora = lora_dims
    model.quantized_4bit = quantize_4bit
    set_trainable(model, lora_dims)
    return model


def build_offline(preset: str, **kwargs) -> Sa2VAModel:
    """A registered preset with the tiny offline tokenizer standing in for its real one (no real
    tokenizer can be downloaded): captions use the tiny tokenizer's ordinary ids, and every
    vocabulary-sized tensor keeps the preset's real size. For measurements (memcheck, benchmarks)."""
    spec = dataclasses.replace(get_preset(preset), special_token_ids=None)
    return build_model(spec, tokenizer=load_tiny_tokenizer(), **kwargs)


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters (the new LoRA adapters) to `dtype`, leaving 4-bit storage alone."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def enable_gradient_checkpointing(model: Sa2VAModel) -> None:
    """Recompute the LLM's layer activations in backward (both student passes).

    Non-reentrant checkpointing: the reentrant variant drops gradients when a layer's inputs do
    not require grad (frozen embeddings + LoRA), which would silently cut pass 1 off.
    """
    model.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def component_parameter_counts(model: Sa2VAModel) -> dict[str, int]:
    """Parameters per released component; LoRA adapters counted separately from the base LLM."""
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {
        "vision_model": count_parameters(model.vision_model),
        "mlp1": count_parameters(model.mlp1),
        "language_model": count_parameters(model.language_model) - lora,
        "grounding_encoder": count_parameters(model.grounding_encoder),
        "text_hidden_fcs": count_parameters(model.text_hidden_fcs),
        "lora": lora,
    }
