"""Third-party messages that read like a broken install on every run, dropped at their source
logger (each one by its text, so the library's other messages still reach the user):

- bitsandbytes, at import on a CPU with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from
  kernels-community: No module named 'kernels'". It looks for an optional faster kernel for
  4-bit matmuls on CPU (the `kernels` package, not a dependency) and falls back to its own; only
  `model.quantize_4bit=true` on a CPU uses either.
- transformers, loading a released directory's tokenizer: "You are using a model of type
  `sa2va_chat` to instantiate a model of type ``". AutoTokenizer reads config.json to pick the
  tokenizer class, finds Sa2VA's model type (its modelling code is remote code transformers does
  not have) and falls back to the base config class; pg_train reads the config itself
  (pg_train.model.io.checkpoint), so nothing is mis-built.
- torch, while DeepSpeed loads its CPU ops (every rank of a CPU run under DeepSpeed): "No CUDA
  runtime is found, using CUDA_HOME=...". On a machine without a GPU that is the expected state;
  the ops it builds are CPU ops.
- DeepSpeed's ZeRO-2 calls `torch.distributed.all_gather_into_tensor`, which torch marks as
  deprecated with a FutureWarning per rank; it is DeepSpeed's call to change, not the user's.

`install()` runs when pg_train is imported (pg_train/__init__.py), before either library is.
"""

from __future__ import annotations

import logging
import warnings

KNOWN_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.configuration_utils": "You are using a model of type `sa2va_chat` to instantiate",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
}
KNOWN_WARNINGS = [(FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated")]


class DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install() -> None:
    """The filters of KNOWN_NOISE on their loggers (once; importing pg_train again adds none)."""
    for name, prefix in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
