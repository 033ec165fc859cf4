"""Pseudo-Gumbel V2 self-training: the six steps of SPEC §3, top to bottom.

    1. generate_pseudo_tokens_with_ema   teacher captions region 1 of image 1 (no grad)
    2. random_mask_tokens                25% of the caption replaced by random ordinary tokens
    3. forward_for_logits                student logits of the rows that predict each caption token
    4. topk_gumbel_softmax               top-k straight-through Gumbel-softmax -> text_embeds
    5. forward_mask_with_text_embeds     student segments image 2 from the caption embeddings
    6. mask_loss                         2.0 * BCE + 0.5 * Dice against mask 2

`pseudo_gumbel_step` runs all six and returns the loss with the diagnostics the logs and audits
need. Steps 2 and 4 are Pseudo-Gumbel's own and live here; step 1 is the teacher's
(objectives.teacher) and steps 3, 5 and 6 are the passes every objective shares
(objectives.passes). The teacher is any Sa2VA model or an `EMATeacher` (pg_train.ema).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..distributed import unwrap
from .anchor import caption_kl, keep_confident, reference_caption_logits
from .drift import teacher_side
from .passes import (
    StepOutput,
    answer_caption_embeds,
    batch_region_cells,
    forward_for_logits,
    mask_iou,
    mask_loss,
    no_observer,
    segment_image2,
    space_slot_rows,
    special_ids,
)
from .settings import PseudoGumbelConfig
from .teacher import generate_pseudo_tokens_with_ema, teacher_confidence


# ---- 2. random masking -------------------------------------------------------------------------
def sample_generators(seeds: torch.Tensor, stream: int) -> list[torch.Generator]:
    """One CPU generator per sample and purpose (`stream`: 0 masking, 1 Gumbel noise). Every
    random draw is made per sample, row-major over caption positions, so a sample gets the same
    noise whatever batch (and padding) it is in."""
    return [torch.Generator().manual_seed((int(seed) + stream * 0x9E3779B97F4A7C15) % 2**63) for seed in seeds.tolist()]


def random_mask_tokens(
    caption_ids: torch.Tensor,
    caption_lengths: torch.Tensor,
    mask_ratio: float,
    special: torch.Tensor,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each real caption token with probability `mask_ratio` by a uniformly drawn
    ordinary text id (never a special, added or padding id — the seed drew from the whole
    vocabulary, so an `<IMG_CONTEXT>` or `[SEG]` could land inside a caption).

    caption_ids [B, T], caption_lengths [B], special [V] bool, one generator per sample.
    Returns (masked_ids [B, T], replaced [B, T] bool).
    """
    B, T = caption_ids.shape
    ordinary = (~special).nonzero().flatten()
    # Per position: column 0 decides whether to replace, column 1 picks the replacement.
    draws = torch.stack([torch.rand(T, 2, generator=g) for g in generators]) if B else torch.empty(0, T, 2)
    picks = ordinary[(draws[..., 1] * len(ordinary)).long().clamp(max=len(ordinary) - 1)]
    real = torch.arange(T)[None] < caption_lengths.cpu()[:, None]
    replaced = (draws[..., 0] < mask_ratio) & real
    masked = torch.where(replaced.to(caption_ids.device), picks.to(caption_ids.device), caption_ids)
    return masked, replaced.to(caption_ids.device)


