"""QLoRA-style 4-bit frozen LLM base (bitsandbytes NF4) for small GPUs."""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_llm_base_4bit(model, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the decoder layers' projection Linears with NF4 `Linear4bit` (frozen), in place.

    Call before LoRA is injected (peft wraps bitsandbytes layers). Embeddings, lm_head, norms,
    the vision tower and SAM2 stay as they are. Returns the number of layers quantized.
    """
    import bitsandbytes as bnb

    count = 0
    for parent in model.language_model.model.layers.modules():
        for name, child in list(parent.named_children()):
            if name not in QUANTIZED_LINEARS or not isinstance(child, nn.Linear):
                continue
            device = child.weight.device
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta" if device.type == "meta" else None,
            )
            # bitsandbytes repacks CPU weights for inference the first time an eval-mode forward
            # runs (teacher generation); training forwards on the repacked weights then fail
            # (in-place bias add under autograd). Keep the trainable layout.
            quantized.support_avx512bf16_for_cpu = False
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, quantized.to(device))  # bitsandbytes quantizes on the move
            count += 1
    if count == 0:
        raise ValueError("no projection Linear found to quantize in language_model.model.layers")
    return count
