"""The design note's Pseudo-Gumbel step, written literally — a baseline for pg_train.bench.step only.

What makes it the seed's step (each is what our step avoids):
- the teacher is a full copy of the student, and its EMA update walks every parameter of that
  copy (ours: an fp32 shadow of the trainable tensors, swapped in to generate);
- pass 1 computes full-vocabulary logits for the whole sequence and slices the caption rows
  (ours: lm_head on the caption rows only);
- the Gumbel step gathers a dense [B, T, k, D] tensor (ours: a custom straight-through function);
- pass 2 calls the causal LM (`language_model(inputs_embeds=...)`, hidden_states[-1] at
  [SEG]), so lm_head runs on every row although no logit is read (ours: no lm_head in pass 2);
- every LLM forward runs its last layer on every row (ours: only on the rows read,
  pg_train.model.arch.decoder);
- every use of an image runs its vision tower again.
Fairness: the teacher generates with the same batched, left-padded, KV-cached decoder as ours
(the note's padding was wrong and a per-sample loop would inflate the ratio), the row slicing is
the corrected one, and masking, the pass-2 prompt, SAM2 and the loss are the same functions, so
with equal weights and noise both steps give the same captions and the same loss.
"""

from __future__ import annotations

import contextlib

import torch

from ..distributed import unwrap
from ..objectives.passes import (
    batch_region_cells,
    mask_loss,
    region_prompts,
    resize_target,
    segment_prompt,
    space_slot_rows,
    special_ids,
    with_space_slot,
)
from ..objectives.pseudo_gumbel import random_mask_tokens, sample_generators, uniform_noise
from ..objectives.settings import PseudoGumbelConfig
from ..objectives.teacher import generate_pseudo_tokens_with_ema
from .gumbel import naive_topk_gumbel_softmax


def full_vocab_caption_logits(
    student, pixel_values, region_cells, caption_ids, caption_lengths, num_views=None
) -> torch.Tensor:
    """Pass 1 as the note writes it: logits [B, L, V] for every row, then the caption rows."""
    prompt_ids, prompt_mask = region_prompts(student, region_cells, num_views)
    prompt_ids, prompt_mask = prompt_ids.to(caption_ids.device), prompt_mask.to(caption_ids.device)
    T, P = caption_ids.shape[1], prompt_ids.shape[1]
    caption_mask = (torch.arange(T, device=caption_ids.device)[None] < caption_lengths[:, None]).long()
    out = student(
        mode="lm",
        input_ids=torch.cat([prompt_ids, caption_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, caption_mask], dim=1),
        pixel_values=pixel_values,
        region_cells=region_cells,
        use_cache=False,
        num_views=num_views,
    )
    return out.logits[:, P - 1 : P - 1 + T]


def literal_segment_pass(
    student, pixel_values, sam_pixel_values, text_embeds, caption_lengths, space_slot=None, num_views=None
) -> torch.Tensor:
    """Pass 2 as the note writes it: the causal LM over prefix | caption embeddings | suffix
    (logits [B, L, V] for every row, unused), then the last hidden state at the [SEG] row."""
    prefix_ids, prefix_mask, caption_mask, suffix_ids, seg_index = segment_prompt(
        student, caption_lengths, text_embeds.shape[1], text_embeds.device, num_views
    )
    if space_slot is not None:
        text_embeds, caption_mask = with_space_slot(student, text_embeds, caption_mask, space_slot)
    T = text_embeds.shape[1]
    prefix = student.embed_with_images(prefix_ids, student.extract_feature(pixel_values), None, num_views)
    embeds = torch.cat([prefix, text_embeds.to(prefix.dtype), student.embed_tokens()(suffix_ids)], dim=1)
    attention_mask = torch.cat([prefix_mask, caption_mask, torch.ones_like(suffix_ids)], dim=1)
    out = student.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=student.position_ids(attention_mask),
        output_hidden_states=True,
        use_cache=False,
    )
    seg_hidden = out.hidden_states[-1][:, prefix_ids.shape[1] + T + seg_index]
    return student.predict_masks(seg_hidden, sam_pixel_values)


@torch.no_grad()
def full_copy_ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """The note's EMA: every parameter of the teacher copy, one tensor at a time."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1 - decay)


@contextlib.contextmanager
def untrimmed(model):
    """Inside: `model` runs the LLM's last layer on every row, as the note's HF forward does (this
    model's setting only, restored on exit)."""
    module = unwrap(model)
    previous, module.trim_last_layer = module.trim_last_layer, False
    try:
        yield model
    finally:
        module.trim_last_layer = previous


def seed_literal_step(student, teacher, batch: dict, cfg: PseudoGumbelConfig, clock=None) -> dict:
    """One forward of the note's step; `clock(name)` (a context manager) times each stage."""
    clock = clock or (lambda name: contextlib.nullcontext())
    special = special_ids(student)
    seeds = batch["sample_seeds"]
    cells, _ = batch_region_cells(batch, student.grid_size, cfg)
    with clock("teacher"), untrimmed(teacher):  # the note's teacher runs every layer on every row
        caption_ids, lengths = generate_pseudo_tokens_with_ema(
            teacher, batch["pixel_values1"], cells, cfg, num_views=batch.get("num_views1")
        )
    with clock("mask"):
        masked_ids, _ = random_mask_tokens(caption_ids, lengths, cfg.mask_ratio, special, sample_generators(seeds, 0))
    student.clear_vision_cache()  # the note runs the vision tower for every use of an image
    with clock("pass1"):
        logits = full_vocab_caption_logits(
            student, batch["pixel_values1"], cells, masked_ids, lengths, batch.get("num_views1")
        )
    with clock("gumbel"):
        k = min(cfg.topk, logits.shape[-1])
        uniform = uniform_noise(sample_generators(seeds, 1), logits.shape[1], k)
        twin, needs_slot = student.prompts.leading_space.on(logits.device)
        text_embeds, hard_ids = naive_topk_gumbel_softmax(
            logits, student.embed_tokens().weight, special.to(logits.device), uniform, cfg.tau, k, twin
        )
        space_slot = space_slot_rows(needs_slot, hard_ids, lengths)
    student.clear_vision_cache()
    with clock("pass2"):
        mask_logits = literal_segment_pass(
            student,
            batch["pixel_values2"],
            batch["sam_pixel_values2"],
            text_embeds,
            lengths,
            space_slot,
            batch.get("num_views2"),
        )
    with clock("loss"):
        target = resize_target(batch["masks2"].to(mask_logits.device), mask_logits.shape[-2:])
        loss = mask_loss(mask_logits, target, cfg.bce_weight, cfg.dice_weight)["loss"]
    return {"loss": loss, "caption_ids": caption_ids, "caption_lengths": lengths, "hard_ids": hard_ids}