# ---- 4. top-k straight-through Gumbel-softmax --------------------------------------------------
class _StraightThroughEmbedding(torch.autograd.Function):
    """Forward: the embedding rows of the hard ids, exactly. Backward: the gradient of the soft
    mixture sum_k y_soft[k] * E[topk_ids[k]], without keeping the [N, k, D] gather.

    d loss / d y_soft[n, k] = <grad_out[n], E[topk_ids[n, k]]>   (computed in row chunks)
    d loss / d E[hard_ids[n]] += grad_out[n]                       (the straight-through value is one-hot)
    """

    @staticmethod
    def forward(ctx, y_soft, topk_ids, hard_ids, weight, chunk_elems):
        ctx.save_for_backward(topk_ids, hard_ids, weight)
        ctx.chunk_elems = chunk_elems
        ctx.soft_dtype = y_soft.dtype
        return weight[hard_ids]

    @staticmethod
    def backward(ctx, grad_out):
        topk_ids, hard_ids, weight = ctx.saved_tensors
        grad_soft = grad_weight = None
        if ctx.needs_input_grad[0]:
            N, k = topk_ids.shape[0], topk_ids.shape[1]
            grad_soft = torch.empty(N, k, dtype=torch.float32, device=grad_out.device)
            rows = max(1, ctx.chunk_elems // (k * weight.shape[1]))
            for start in range(0, N, rows):
                end = min(N, start + rows)
                gathered = weight[topk_ids[start:end]]  # [n, k, D], bounded by chunk_elems
                grad_soft[start:end] = (
                    torch.bmm(gathered, grad_out[start:end, :, None].to(weight.dtype)).squeeze(-1).float()
                )
            grad_soft = grad_soft.to(ctx.soft_dtype)
        if ctx.needs_input_grad[3]:
            grad_weight = torch.zeros_like(weight).index_add_(0, hard_ids, grad_out.to(weight.dtype))
        return grad_soft, None, None, grad_weight, None


def uniform_noise(generators: list[torch.Generator], T: int, k: int) -> torch.Tensor:
    """[B, T, k] fp32 uniforms, drawn per sample (see sample_generators)."""
    return torch.stack([torch.rand(T, k, generator=g) for g in generators])


def topk_gumbel_softmax(
    caption_logits: torch.Tensor,
    embedding_weight: torch.Tensor,
    special: torch.Tensor,
    uniform: torch.Tensor,
    tau: float = 0.7,
    topk: int = 128,
    chunk_elems: int = 1 << 24,
    first_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """caption_logits [B, T, V] -> (text_embeds [B, T, D], hard_ids [B, T]).

    Special ids are excluded before the top-k. `uniform` [B, T, k] (fp32, from uniform_noise)
    becomes the Gumbel noise; noise and softmax are fp32 (a bf16 softmax over 128 candidates at
    tau 0.7 loses the small probabilities). The forward value is exactly E[hard_ids]; the
    backward is that of the soft mixture (see _StraightThroughEmbedding). `chunk_elems` bounds
    the backward's temporary gather. `first_rows` [V]: the embedding row each id of caption
    position 0 is read from (the leading-space twin of templates.LeadingSpace: the caption was
    generated at the start of an answer and is read after `Please segment`).
    """
    B, T, V = caption_logits.shape
    logits = caption_logits.masked_fill(special.to(caption_logits.device), float("-inf"))
    top_values, top_ids = logits.topk(min(topk, V), dim=-1)
    gumbel = -torch.log(-torch.log(uniform.to(top_values.device, torch.float32) + 1e-10) + 1e-10)
    y_soft = F.softmax((top_values.float() + gumbel) / tau, dim=-1)
    hard_ids = top_ids.gather(-1, y_soft.argmax(-1, keepdim=True)).squeeze(-1)
    k = top_ids.shape[-1]
    rows, hard_rows = top_ids, hard_ids
    if first_rows is not None and T:
        first_rows = first_rows.to(top_ids.device)
        rows = torch.cat([first_rows[top_ids[:, :1]], top_ids[:, 1:]], dim=1)
        hard_rows = torch.cat([first_rows[hard_ids[:, :1]], hard_ids[:, 1:]], dim=1)
    text_embeds = _StraightThroughEmbedding.apply(
        y_soft.reshape(B * T, k), rows.reshape(B * T, k), hard_rows.reshape(B * T), embedding_weight, chunk_elems
    )
    return text_embeds.reshape(B, T, -1), hard_ids


# ---- the step ------------------------------------------------------------------------------------
STAGES = ("teacher", "mask", "pass1", "gumbel", "pass2", "loss")  # the observed stages, in order


def pseudo_gumbel_step(
    student,
    teacher,
    batch: dict[str, torch.Tensor],
    cfg: PseudoGumbelConfig,
    generator: torch.Generator | None = None,
    observer=None,
    reference=None,
    diagnose: bool = False,
) -> StepOutput:
    """One Pseudo-Gumbel step (forward only; the caller runs backward on `.loss`).

    batch: `pixel_values1` [B, 3, 448, 448] and `region_masks1` [B, H, W] (image 1 and its
    region), `pixel_values2` [B, 3, 448, 448], `sam_pixel_values2` [B, 3, S, S] and `masks2`
    [B, H', W'] (image 2 and the same object's mask); optional `sample_seeds` [B] (else drawn
    from `generator`) seed each sample's masking and Gumbel noise; optional `teacher_captions`
    (ids [B, T], lengths [B]): step 1's output made beforehand (pg_train.overlap: by a teacher
    one update older, while the student trained on the previous batch).
    `observer`: `observer(stage) -> context manager` wrapped around each of STAGES (timing,
    memory, profiling: bench.step, memcheck, the GPU profile); none by default.
    `reference(student)`: a context manager yielding the frozen reference the KL anchor reads
    (objectives.anchor; needed when cfg.anchor_weight > 0). `diagnose`: also record the teacher
    side of the drift diagnostics (objectives.drift; before the student's passes).

    The self-training switches of `cfg` (segmenter_reads, caption_grad, anchor_*, filter_*)
    change the step only where they differ from their defaults; at the defaults it is the
    Pseudo-Gumbel step of SPEC §3, bit for bit.
    """
    observe = observer or no_observer
    model = unwrap(student)
    special = special_ids(model)
    B = batch["region_masks1"].shape[0]
    views1 = batch.get("num_views1")
    seeds = batch.get("sample_seeds")
    if seeds is None:
        seeds = torch.randint(0, 2**62, (B,), generator=generator)
    cells, fallback = batch_region_cells(batch, model.grid_size, cfg)

    with observe("teacher"):
        caption_ids, caption_lengths = batch.get("teacher_captions") or generate_pseudo_tokens_with_ema(
            teacher, batch["pixel_values1"], cells, cfg, generator, student, views1
        )  # 1
        keep = confidence = None
        if filtering(cfg):
            confidence = teacher_confidence(
                teacher, batch["pixel_values1"], cells, caption_ids, caption_lengths, student, views1
            )
            keep = keep_confident(confidence, cfg.filter_min_logprob, cfg.filter_top_fraction)
        drift = (
            teacher_side(
                teacher, student, batch["pixel_values1"], cells, caption_ids, caption_lengths, views1, reference
            )
            if diagnose
            else {}
        )
    with observe("mask"):
        masked_ids, replaced = random_mask_tokens(
            caption_ids, caption_lengths, cfg.mask_ratio, special, sample_generators(seeds, 0)
        )  # 2
    reference_logits = None
    if cfg.anchor_weight:  # before pass 1: the reference may swap weights the student's graph would read
        if reference is None:
            raise ValueError("objective.anchor_weight > 0 needs a reference (objective.anchor_reference)")
        reference_logits = reference_caption_logits(
            reference,
            student,
            lambda ref: forward_for_logits(ref, batch["pixel_values1"], cells, masked_ids, caption_lengths, views1),
        )
    # segmenter_reads=teacher without an anchor: pass 1 only for the step's record (no graph)
    pass1_grad = cfg.segmenter_reads != "teacher" or reference_logits is not None
    with observe("pass1"), contextlib.nullcontext() if pass1_grad else torch.no_grad():
        caption_logits = forward_for_logits(
            student, batch["pixel_values1"], cells, masked_ids, caption_lengths, views1
        )  # 3
    with observe("gumbel"):
        uniform = uniform_noise(
            sample_generators(seeds, 1), caption_logits.shape[1], min(cfg.topk, caption_logits.shape[-1])
        )
        if cfg.segmenter_reads == "argmax":  # u = 1/e makes the Gumbel noise exactly 0 in fp32
            uniform = torch.full_like(uniform, math.exp(-1.0))
        twin, needs_slot = model.prompts.leading_space.on(caption_logits.device)
        text_embeds, hard_ids = topk_gumbel_softmax(  # 4
            caption_logits if cfg.caption_grad else caption_logits.detach(),
            model.embed_tokens().weight,
            special,
            uniform,
            cfg.tau,
            cfg.topk,
            first_rows=twin,
        )
    if cfg.segmenter_reads == "teacher":  # the teacher's caption as text: nothing reaches the captioner
        text_embeds, space_slot = answer_caption_embeds(model, caption_ids, caption_lengths)
    else:
        space_slot = space_slot_rows(needs_slot, hard_ids, caption_lengths)
    if text_embeds.requires_grad:
        text_embeds.retain_grad()
    with observe("pass2"):
        mask_logits, target, _ = segment_image2(student, batch, text_embeds, caption_lengths, space_slot)  # 5
    with observe("loss"):
        losses = mask_loss(mask_logits, target, cfg.bce_weight, cfg.dice_weight)  # 6
        loss = losses["loss"]
        if keep is not None:  # the filter's dropped samples carry no loss
            loss = kept_mean(cfg.bce_weight * losses["bce"] + cfg.dice_weight * losses["dice"], keep)
        if reference_logits is not None:
            anchor = caption_kl(caption_logits, reference_logits, caption_lengths)
            loss = loss + cfg.anchor_weight * (kept_mean(anchor, keep) if keep is not None else anchor.mean())

    real = caption_lengths.sum().clamp(min=1)
    metrics = {
        "loss": loss.detach(),
        "bce": losses["bce"].detach().mean(),
        "dice": losses["dice"].detach().mean(),
        "iou": mask_iou(mask_logits, target).mean(),
        "caption_len_mean": caption_lengths.float().mean(),
        "replaced_fraction": replaced.sum() / real,
        "region_k_mean": cells.flatten(1).sum(1).float().mean(),
        "region_fallbacks": fallback.sum(),
    }
    if keep is not None:
        metrics.update(filter_kept=keep.sum().float(), filter_dropped=(~keep).sum().float())
        metrics["teacher_confidence"] = confidence.float().mean()
    if reference_logits is not None:
        metrics["anchor_kl"] = anchor.detach().mean()
    metrics.update(drift)
    return StepOutput(
        loss=loss,
        bce=losses["bce"],
        dice=losses["dice"],
        mask_logits=mask_logits,
        text_embeds=text_embeds,
        caption_ids=caption_ids,
        caption_lengths=caption_lengths,
        masked_ids=masked_ids,
        replaced=replaced,
        hard_ids=hard_ids,
        region_k=cells.flatten(1).sum(1),
        region_fallback=fallback,
        metrics=metrics,
    )


def filtering(cfg: PseudoGumbelConfig) -> bool:
    """Whether the confidence filter is on (objective.filter_min_logprob / filter_top_fraction)."""
    return cfg.filter_min_logprob is not None or cfg.filter_top_fraction < 1.0


def kept_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B] over the kept samples; 0 (still part of the graph) when none is kept."""
    weights = keep.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)
