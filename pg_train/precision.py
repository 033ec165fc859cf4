"""The student's compute dtype, applied to the model calls Accelerate does not wrap: the teacher's.

Why: Accelerate's mixed precision (bf16 or fp16 without DeepSpeed, `accelerate_configs/single_gpu.yaml`)
keeps fp32 weights and autocasts the prepared model's `forward` only. The student's passes go
through `forward` (`student(mode=...)`); the teacher calls `extract_feature`,
`embed_with_images` and the language model directly, so without this it decoded in fp32 while
the student trained in bf16 — a different numeric model than the one it teaches, and 2x the
matmul cost. Under DeepSpeed the weights themselves are bf16 and nothing is autocast, so both
already agree (`autocast_dtype` is None there).

`follow_accelerator(model, accelerator)` records the dtype on the unwrapped model
(`autocast_dtype`, a plain attribute, so a `full:<device>` teacher copy carries it);
`compute_autocast(module)` is the context the teacher's calls run under. Autocast state is
per thread, so the overlapped teacher's thread enters it itself (it calls the same function).

The teacher's autocast has `cache_enabled=False`: with the cache on, the bf16 casts of the
trainable (LoRA) weights made during the decoding's warm-up steps would be reused inside the
CUDA-graph capture, and the graph would read those cached copies' memory after the context
freed them (PyTorch: "make_graphed_callables does not support the autocast caching"). Without
the cache every step casts from the live fp32 weights, the values are the same.
"""

from __future__ import annotations

import contextlib

import torch

from .distributed import unwrap

_MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The dtype Accelerate autocasts the prepared model's forward to; None when it does not
    (no mixed precision, or DeepSpeed, whose weights are already in the compute dtype)."""
    if not accelerator.native_amp:
        return None
    return _MIXED.get(accelerator.mixed_precision)


def follow_accelerator(model, accelerator) -> None:
    """Make the teacher's calls on `model` (and on copies made from it afterwards) compute in
    the dtype the accelerator gives the student's forward. Call after `accelerator.prepare`,
    before the EMA teacher is built."""
    unwrap(model).autocast_dtype = autocast_dtype(accelerator)


def compute_autocast(module) -> contextlib.AbstractContextManager:
    """The autocast the student's passes run under, for `module`'s own device; a null context
    when the module has none recorded (plain fp32 or bf16 weights: they compute as stored)."""
    dtype = getattr(module, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    device = next(module.parameters()).device
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa inputs, fp32 accumulate):
    what remains fp32 under bf16 mixed precision (the fp32 logits' consumers, the EMA-free
    paths of an fp32 run) runs on the tensor cores. No effect on CPU results. The legacy flags
    are used on purpose: reading them raises once the newer `fp32_precision` API was used to
    set them, and transformers / Accelerate still read and write the legacy ones."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
