"""What ties self-training to a reference (issue 26): the KL anchor from the student's caption
distribution to a frozen reference, the references, and the confidence of teacher captions.

Generated language drifts when only a downstream loss shapes it (Lee et al. 2019; Lazaridou et
al. 2020); a KL term to a frozen model keeps the captions readable. The reference is either the
model with its LoRA adapters disabled (peft's own switch; no second copy of the weights) or a
snapshot of the trainable tensors (pg_train.ema's swap-in, frozen), taken when self-training began.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..distributed import unwrap


def caption_kl(student_logits: torch.Tensor, reference_logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over real caption tokens of KL(student || reference) [B], in fp32 or the
    inputs' wider dtype: sum_v p_s(v) (log p_s(v) - log p_r(v)). logits [B, T, V], lengths [B]."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = torch.log_softmax(student_logits.to(dtype), dim=-1)
    log_r = torch.log_softmax(reference_logits.detach().to(dtype), dim=-1)
    per_token = (log_s.exp() * (log_s - log_r)).sum(-1)
    real = (torch.arange(student_logits.shape[1], device=lengths.device)[None] < lengths[:, None]).to(dtype)
    return (per_token * real).sum(1) / lengths.clamp(min=1).to(dtype)


def lora_layers(model) -> list:
    """The model's peft adapter layers (peft.tuners.tuners_utils.BaseTunerLayer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unwrap(model).modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model):
    """The model with every LoRA adapter switched off (peft's `enable_adapters(False)`, what
    PeftModel.disable_adapter does), restored on exit with each tensor's requires_grad as it was
    (peft's switch clears it). Call it before the step's student passes build their graph."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("objective.anchor_reference=base needs a model with LoRA adapters (model.lora_r)")
    module = unwrap(model)
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, p in module.named_parameters():
            p.requires_grad_(flags[name])


@torch.no_grad()
def reference_caption_logits(reference, student, forward) -> torch.Tensor:
    """`forward(model)` (a caption-logits pass) under the reference, in eval mode, without grad.
    `reference(student)` is a context manager yielding the model to run (adapters_disabled, or an
    EMATeacher snapshot's `as_teacher`)."""
    with reference(student) as model:
        module = unwrap(model)
        was_training = module.training
        module.eval()
        try:
            return forward(module)
        finally:
            module.train(was_training)


def keep_confident(confidence: torch.Tensor, min_logprob: float | None, top_fraction: float) -> torch.Tensor:
    """Bool [B]: captions whose mean token log-prob is >= `min_logprob` (None: any) and among the
    ceil(top_fraction x B) most confident of the batch (ties: the earlier sample)."""
    keep = torch.ones_like(confidence, dtype=torch.bool)
    if min_logprob is not None:
        keep &= confidence >= min_logprob
    if top_fraction < 1.0:
        count = math.ceil(top_fraction * confidence.numel() - 1e-9)  # 0.3 x 10 is 3, not 4
        order = torch.sort(-confidence.float(), stable=True).indices
        top = torch.zeros_like(keep)
        top[order[:count]] = True
        keep &= top
    return keep
