"""The benchmark's batch from memcheck's prediction: the largest that fits, or a refusal.

Why: with tiling (Sa2VA-4B at 1024 px = 10 views) activations are ~10x the single-view case, and
the benchmark's old fixed batch 8 ran out of memory in every variant on an H200 (issue 28) —
which memcheck had predicted. The benchmark now asks the prediction first: with no --batch it
takes the largest candidate predicted to fit; a --batch predicted not to fit is refused with
the prediction printed (exit 2), before any model is built on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..memcheck.predict import Deployment, Prediction, predict

CANDIDATES = (16, 12, 8, 6, 4, 3, 2, 1)
# The prediction's peak may be below the allocator's by a few percent (+3.2% measured, issue 28)
# and fragmentation takes more: a batch fits when its predicted peak is under this share.
HEADROOM = 0.9


@dataclass
class Fit:
    batch: int
    prediction: Prediction
    capacity: int  # bytes: the GPU's memory, or the host's RAM on CPU

    @property
    def fits(self) -> bool:
        return self.prediction.peak_bytes <= HEADROOM * self.capacity

    def describe(self) -> str:
        p, gib = self.prediction, 2**30
        d = p.deployment
        return (
            f"memcheck predicts batch {self.batch} ({d.dtype}, {p.views} view(s) per image, captions {d.caption_len}, "
            f"checkpointing {'on' if d.gradient_checkpointing else 'off'}): peak {p.peak_bytes / gib:.1f} GiB in "
            f"'{p.peak_phase}' (static {p.static_bytes(d.device) / gib:.1f} GiB) of {self.capacity / gib:.1f} GiB "
            f"({HEADROOM:.0%} usable) -> {'fits' if self.fits else 'does NOT fit'}"
        )


def capacity_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def predictions(
    preset: str,
    batches: tuple[int, ...],
    *,
    caption_len: int,
    topk: int,
    gradient_checkpointing: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Fit]:
    """memcheck's prediction for the benchmark's step at each batch (one process, no DeepSpeed,
    torch AdamW, EMA `same`, fast decoding on CUDA), on a model built on `meta`."""
    from ..model import build_offline

    model = build_offline(preset, device="meta", dtype=dtype)
    capacity = capacity_bytes(device)
    where = f"{device.type}:{device.index or 0}" if device.type == "cuda" else "cpu"
    fits = []
    for batch in batches:
        d = Deployment(
            batch_size=batch,
            caption_len=caption_len,
            topk=topk,
            gradient_checkpointing=gradient_checkpointing,
            dtype="bf16" if dtype == torch.bfloat16 else "fp32",
            device=where,
            fast_decoding=device.type == "cuda",
        )
        fits.append(Fit(batch, predict(model, d), capacity))
    return fits


def choose_batch(preset: str, requested: int | None, **kwargs) -> tuple[int | None, list[Fit]]:
    """(batch, the predictions looked at): `requested` when it fits, else None (refused); with no
    request the largest of CANDIDATES that fits (None when not even batch 1 does)."""
    if requested is not None:
        fits = predictions(preset, (requested,), **kwargs)
        return (requested if fits[0].fits else None), fits
    fits = predictions(preset, CANDIDATES, **kwargs)
    return next((f.batch for f in fits if f.fits), None), fits
