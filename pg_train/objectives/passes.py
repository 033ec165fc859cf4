"""The forward passes and losses every objective shares, over (model, batch tensors).

    forward_for_logits             region prompt + caption -> the caption's logits (teacher forcing)
    forward_mask_with_text_embeds  segmentation prompt with the caption as embeddings -> mask logits
    segment_image2                 pass 2 on a batch's image 2 -> mask logits and the target they meet
    mask_loss / mask_iou           2 BCE + 0.5 Dice at the decoder's resolution; per-sample IoU
    tokenize_captions              text -> ids as the released model reads them

Pseudo-Gumbel (objectives.pseudo_gumbel) runs them as its steps 3, 5 and 6; the supervised and
pseudo-label objectives run them with text instead of Gumbel samples. The student may be wrapped
(DDP / DeepSpeed): every student computation is a call of the wrapper (`student(mode=...)`) so
gradients are synchronised; attributes (token ids, prompts) are read from the unwrapped module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..distributed import unwrap
from ..model.text.regions import select_cells
from ..model.text.templates import left_pad


def special_ids(model) -> torch.Tensor:
    """Bool [V] of ids that must never appear in a caption (the model's special_id_mask)."""
    return unwrap(model).special_id_mask


def views_per_sample(num_views: torch.Tensor | None, batch_size: int) -> list[int]:
    return [1] * batch_size if num_views is None else [int(n) for n in num_views.tolist()]


def batch_region_cells(batch: dict, grid_size: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(cells [B, G, G] bool, empty [B] bool) of each sample's region 1, selected by the
    objective's region settings (`region_rule`, `region_threshold`, `empty_region_policy`) from
    the cell maps the data pipeline computed on the full-resolution mask (data.loader.region_tensors)."""
    nearest, coverage = batch["region_nearest1"], batch["region_coverage1"]
    if tuple(nearest.shape[1:]) != (grid_size, grid_size):
        raise ValueError(
            f"region cell maps are {tuple(nearest.shape[1:])}, the model's grid is {grid_size}x{grid_size}: "
            "the batch was preprocessed for another model (data.loader.preprocess_for)"
        )
    return select_cells(nearest, coverage, cfg.region_threshold, cfg.empty_region_policy, cfg.region_rule)


def region_prompts(
    model, region_cells: torch.Tensor, num_views: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded region prompts (ids, mask) [B, L] for K_b cells and each sample's views."""
    counts = region_cells.flatten(1).sum(1).tolist()
    views = views_per_sample(num_views, len(counts))
    return left_pad(
        [model.prompts.region_prompt(int(k), v) for k, v in zip(counts, views)], model.tokenizer.pad_token_id
    )


# ---- captions as ids -----------------------------------------------------------------------------
def tokenize_captions(
    model, captions: list[str | None], max_len: int, form: str = "answer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B] of the captions, encoded as the released model
    reads them (templates.PromptBuilder): `answer` after the region prompt, `answer_end` with
    the chat template's end text in the same run (it teaches where a caption stops), `segment`
    inside the segmentation prompt (with its leading space). A caption longer than `max_len`
    ids is cut there first."""
    prompts = unwrap(model).prompts
    tokenizer = unwrap(model).tokenizer
    encoders = {
        "answer": prompts.answer_ids,
        "answer_end": lambda text: prompts.answer_ids(text, with_end=True),
        "segment": prompts.segment_caption_ids,
    }
    if form not in encoders:
        raise ValueError(f"unknown caption form {form!r}; expected one of {sorted(encoders)}")
    rows = []
    for text in captions:
        text = text or ""
        ids = prompts.answer_ids(text)
        if len(ids) > max_len:
            text = tokenizer.decode(ids[:max_len])
        rows.append(encoders[form](text))
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)


# ---- caption logits (Pseudo-Gumbel step 3; the supervised caption loss) --------------------------
def forward_for_logits(
    student,
    pixel_values: torch.Tensor,
    region_cells: torch.Tensor,
    caption_ids: torch.Tensor,
    caption_lengths: torch.Tensor,
    num_views: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced student pass over prompt + (masked) caption -> caption logits [B, T, V].

    Row layout: [left padding | region prompt (P columns in all) | caption T | ...]. The logit
    that predicts caption token t sits at row P - 1 + t (the seed sliced [-(T+1):-1], one row
    late). Only those T rows reach lm_head.
    """
    model = unwrap(student)
    prompt_ids, prompt_mask = region_prompts(model, region_cells, num_views)
    prompt_ids, prompt_mask = prompt_ids.to(caption_ids.device), prompt_mask.to(caption_ids.device)
    T = caption_ids.shape[1]
    caption_mask = (torch.arange(T, device=caption_ids.device)[None] < caption_lengths[:, None]).long()
    P = prompt_ids.shape[1]
    return student(
        mode="caption_logits",
        input_ids=torch.cat([prompt_ids, caption_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, caption_mask], dim=1),
        pixel_values=pixel_values,
        region_cells=region_cells,
        first_row=P - 1,
        num_rows=T,
        num_views=num_views,
    )


def caption_lm_loss(
    student,
    pixel_values: torch.Tensor,
    region_cells: torch.Tensor,
    target_ids: torch.Tensor,
    lengths: torch.Tensor,
    num_views: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample mean cross-entropy of the region prompt's answer (teacher forcing) [B]."""
    logits = forward_for_logits(student, pixel_values, region_cells, target_ids, lengths, num_views)
    real = torch.arange(target_ids.shape[1], device=target_ids.device)[None] < lengths[:, None]
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), target_ids, reduction="none")
    return (token_loss * real).sum(1) / lengths.clamp(min=1)


# ---- segment image 2 from the caption (Pseudo-Gumbel step 5) -------------------------------------
def segment_prompt(
    model, caption_lengths: torch.Tensor, T: int, device: torch.device, num_views: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pass 2's token frame around T caption slots: (prefix ids [B, P] left-padded when samples
    have different numbers of views, prefix mask [B, P], caption mask [B, T], suffix ids [B, Q],
    index of the answer's [SEG] in the suffix)."""
    B, caption_lengths = caption_lengths.shape[0], caption_lengths.to(device)
    prefix, prefix_mask = left_pad(
        [model.prompts.segment_prefix(v) for v in views_per_sample(num_views, B)], model.tokenizer.pad_token_id
    )
    suffix_ids, seg_index = model.prompts.segment_suffix()
    suffix = torch.tensor(suffix_ids, device=device).expand(B, -1)
    caption_mask = (torch.arange(T, device=device)[None] < caption_lengths[:, None]).long()
    return prefix.to(device), prefix_mask.to(device), caption_mask, suffix, seg_index


def space_slot_rows(
    needs_slot: torch.Tensor, caption_ids: torch.Tensor, caption_lengths: torch.Tensor
) -> torch.Tensor | None:
    """Bool [B]: the rows whose first caption id has no single-token leading-space twin (see
    templates.LeadingSpace); None for captions of no tokens at all."""
    if caption_ids.shape[1] == 0:
        return None
    return needs_slot[caption_ids[:, 0]] & (caption_lengths > 0)


def with_space_slot(
    model, text_embeds: torch.Tensor, caption_mask: torch.Tensor, space_slot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend one slot holding the space token's embedding, attended only where `space_slot`
    [B] (the caption's first token has no single-token leading-space twin)."""
    space = model.embed_tokens()(torch.tensor([model.prompts.leading_space.space_id], device=text_embeds.device))
    embeds = torch.cat([space.to(text_embeds.dtype).expand(text_embeds.shape[0], 1, -1), text_embeds], dim=1)
    return embeds, torch.cat([space_slot.to(caption_mask)[:, None], caption_mask], dim=1)


def answer_caption_embeds(
    model, caption_ids: torch.Tensor, caption_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, T, D] of captions given as answer-context ids (as the teacher generates
    them) read inside the segment prompt: the first id through its leading-space twin, and the
    space_slot [B] rows that need a separate space token (for forward_mask_with_text_embeds)."""
    model = unwrap(model)
    if caption_ids.shape[1] == 0:
        return model.embed_tokens()(caption_ids), None
    twin, needs_slot = model.prompts.leading_space.on(caption_ids.device)
    rows = torch.cat([twin[caption_ids[:, :1]], caption_ids[:, 1:]], dim=1)
    space_slot = space_slot_rows(needs_slot, caption_ids, caption_lengths)
    return model.embed_tokens()(rows), space_slot


def forward_mask_with_text_embeds(
    student,
    pixel_values: torch.Tensor,
    sam_pixel_values: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_lengths: torch.Tensor,
    return_seg_hidden: bool = False,
    space_slot: torch.Tensor | None = None,
    num_views: torch.Tensor | None = None,
):
    """Segmentation prompt with the caption as embeddings -> mask logits [B, S/4, S/4].

    prefix (image 2 + instruction) | text_embeds [B, T, D], padded slots masked out of
    attention | suffix with exactly one [SEG] (the answer's; the seed's suffix had two).
    The embeddings are of the caption as it reads after the instruction, its leading space
    included; `space_slot` [B]: rows whose space is a separate token (see with_space_slot).
    """
    model = unwrap(student)
    prefix, prefix_mask, caption_mask, suffix, seg_index = segment_prompt(
        model, caption_lengths, text_embeds.shape[1], text_embeds.device, num_views
    )
    if space_slot is not None:
        text_embeds, caption_mask = with_space_slot(model, text_embeds, caption_mask, space_slot)
    return student(
        mode="segment",
        prefix_ids=prefix,
        caption_embeds=text_embeds,
        caption_mask=caption_mask,
        suffix_ids=suffix,
        seg_index=seg_index,
        pixel_values=pixel_values,
        sam_pixel_values=sam_pixel_values,
        return_seg_hidden=return_seg_hidden,
        prefix_mask=prefix_mask,
        num_views=num_views,
    )


class Image2Segmentation(NamedTuple):
    mask_logits: torch.Tensor  # [B, h, w] at the decoder's resolution
    target: torch.Tensor  # [B, h, w] image 2's mask, area-downsampled to the logits (resize_target)
    seg_hidden: torch.Tensor | None  # the [SEG] state [B, D] when asked for, else None


def segment_image2(
    student,
    batch: dict[str, torch.Tensor],
    text_embeds: torch.Tensor,
    caption_lengths: torch.Tensor,
    space_slot: torch.Tensor | None = None,
    return_seg_hidden: bool = False,
) -> Image2Segmentation:
    """Pass 2 of every objective: segment image 2 of `batch` (`pixel_values2`,
    `sam_pixel_values2`, optional `num_views2`) from the caption embeddings, with the target the
    mask loss compares against (`masks2` at the logits' resolution). The mask loss itself stays
    with each objective's loss stage (observed apart from pass 2: bench.step, memcheck)."""
    out = forward_mask_with_text_embeds(
        student,
        batch["pixel_values2"],
        batch["sam_pixel_values2"],
        text_embeds,
        caption_lengths,
        return_seg_hidden=return_seg_hidden,
        space_slot=space_slot,
        num_views=batch.get("num_views2"),
    )
    mask_logits, seg_hidden = out if return_seg_hidden else (out, None)
    target = resize_target(batch["masks2"].to(mask_logits.device), mask_logits.shape[-2:])
    return Image2Segmentation(mask_logits, target, seg_hidden)


# ---- loss (Pseudo-Gumbel step 6) and IoU ---------------------------------------------------------
def resize_target(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """masks [B, H, W] of per-pixel coverage in [0, 1] -> [B, h, w] area fractions (a small
    object stays visible as a soft target instead of vanishing under nearest resizing)."""
    return F.adaptive_avg_pool2d(masks.float().clamp(0, 1)[:, None], size)[:, 0]


def mask_loss(
    mask_logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 2.0, dice_weight: float = 0.5
) -> dict[str, torch.Tensor]:
    """Per-sample BCE-with-logits and Dice at the **decoder's resolution** (256x256 for SAM2 at
    1024 px; S/4 in general): the target is area-downsampled to the logits, not the logits
    upsampled to the target. Dice uses Sa2VA's +1 smoothing.

    Returns per-sample `bce` [B], `dice` [B] and the scalar `loss` = mean(w_bce*bce + w_dice*dice).
    """
    logits = mask_logits.float().flatten(1)
    target = target.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    loss = (bce_weight * bce + dice_weight * dice).mean()
    return {"loss": loss, "bce": bce, "dice": dice}


def iou_counts(mask_logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (intersection, union) pixel counts of (logits > 0) vs the target, at the
    logits' resolution.

    The true region is where the target covers at least half a pixel; an object smaller than
    that (possible at 256x256, common at the tiny preset's 32x32) is its most-covered pixel(s),
    so a prediction of nothing never scores IoU 1 against a real object.
    """
    pred = mask_logits.detach() > 0
    target = target.detach().flatten(1)
    truth = target >= 0.5
    peak = (target == target.amax(dim=1, keepdim=True)) & (target > 0)
    truth = torch.where(truth.any(dim=1, keepdim=True), truth, peak).view_as(pred)
    return (pred & truth).flatten(1).sum(1).float(), (pred | truth).flatten(1).sum(1).float()


def mask_iou(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU (see iou_counts); an empty prediction of an empty target counts as 1."""
    inter, union = iou_counts(mask_logits, target)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


# ---- what an objective's step returns ------------------------------------------------------------
def no_observer(stage: str) -> contextlib.AbstractContextManager:
    """The default phase observer: observes nothing."""
    return contextlib.nullcontext()


@dataclass
class StepOutput:
    loss: torch.Tensor
    bce: torch.Tensor  # [B]
    dice: torch.Tensor  # [B]
    mask_logits: torch.Tensor  # [B, h, w]
    text_embeds: torch.Tensor  # [B, T, D], grad retained for audits
    caption_ids: torch.Tensor  # teacher captions [B, T]
    caption_lengths: torch.Tensor  # [B]
    masked_ids: torch.Tensor  # after step 2
    replaced: torch.Tensor  # [B, T] bool
    hard_ids: torch.Tensor  # Gumbel picks [B, T]
    region_k: torch.Tensor  # [B] cells in each region prompt
    region_fallback: torch.Tensor  # [B] bool: no cell sampled the region (K from the empty-region policy)
    metrics: dict = field(default_factory=dict)


def text_step_output(
    loss: torch.Tensor,
    lm: torch.Tensor,
    seg: dict[str, torch.Tensor],
    mask_logits: torch.Tensor,
    target: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_ids: torch.Tensor,
    lengths: torch.Tensor,
    cells: torch.Tensor,
    fallback: torch.Tensor,
) -> StepOutput:
    """The StepOutput of an objective whose segmenter reads a given text (supervised: the
    ground truth; pseudo-label: the teacher's caption): nothing masked, no Gumbel picks."""
    metrics = {
        "loss": loss.detach(),
        "lm_loss": lm.detach().mean(),
        "bce": seg["bce"].detach().mean(),
        "dice": seg["dice"].detach().mean(),
        "iou": mask_iou(mask_logits, target).mean(),
        "caption_len_mean": lengths.float().mean(),
        "replaced_fraction": torch.zeros(()),
        "region_k_mean": cells.flatten(1).sum(1).float().mean(),
        "region_fallbacks": fallback.sum(),
    }
    return StepOutput(
        loss=loss,
        bce=seg["bce"],
        dice=seg["dice"],
        mask_logits=mask_logits,
        text_embeds=text_embeds,
        caption_ids=caption_ids,
        caption_lengths=lengths,
        masked_ids=caption_ids,
        replaced=torch.zeros_like(caption_ids, dtype=torch.bool),
        hard_ids=caption_ids,
        region_k=cells.flatten(1).sum(1),
        region_fallback=fallback,
        metrics=metrics,
    )
