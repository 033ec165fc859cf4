"""peft without bitsandbytes for models that have no 4-bit or 8-bit layers.

peft 0.21 imports bitsandbytes unconditionally (`peft/helpers.py`, at `import peft`) and again when
it injects LoRA (`peft.tuners.lora.model` adds its bitsandbytes dispatchers whenever the package
is installed). Importing bitsandbytes registers its CPU kernels, which imports torch's inductor
and looks for the optional `kernels` package: ~1 s of CPU per process (measured with
`python -X importtime`, docs/benchmarks.md), paid by every process that builds a model although
only `model.quantize_4bit` / `optim.name=adamw8bit` use bitsandbytes.

A model can hold bitsandbytes layers only if bitsandbytes was imported before (the quantizer
imports it), so while it is not in `sys.modules` peft is shown the package as absent, the state
peft supports for machines without it: `sys.modules["bitsandbytes"] = None` makes the import
raise ImportError and `importlib.util.find_spec` return None. Afterwards the entry is removed and
peft's cached answers (`is_bnb_available`, `is_bnb_4bit_available`) are cleared, so a quantized
model built later in the same process gets peft's bitsandbytes layers as usual.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def bitsandbytes_hidden() -> Iterator[None]:
    """Inside: `import bitsandbytes` fails as if it were not installed, unless it is already
    imported (then nothing changes: the model may hold its layers)."""
    if "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        import_utils = sys.modules.get("peft.import_utils")
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            cached = getattr(import_utils, name, None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
