"""The supervised objective, as the base Sa2VA model was trained: a region-caption language-model
loss and a referring-segmentation loss, both with the ground-truth text of the data.

A model from random weights cannot caption anything, so Pseudo-Gumbel has nothing to start
from: the supervised objective warms it up, and `mixed` keeps it in the mix as the original
recipe does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import unwrap
from .passes import (
    StepOutput,
    batch_region_cells,
    caption_lm_loss,
    mask_loss,
    no_observer,
    segment_image2,
    text_step_output,
    tokenize_captions,
)
from .settings import PseudoGumbelConfig


@dataclass
class SupervisedConfig:
    lm_weight: float = 1.0  # region-caption cross-entropy
    seg_weight: float = 1.0  # referring segmentation (2 BCE + 0.5 Dice, as the objective)
    mix_weight: float = 1.0  # objective=mixed: loss = pseudo_gumbel + mix_weight * supervised
    # Request summary (0 = off): lm_head at the [SEG] state predicts the caption's words (a bag
    # of words). A pretrained LLM already summarises the request at its last token; a random one
    # mixes the caption into [SEG] at a few percent of the image's influence, and segmentation
    # training then removes even that (masks ignore the text). This teaches the tiny preset's
    # LLM to carry the caption to [SEG]; a pretrained model does not need it.
    summary_weight: float = 0.0


def request_summary_loss(
    module, seg_hidden: torch.Tensor, caption_ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Per-sample cross-entropy [B] between lm_head(seg_hidden) and the uniform distribution over
    the sample's caption tokens (repeated tokens weigh more); 0 for an empty caption."""
    logp = torch.log_softmax(module.language_model.lm_head(seg_hidden).float(), dim=-1)
    real = (torch.arange(caption_ids.shape[1], device=caption_ids.device)[None] < lengths[:, None]).float()
    picked = logp.gather(1, caption_ids)  # [B, T] log-probabilities of each caption token
    return -(picked * real).sum(1) / lengths.clamp(min=1)


def supervised_step(student, batch: dict, cfg: PseudoGumbelConfig, sup: SupervisedConfig, observer=None) -> StepOutput:
    """batch: the objective's tensors plus `captions` (ground-truth text per sample). `observer`:
    as for pseudo_gumbel_step, around the stages this objective has (pass1, pass2, loss)."""
    observe = observer or no_observer
    module = unwrap(student)
    device = batch["pixel_values1"].device
    cells, fallback = batch_region_cells(batch, module.grid_size, cfg)
    targets, target_lengths = tokenize_captions(module, batch["captions"], cfg.max_caption_len, form="answer_end")
    with observe("pass1"):
        lm = caption_lm_loss(
            student,
            batch["pixel_values1"],
            cells,
            targets.to(device),
            target_lengths.to(device),
            batch.get("num_views1"),
        )

    caption_ids, lengths = tokenize_captions(module, batch["captions"], cfg.max_caption_len, form="segment")
    caption_ids, lengths = caption_ids.to(device), lengths.to(device)
    text_embeds = module.embed_tokens()(caption_ids)
    if text_embeds.requires_grad:
        text_embeds.retain_grad()  # its gradient norm is logged, as for the Pseudo-Gumbel embeddings
    with observe("pass2"):
        mask_logits, target, seg_hidden = segment_image2(student, batch, text_embeds, lengths, return_seg_hidden=True)
    with observe("loss"):
        seg = mask_loss(mask_logits, target, cfg.bce_weight, cfg.dice_weight)
        loss = sup.lm_weight * lm.mean() + sup.seg_weight * seg["loss"]
        summary = (
            request_summary_loss(module, seg_hidden, caption_ids, lengths).mean()
            if sup.summary_weight
            else torch.zeros(())
        )
        loss = loss + sup.summary_weight * summary
    out = text_step_output(loss, lm, seg, mask_logits, target, text_embeds, caption_ids, lengths, cells, fallback)
    out.metrics["summary_loss"] = summary.detach()
    return out
