"""Builders shared by training, evaluation and memcheck: the student from the config, its
trainable set, a training checkpoint's weights, the optimizer.

Kept apart from `train` so that `evaluate` and `memcheck` build exactly what training builds
without importing the training loop (and without an import cycle).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint_files import load_training_weights  # noqa: F401 (model.init_from; importable from here)
from .config import TrainConfig
from .model import build_model, enable_gradient_checkpointing, from_pretrained
from .model.arch.presets import get_preset
from .model.io.checkpoint import TILING_KEYS
from .model.io.state_check import CheckpointError, load_state_dict_checked


def lora_from_config(m, preset: str):
    """The preset's LoRA with the config's overrides (rank, alpha, dropout, targets, trainable
    embeddings / lm_head); None for a preset name the registry does not know (a checkpoint)."""
    from .model.arch.presets import PRESETS

    if preset not in PRESETS:
        return None
    return dataclasses.replace(
        get_preset(preset).lora,
        **{k: v for k, v in {"r": m.lora_r, "alpha": m.lora_alpha, "dropout": m.lora_dropout}.items() if v is not None},
        **({"target_modules": tuple(m.lora_targets)} if m.lora_targets else {}),
        train_embed_tokens=m.train_embed_tokens,
        train_lm_head=m.train_lm_head,
    )


def unfreeze_extra(model, prefixes: list[str]) -> None:
    """`model.extra_trainable`: parameters whose names start with one of `prefixes` train too
    (shared by training and memcheck, so memcheck budgets the same trainable set)."""
    if not prefixes:
        return
    unfrozen = [p.requires_grad_(True) for n, p in model.named_parameters() if n.startswith(tuple(prefixes))]
    if not unfrozen:
        raise ValueError(f"model.extra_trainable {prefixes} matches no parameter name")


# What the official predict_forward hard-codes whatever config.json says (`model.tiling=official`).
OFFICIAL_TILING = {"dynamic_image_size": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12, "use_thumbnail": True}


def apply_input_overrides(model, m) -> None:
    """`model.chat_template`, the tiling keys (or `model.tiling=official`), the stop rule, the
    caption special-token reading and the SAM2 normalisation, where set, replace the
    checkpoint's (or preset's) values: they decide what the model is shown, not its weights."""
    tiling = OFFICIAL_TILING if m.tiling == "official" else {}
    tiling = {**tiling, **{k: getattr(m, k) for k in TILING_KEYS if getattr(m, k) is not None}}
    if tiling:
        model.preset = dataclasses.replace(model.preset, vision=dataclasses.replace(model.preset.vision, **tiling))
    if m.sam2_normalise is not None:
        model.preset = dataclasses.replace(
            model.preset, sam2=dataclasses.replace(model.preset.sam2, normalise_dtype=m.sam2_normalise)
        )
    text_options = m.stop_rule != "contains" or m.caption_special_tokens != "text"
    if model.prompts is not None and (m.chat_template is not None or text_options):
        model.set_prompts(
            m.template,
            m.chat_template or model.prompts.chat_template,
            stop_rule=m.stop_rule,
            caption_special_tokens=m.caption_special_tokens,
        )


def build_student(cfg: TrainConfig):
    m = cfg.model
    lora = lora_from_config(m, m.preset)
    if m.checkpoint:
        model = from_pretrained(
            m.checkpoint,
            lora=lora if lora is not None else True,
            template=m.template,
            quantize_4bit=m.quantize_4bit,
            allow_nonfinite=m.allow_nonfinite_weights,
        )
    else:
        model = build_model(m.preset, lora=lora, template=m.template, seed=cfg.seed, quantize_4bit=m.quantize_4bit)
    apply_input_overrides(model, m)
    model.trim_last_layer = m.trim_last_layer
    unfreeze_extra(model, m.extra_trainable)
    if m.init_from:
        load_training_weights(model, m.init_from, command="model.init_from", allow_nonfinite=m.allow_nonfinite_weights)
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def load_checkpoint(path: str | Path, device: str = "cpu", *, command: str, weights: str = "student"):
    """(model, the run's config or None) from a model directory (config.json + safetensors; the
    config when pg-train-export wrote it), a training checkpoint of any layout
    (`checkpoint_files`) next to its run's config.yaml, or a run directory (its newest complete
    checkpoint). `weights`: the student, or the EMA teacher
    (the student with its trainable tensors replaced by the shadow). Errors name `command`."""
    from .checkpoint_files import (
        RELEASED,
        checkpoint_layout,
        errors_naming,
        read_ema_shadow,
        resolve_checkpoint,
        run_config_path,
        training_state_dict,
        with_ema,
    )
    from .config import load_config

    if weights not in ("student", "ema"):
        raise ValueError(f"weights must be 'student' or 'ema', got {weights!r}")
    path = resolve_checkpoint(path, command)
    config = run_config_path(path)
    if checkpoint_layout(path, command) == RELEASED:
        if weights == "ema":
            raise CheckpointError(f"{command}: {path} is a model directory: it holds no EMA teacher (only the weights)")
        # an exported model carries its run's config (prompts, objective settings, data): None otherwise
        cfg = load_config([config], ["resume=null", "model.init_from=null"]) if config.is_file() else None
        with errors_naming(command):
            model = from_pretrained(path, device=device, template=cfg.model.template if cfg else "sa2va")
        if cfg is not None:
            apply_input_overrides(model, cfg.model)
        return model, cfg
    if not config.is_file():
        raise CheckpointError(f"{command}: {path} is a training checkpoint but its run's {config} is missing")
    cfg = load_config([config], ["resume=null", "model.init_from=null"])
    state, where = training_state_dict(path, command)
    if weights == "ema":
        shadow, where = read_ema_shadow(path, command)
        state = with_ema(state, shadow, where, command)
    model = build_student(cfg)
    with errors_naming(command):
        load_state_dict_checked(model, state, where, allow_nonfinite=cfg.model.allow_nonfinite_weights)
    return model.to(device), cfg


def fused_adamw_applies(params) -> bool:
    """Whether torch's fused AdamW kernel may take `params` (tensors, or param-group dicts):
    every one a floating-point CUDA tensor, and no DeepSpeed (ZeRO hands the optimizer its own
    flat partitions, on the CPU when it offloads)."""
    from .accel import deepspeed_requested

    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    return bool(tensors) and not deepspeed_requested() and all(t.is_cuda and t.is_floating_point() for t in tensors)


def _fuse_once_on_cuda(optimizer: torch.optim.Optimizer) -> None:
    """Training builds the optimizer before Accelerate moves the model to its device: decide at
    the first step instead, once, where the parameters are then. On CPU nothing changes."""

    def pre_step(opt, args, kwargs):
        handle.remove()
        fused = fused_adamw_applies(opt.param_groups)
        for group in opt.param_groups:
            if not fused:  # (a state resumed from a fused run on the CPU: the default implementation again)
                if group.get("fused"):
                    group["fused"], group["foreach"] = None, None
                continue
            group["fused"], group["foreach"] = True, False
            for p in group["params"]:
                state = opt.state.get(p)
                if state and torch.is_tensor(state.get("step")):  # resumed state: the kernel reads it on the device
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    handle = optimizer.register_step_pre_hook(pre_step)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `params`. Plain AdamW uses torch's fused kernel (one launch
    for every tensor instead of a loop of small ones) when every parameter is on CUDA — now, or at
    the first step once Accelerate has moved them — and DeepSpeed is not in charge; elsewhere it is
    torch's default implementation, unchanged (CPU results bitwise as before)."""
    o = cfg.optim
    if o.name == "adamw8bit":  # bitsandbytes: 2 bytes of Adam state per parameter instead of 8
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    params = list(params)
    fused = {"fused": True} if fused_adamw_applies(params) else {}
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)
    if not fused:
        _fuse_once_on_cuda(optimizer)
    return optimizer
