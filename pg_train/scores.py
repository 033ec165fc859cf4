"""The numbers an evaluation reports, from pixel counts: per-sample intersection and union at
the image's own resolution (the RefCOCO protocol), and cIoU / gIoU over a set."""

from __future__ import annotations

import torch

from .inference import mask_at
from .objectives.passes import iou_counts, resize_target


def ciou_giou(inter: torch.Tensor, union: torch.Tensor) -> dict[str, float]:
    """RefCOCO's two numbers from per-sample pixel counts: cIoU = sum(I) / sum(U) (large objects
    weigh more), gIoU = mean(I / U) (every sample weighs the same; U = 0 counts as IoU 1)."""
    inter, union = inter.double(), union.double()
    per_sample = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {
        "cIoU": float(inter.sum() / union.sum()) if float(union.sum()) > 0 else 0.0,
        "gIoU": float(per_sample.mean()) if len(per_sample) else 0.0,
    }


def intersection_union(logits: torch.Tensor, truth: torch.Tensor) -> tuple[int, int]:
    """Pixel counts of (logits > 0, upsampled bilinearly to the truth's [H, W]) vs the truth."""
    pred = mask_at(logits, tuple(truth.shape))
    truth = truth.bool().cpu()
    return int((pred & truth).sum()), int((pred | truth).sum())


def sample_counts(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (intersection, union) of the predicted masks vs image 2's truth: at the image's
    own resolution when the batch carries `truths` (the RefCOCO protocol: logits upsampled
    bilinearly), else at the logits' resolution against the area-downsampled mask (iou_counts)."""
    if "truths" in batch:
        pairs = [intersection_union(row, truth) for row, truth in zip(logits, batch["truths"])]
        return torch.tensor([p[0] for p in pairs], dtype=torch.float64), torch.tensor(
            [p[1] for p in pairs], dtype=torch.float64
        )
    target = resize_target(batch["masks2"].to(logits.device), logits.shape[-2:])
    inter, union = iou_counts(logits, target)
    return inter.cpu(), union.cpu()
