"""Drift diagnostics of self-training (issue 26): numbers that show whether the captions the
segmenter reads stay language and whether the segmenter still reads them.

Per step (every objective.diagnostics_every steps, `drift/*` in metrics.jsonl), from a
self-training step's output and a few extra passes without gradient, in eval mode (no dropout,
so the training's random streams are untouched):
    agreement             share of caption positions where the caption the segmenter read equals the teacher's
    teacher_confidence    mean token log-prob of the teacher's caption under the teacher
    teacher_ref_loss      the teacher captions' cross-entropy under the frozen reference (the anchor's,
                          else the model with its LoRA adapters disabled; absent without either)
                          (both teacher-side numbers on Pseudo-Gumbel and pseudo-label steps alike)
    text_use              mask loss with another sample's caption minus with its own (> 0: the text matters)
    iou_own_caption / iou_teacher_caption / iou_shuffled_caption   training IoU by the caption read
    grad_share/<group>    per parameter group, |gradient through the caption path| / |gradient| of
                          the step's gradient summed over processes (two extra backward passes on a
                          retained graph; with several processes both gradients are all-reduced first)
At evaluation (`eval/*`): cycle - shuffled gIoU, token F1 and exact match of the cycle captions
against the held-out set's ground truth (the labelled monitor set).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter

import torch

from ..distributed import unwrap
from .anchor import adapters_disabled, lora_layers, reference_caption_logits
from .passes import (
    StepOutput,
    answer_caption_embeds,
    forward_for_logits,
    forward_mask_with_text_embeds,
    mask_iou,
    mask_loss,
    resize_target,
    space_slot_rows,
)
from .settings import PseudoGumbelConfig
from .teacher import teacher_confidence, token_logprob

GROUPS = (  # parameter-name markers -> group, first match wins
    ("lm_head", "lm_head"),
    ("embed_tokens", "embeddings"),
    ("language_model", "llm"),
    ("vision_model", "vision"),
    ("grounding_encoder", "sam2"),
)


def parameter_group(name: str) -> str:
    return next((group for marker, group in GROUPS if marker in name), "other")


def due(cfg: PseudoGumbelConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based) records drift diagnostics."""
    return bool(cfg.diagnostics_every) and step % cfg.diagnostics_every == 0


