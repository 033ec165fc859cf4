"""Small helpers for code that receives a model that may be wrapped by DDP / DeepSpeed / compile."""

from __future__ import annotations


def unwrap(model):
    """The module inside a DDP / DeepSpeed / compiled wrapper (read attributes from it; run
    the student's forward through the wrapper so gradients are synchronised)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)
