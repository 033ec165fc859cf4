"""Building the Accelerator: the one place that knows the CPU + DeepSpeed launch quirk."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def configure_environment() -> None:
    """Defaults that must be set before DeepSpeed is imported: JIT ops cached inside the venv
    (warmed by scripts/setup.sh) and, without CUDA, DeepSpeed's CPU accelerator."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(
    *, gradient_accumulation_steps: int = 1, micro_batch_size: int = 1, gradient_clipping: float | None = None, **kwargs
):
    """An Accelerator that sees the real world size under DeepSpeed on CPU, with TF32 on for
    fp32 matmuls on CUDA (pg_train.precision.enable_tf32).

    Under `accelerate launch` with DeepSpeed and no CUDA, Accelerate finds no device backend and
    reports one process on every rank (unsharded data, every rank "main"); `use_cpu` would
    silently drop DeepSpeed. Asking for the gloo backend fixes it — but only when launched
    (LOCAL_RANK set): in a plain `python` run there is no process group to join.
    """
    configure_environment()
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from .precision import enable_tf32

    enable_tf32()

    handlers = list(kwargs.pop("kwargs_handlers", []))
    if "LOCAL_RANK" in os.environ and deepspeed_requested() and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, kwargs_handlers=handlers, **kwargs
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        # Our batches are dicts from our own loader; tell DeepSpeed the sizes directly.
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * accelerator.num_processes
        config["gradient_accumulation_steps"] = gradient_accumulation_steps
        if gradient_clipping is not None:
            config["gradient_clipping"] = gradient_clipping
        elif config.get("gradient_clipping") == "auto":
            config["gradient_clipping"] = 0.0
    return accelerator
