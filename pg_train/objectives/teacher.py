"""Teacher captions (Pseudo-Gumbel's step 1; the pseudo-label objective's targets): the teacher
(any Sa2VA model, or an `EMATeacher` from pg_train.ema) captions region 1 of image 1, greedily
unless configured to sample, without gradient."""

from __future__ import annotations

import contextlib

import torch

from ..distributed import unwrap
from ..model.decoding.generate import generate_from_embeds
from ..precision import compute_autocast
from .passes import batch_region_cells, forward_for_logits, region_prompts, special_ids
from .settings import PseudoGumbelConfig


def teacher_model(teacher, student):
    """Context that yields the model to generate with: an EMA teacher (`as_teacher`) swaps its
    weights into the student for the duration (or hands out its separate copy); any other model
    is used as it is."""
    if hasattr(teacher, "as_teacher"):
        return teacher.as_teacher(student)
    return contextlib.nullcontext(teacher)


@contextlib.contextmanager
def _eval_mode(model):
    """The teacher generates without dropout (LoRA dropout 0.05 in Sa2VA-4B), even when it is
    the training student with the EMA weights swapped in; the mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---- 1. teacher captions -------------------------------------------------------------------------
@torch.no_grad()
def generate_pseudo_tokens_with_ema(
    teacher,
    pixel_values: torch.Tensor,
    region_cells: torch.Tensor,
    cfg: PseudoGumbelConfig,
    generator: torch.Generator | None = None,
    student=None,
    num_views: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher captions of each sample's region.

    `teacher`: a Sa2VA model, or an EMA teacher (then `student` is the model its weights are
    swapped into). pixel_values [sum(num_views), 3, 448, 448] (each sample's views; one each by
    default); region_cells [B, G, G] bool (K_b cells of the last view's grid).
    Prompts of different K are left-padded so every row ends where its answer starts; decoding
    uses a KV cache, suppresses every special id, and stops per sample at eos or when the
    decoded caption contains the chat template's end text (cut before it, fragments included:
    see model.text.stopping). Returns (caption_ids [B, T<=max_caption_len] padded with pad id, lengths [B]), on
    the device of `pixel_values` (the teacher may live elsewhere).
    """
    with teacher_model(teacher, student) as model, _eval_mode(unwrap(model)), compute_autocast(unwrap(model)):
        model = unwrap(model)  # computes in the student's dtype (pg_train.precision)
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = region_prompts(model, region_cells, num_views)
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        embeds = model.embed_with_images(
            prompt_ids, model.extract_feature(pixel_values.to(device)), region_cells.to(device), num_views
        )
        suppress = special_ids(model).clone()
        suppress[model.eos_token_id] = False  # eos is how a caption ends
        suppress[model.prompts.stop.stop_token_ids] = False  # and the official rule's <|endoftext|>
        captions, lengths = generate_from_embeds(
            model.language_model,
            embeds,
            prompt_mask,
            max_new_tokens=cfg.max_caption_len,
            min_new_tokens=cfg.min_caption_len,
            eos_token_id=model.eos_token_id,
            pad_token_id=model.tokenizer.pad_token_id,
            suppress_token_ids=suppress.nonzero().flatten().to(device),
            stop=model.prompts.stop,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_k=cfg.sample_top_k,
            generator=generator,
            static_cache=cfg.static_cache,
            cuda_graphs=cfg.cuda_graphs,
            trim_last_layer=model.trim_last_layer,
        )
    return captions.to(pixel_values.device), lengths.to(pixel_values.device)


def caption_batch(teacher, batch: dict, cfg: PseudoGumbelConfig, student=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 for a whole batch as pseudo_gumbel_step runs it (its region cells, its views), for
    a caller that captions ahead of the step (pg_train.overlap)."""
    model = unwrap(student if student is not None else teacher)
    cells, _ = batch_region_cells(batch, model.grid_size, cfg)
    return generate_pseudo_tokens_with_ema(
        teacher, batch["pixel_values1"], cells, cfg, None, student, batch.get("num_views1")
    )


@torch.no_grad()
def teacher_confidence(
    teacher,
    pixel_values: torch.Tensor,
    region_cells: torch.Tensor,
    caption_ids: torch.Tensor,
    caption_lengths: torch.Tensor,
    student=None,
    num_views: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean token log-probability [B] of each caption under the teacher (teacher-forced, eval
    mode): how sure the teacher was of what it said (the confidence filter's score; 0 for an
    empty caption)."""
    with teacher_model(teacher, student) as model, _eval_mode(unwrap(model)), compute_autocast(unwrap(model)):
        module = unwrap(model)
        device = next(module.parameters()).device
        logits = forward_for_logits(
            module,
            pixel_values.to(device),
            region_cells.to(device),
            caption_ids.to(device),
            caption_lengths.to(device),
            num_views,
        )
    return token_logprob(logits, caption_ids.to(logits.device), caption_lengths.to(logits.device)).to(
        caption_ids.device
    )


def token_logprob(logits: torch.Tensor, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean log-probability [B] of `ids` [B, T] under `logits` [B, T, V] over the real tokens."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    return (picked * real).sum(1) / lengths.clamp(min=1)