@contextlib.contextmanager
def _eval(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def caption_path_shares(out: StepOutput, module) -> dict[str, torch.Tensor]:
    """Per parameter group, the norm of the loss's gradient that arrives through the caption the
    segmenter read (text_embeds) over the norm of its whole gradient (0 where it gets none).
    Leaves the graph for the step's own backward.

    With several processes each rank's gradients are of its own samples: both are summed over the
    ranks before the norms (two all-reduces per trainable tensor; every rank gets here on the same
    steps, as diagnostics_every and the streams' counts are the same on every rank), so the share
    is that of the gradient the optimizer applies (the ranks' mean, whose ratio is the sum's) and
    the same number on every rank. torch.autograd.grad returns gradients without accumulating
    them into .grad, so the reduce hooks of DDP and ZeRO-2, which fire on accumulation, see only
    the step's own backward."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not out.text_embeds.requires_grad or not named:
        return {}
    params = [p for _, p in named]
    total = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    (upstream,) = torch.autograd.grad(out.loss, out.text_embeds, retain_graph=True)
    via = torch.autograd.grad(out.text_embeds, params, upstream, retain_graph=True, allow_unused=True)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    reduce = distributed and torch.distributed.get_world_size() > 1
    sums: dict[str, list[float]] = {}
    for (name, p), t, v in zip(named, total, via):  # the same parameters in the same order on every rank
        acc = sums.setdefault(parameter_group(name), [0.0, 0.0])
        for i, g in enumerate((v, t)):
            g = torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float()
            if reduce:
                torch.distributed.all_reduce(g)  # autograd.grad's own tensor (or a copy): not a .grad
            acc[i] += float(g.pow(2).sum())
    return {f"drift/grad_share/{g}": torch.tensor((a / b) ** 0.5 if b > 0 else 0.0) for g, (a, b) in sums.items()}


@torch.no_grad()
def teacher_side(
    teacher,
    student,
    pixel_values: torch.Tensor,
    region_cells: torch.Tensor,
    caption_ids: torch.Tensor,
    caption_lengths: torch.Tensor,
    num_views: torch.Tensor | None,
    reference=None,
) -> dict[str, torch.Tensor]:
    """drift/teacher_confidence and drift/teacher_ref_loss of the step's teacher captions. Run
    before the student's passes (an EMA teacher or a snapshot reference swaps weights in)."""
    module = unwrap(student)
    metrics = {
        "drift/teacher_confidence": teacher_confidence(
            teacher, pixel_values, region_cells, caption_ids, caption_lengths, student, num_views
        ).mean()
    }
    reference = reference or (adapters_disabled if lora_layers(module) else None)
    if reference is not None:
        logits = reference_caption_logits(
            reference,
            module,
            lambda ref: forward_for_logits(ref, pixel_values, region_cells, caption_ids, caption_lengths, num_views),
        )
        metrics["drift/teacher_ref_loss"] = -token_logprob(
            logits, caption_ids.to(logits.device), caption_lengths
        ).mean()
    return metrics


@torch.no_grad()
def _passes(student, batch: dict, out: StepOutput, cfg: PseudoGumbelConfig, reads: str) -> dict:
    module = unwrap(student)
    views2 = batch.get("num_views2")
    ids, lengths = out.caption_ids, out.caption_lengths
    real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    metrics = {"drift/agreement": ((out.hard_ids == ids) & real).sum() / real.sum().clamp(min=1)}

    target = resize_target(batch["masks2"].to(out.mask_logits.device), out.mask_logits.shape[-2:])

    def segment(embeds, lens, space_slot):
        with _eval(module):
            return forward_mask_with_text_embeds(
                module,
                batch["pixel_values2"],
                batch["sam_pixel_values2"],
                embeds,
                lens,
                space_slot=space_slot,
                num_views=views2,
            )

    order = torch.roll(torch.arange(ids.shape[0], device=ids.device), 1)
    with _eval(module):
        if reads == "teacher":
            own_slot = answer_caption_embeds(module, ids, lengths)[1]
        else:
            own_slot = space_slot_rows(module.prompts.leading_space.on(ids.device)[1], out.hard_ids, lengths)
        teacher_embeds, teacher_slot = answer_caption_embeds(module, ids, lengths)
    own = segment(out.text_embeds.detach(), lengths, own_slot)
    shuffled = segment(out.text_embeds.detach()[order], lengths[order], None if own_slot is None else own_slot[order])
    read_teacher = segment(teacher_embeds, lengths, teacher_slot)
    loss = lambda logits: mask_loss(logits, target, cfg.bce_weight, cfg.dice_weight)["loss"]  # noqa: E731
    metrics.update(
        {
            "drift/text_use": loss(shuffled) - loss(own) if ids.shape[0] > 1 else torch.zeros(()),
            "drift/iou_own_caption": mask_iou(own, target).mean(),
            "drift/iou_teacher_caption": mask_iou(read_teacher, target).mean(),
            "drift/iou_shuffled_caption": mask_iou(shuffled, target).mean(),
        }
    )
    return metrics


def drift_diagnostics(
    student, batch: dict, out: StepOutput, cfg: PseudoGumbelConfig, reads: str | None = None
) -> dict[str, torch.Tensor]:
    """The step-time drift numbers of a self-training step's output (see the module docstring;
    the teacher's are the step's own, from teacher_side). `reads`: the caption the step's
    segmenter read (objective.segmenter_reads; `teacher` for a pseudo-label step)."""
    metrics = _passes(student, batch, out, cfg, reads or cfg.segmenter_reads)
    metrics.update(caption_path_shares(out, unwrap(student)))
    return {k: v.detach().float().cpu() for k, v in metrics.items()}


# ---- evaluation ----------------------------------------------------------------------------------
def words(text: str | None) -> list[str]:
    """Lower-case words of a caption, punctuation dropped (how captions are compared)."""
    return re.findall(r"[a-z0-9]+", (text or "").lower())


def token_f1(prediction: str | None, truth: str | None) -> float:
    """Word-level F1 of a caption against the ground truth (SQuAD's: bags of words; 1 when both
    are empty)."""
    p, t = Counter(words(prediction)), Counter(words(truth))
    if not p or not t:
        return float(p == t)
    common = sum((p & t).values())
    if not common:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(t.values())
    return 2 * precision * recall / (precision + recall)
