"""Building the Accelerator: the one place that knows the CPU + DeepSpeed launch quirk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Shipped with the package (the repository's accelerate_configs/ and ds_configs/ link here), so an
# accelerate config naming `ds_configs/zero2.json` works from any folder and from an installed package.
ACCELERATE_CONFIGS = Path(__file__).with_name("accelerate_configs")
DS_CONFIGS = Path(__file__).with_name("ds_configs")


class DeepSpeedConfigNotFound(FileNotFoundError):
    """The accelerate config's deepspeed_config_file is neither a file nor a shipped DeepSpeed config."""


def resolve_deepspeed_config_file() -> None:
    """Accelerate hands `deepspeed_config_file` to every process as written, and DeepSpeed opens
    it relative to the folder the launch started in: the shipped accelerate configs' relative
    `ds_configs/NAME.json` broke a launch from anywhere but the repository root (three chained
    tracebacks). A relative path that is not a file here is looked up by name among the shipped
    DeepSpeed configs (DS_CONFIGS) and replaced by that file's absolute path."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none" or Path(path).is_file():
        return
    shipped = DS_CONFIGS / Path(path).name
    if Path(path).is_absolute() or not shipped.is_file():
        raise DeepSpeedConfigNotFound(
            f"the accelerate config's deepspeed_config_file {path!r} is not a file (relative paths: to "
            f"{os.getcwd()}) nor a shipped DeepSpeed config ({', '.join(sorted(p.name for p in DS_CONFIGS.glob('*.json')))})"
        )
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(shipped)


def configure_environment() -> None:
    """Defaults that must be set before DeepSpeed is imported: JIT ops cached inside the venv
    (warmed by scripts/setup.sh), without CUDA DeepSpeed's CPU accelerator, and the DeepSpeed
    config file found from any folder (resolve_deepspeed_config_file)."""
    resolve_deepspeed_config_file()
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
