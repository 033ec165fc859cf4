"""The pseudo-label objective (issue 26): the teacher's caption as a hard target, for the
caption cross-entropy and for segmentation, on unlabelled pairs — the plain self-training
baseline Pseudo-Gumbel must beat (no Gumbel sample, no masking: the segmenter reads the
teacher's words, the captioner learns to say them). The confidence filter applies as for
Pseudo-Gumbel (objective.filter_*)."""

from __future__ import annotations

import torch

from ..distributed import unwrap
from .anchor import keep_confident
from .drift import teacher_side
from .passes import (
    StepOutput,
    answer_caption_embeds,
    batch_region_cells,
    caption_lm_loss,
    mask_loss,
    no_observer,
    segment_image2,
    text_step_output,
)
from .pseudo_gumbel import filtering, kept_mean
from .settings import PseudoGumbelConfig
from .supervised import SupervisedConfig
from .teacher import generate_pseudo_tokens_with_ema, teacher_confidence


def pseudo_label_step(
    student,
    teacher,
    batch: dict,
    cfg: PseudoGumbelConfig,
    sup: SupervisedConfig,
    observer=None,
    reference=None,
    diagnose: bool = False,
) -> StepOutput:
    """Teacher captions of region 1 (step 1 of Pseudo-Gumbel), then sup.lm_weight x caption
    cross-entropy of the student on them + sup.seg_weight x the mask loss of segmenting image 2
    from them as text; samples the confidence filter drops carry no loss. `diagnose`: also the
    teacher side of the drift diagnostics (objectives.drift.teacher_side, under `reference` when
    the KL anchor names one), before the student's passes."""
    observe = observer or no_observer
    module = unwrap(student)
    views1 = batch.get("num_views1")
    cells, fallback = batch_region_cells(batch, module.grid_size, cfg)
    with observe("teacher"):
        caption_ids, lengths = batch.get("teacher_captions") or generate_pseudo_tokens_with_ema(
            teacher, batch["pixel_values1"], cells, cfg, None, student, views1
        )
        keep = torch.ones_like(lengths, dtype=torch.bool)
        confidence = None
        if filtering(cfg):
            confidence = teacher_confidence(
                teacher, batch["pixel_values1"], cells, caption_ids, lengths, student, views1
            )
            keep = keep_confident(confidence, cfg.filter_min_logprob, cfg.filter_top_fraction)
        drift = (
            teacher_side(teacher, student, batch["pixel_values1"], cells, caption_ids, lengths, views1, reference)
            if diagnose
            else {}
        )
    with observe("pass1"):
        lm = caption_lm_loss(student, batch["pixel_values1"], cells, caption_ids, lengths, views1)
    text_embeds, space_slot = answer_caption_embeds(module, caption_ids, lengths)
    with observe("pass2"):
        mask_logits, target, _ = segment_image2(student, batch, text_embeds, lengths, space_slot)
    with observe("loss"):
        seg = mask_loss(mask_logits, target, cfg.bce_weight, cfg.dice_weight)
        per_sample = cfg.bce_weight * seg["bce"] + cfg.dice_weight * seg["dice"]
        loss = sup.lm_weight * kept_mean(lm, keep) + sup.seg_weight * kept_mean(per_sample, keep)
    out = text_step_output(loss, lm, seg, mask_logits, target, text_embeds, caption_ids, lengths, cells, fallback)
    out.metrics.update(drift)
    if confidence is not None:
        out.metrics.update(
            filter_kept=keep.sum().float(), filter_dropped=(~keep).sum().float(), teacher_confidence=confidence.mean()
        )
    return out
