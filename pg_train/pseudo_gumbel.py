"""Pseudo-Gumbel V2 self-training: the six steps of SPEC §3, top to bottom.

    1. generate_pseudo_tokens_with_ema   teacher captions region 1 of image 1 (no grad)
    2. random_mask_tokens                25% of the caption replaced by random ordinary tokens
    3. forward_for_logits                student logits of the rows that predict each caption token
    4. topk_gumbel_softmax               top-k straight-through Gumbel-softmax -> text_embeds
    5. forward_mask_with_text_embeds     student segments image 2 from the caption embeddings
    6. mask_loss                         2.0 * BCE + 0.5 * Dice against mask 2

`pseudo_gumbel_step` runs all six and returns the loss with the diagnostics the logs and audits
need. The student may be wrapped (DDP / DeepSpeed): every student computation is a call of the
wrapper (`student(mode=...)`) so gradients are synchronised; attributes (token ids, prompts) are
read from the unwrapped module. The teacher is any Sa2VA model or an `EMATeacher` (pg_train.ema).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .distributed import unwrap
from .model.generate import generate_from_embeds
from .model.regions import region_cells as select_region_cells
from .model.templates import left_pad
from .precision import compute_autocast


@dataclass
class PseudoGumbelConfig:
    max_caption_len: int = 64
    min_caption_len: int = 1  # an empty caption carries no gradient to the language side
    mask_ratio: float = 0.25
    tau: float = 0.7
    topk: int = 128
    # teacher decoding: greedy unless do_sample
    do_sample: bool = False
    temperature: float = 1.0
    sample_top_k: int = 0
    # decode with key/value buffers allocated once and fixed-shape steps (graph-ready; same tokens)
    # null (default): on CUDA, off elsewhere (model.generate.fast_decoding)
    static_cache: bool | None = None
    # CUDA: capture the static-cache decoding step in a CUDA graph and replay it (needs static_cache;
    # off CUDA the same bucketed step runs eagerly; pg_train.model.graph_decode); null: on CUDA
    cuda_graphs: bool | None = None
    # loss (computed at the SAM2 decoder's resolution, see mask_loss)
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    # region -> grid cells: the released model's nearest-neighbour rule, or coverage >= threshold
    region_rule: str = "nearest"
    region_threshold: float = 0.5  # region_rule=coverage only
    empty_region_policy: str = "largest"  # K = 0: fall back to the most-covered cell and count, or error


def teacher_model(teacher, student):
    """Context that yields the model to generate with: an EMA teacher (`as_teacher`) swaps its
    weights into the student for the duration (or hands out its separate copy); any other model
    is used as it is."""
    if hasattr(teacher, "as_teacher"):
        return teacher.as_teacher(student)
    return contextlib.nullcontext(teacher)


def special_ids(model) -> torch.Tensor:
    """Bool [V] of ids that must never appear in a caption (the model's special_id_mask)."""
    return unwrap(model).special_id_mask


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


# ---- 1. teacher captions -----------------------------------------------------------------------
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
    see model.stopping). Returns (caption_ids [B, T<=max_caption_len] padded with pad id, lengths [B]), on
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
    cells, _ = select_region_cells(
        batch["region_masks1"], model.grid_size, cfg.region_threshold, cfg.empty_region_policy, rule=cfg.region_rule
    )
    return generate_pseudo_tokens_with_ema(
        teacher, batch["pixel_values1"], cells, cfg, None, student, batch.get("num_views1")
    )


def views_per_sample(num_views: torch.Tensor | None, batch_size: int) -> list[int]:
    return [1] * batch_size if num_views is None else [int(n) for n in num_views.tolist()]


def region_prompts(
    model, region_cells: torch.Tensor, num_views: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded region prompts (ids, mask) [B, L] for K_b cells and each sample's views."""
    counts = region_cells.flatten(1).sum(1).tolist()
    views = views_per_sample(num_views, len(counts))
    return left_pad(
        [model.prompts.region_prompt(int(k), v) for k, v in zip(counts, views)], model.tokenizer.pad_token_id
    )


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


# ---- 3. student caption logits -----------------------------------------------------------------
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


# ---- 5. student segments image 2 from the caption ----------------------------------------------
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


# ---- 6. loss -------------------------------------------------------------------------------------
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


# ---- the step ------------------------------------------------------------------------------------
STAGES = ("teacher", "mask", "pass1", "gumbel", "pass2", "loss")  # the observed stages, in order


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
    region_fallback: torch.Tensor  # [B] bool: K came from the empty-region policy
    metrics: dict = field(default_factory=dict)


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


def pseudo_gumbel_step(
    student,
    teacher,
    batch: dict[str, torch.Tensor],
    cfg: PseudoGumbelConfig,
    generator: torch.Generator | None = None,
    observer=None,
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
    """
    observe = observer or no_observer
    model = unwrap(student)
    special = special_ids(model)
    B = batch["region_masks1"].shape[0]
    views1, views2 = batch.get("num_views1"), batch.get("num_views2")
    seeds = batch.get("sample_seeds")
    if seeds is None:
        seeds = torch.randint(0, 2**62, (B,), generator=generator)
    cells, fallback = select_region_cells(
        batch["region_masks1"], model.grid_size, cfg.region_threshold, cfg.empty_region_policy, rule=cfg.region_rule
    )

    with observe("teacher"):
        caption_ids, caption_lengths = batch.get("teacher_captions") or generate_pseudo_tokens_with_ema(
            teacher, batch["pixel_values1"], cells, cfg, generator, student, views1
        )  # 1
    with observe("mask"):
        masked_ids, replaced = random_mask_tokens(
            caption_ids, caption_lengths, cfg.mask_ratio, special, sample_generators(seeds, 0)
        )  # 2
    with observe("pass1"):
        caption_logits = forward_for_logits(
            student, batch["pixel_values1"], cells, masked_ids, caption_lengths, views1
        )  # 3
    with observe("gumbel"):
        uniform = uniform_noise(
            sample_generators(seeds, 1), caption_logits.shape[1], min(cfg.topk, caption_logits.shape[-1])
        )
        twin, needs_slot = model.prompts.leading_space.on(caption_logits.device)
        text_embeds, hard_ids = topk_gumbel_softmax(  # 4
            caption_logits, model.embed_tokens().weight, special, uniform, cfg.tau, cfg.topk, first_rows=twin
        )
    if text_embeds.requires_grad:
        text_embeds.retain_grad()
    space_slot = space_slot_rows(needs_slot, hard_ids, caption_lengths)
    with observe("pass2"):
        mask_logits = forward_mask_with_text_embeds(  # 5
            student,
            batch["pixel_values2"],
            batch["sam_pixel_values2"],
            text_embeds,
            caption_lengths,
            space_slot=space_slot,
            num_views=views2,
        )
    with observe("loss"):
        target = resize_target(batch["masks2"].to(mask_logits.device), mask_logits.shape[-2:])
        losses = mask_loss(mask_logits, target, cfg.bce_weight, cfg.dice_weight)  # 6

    real = caption_lengths.sum().clamp(min=1)
    metrics = {
        "loss": losses["loss"].detach(),
        "bce": losses["bce"].detach().mean(),
        "dice": losses["dice"].detach().mean(),
        "iou": mask_iou(mask_logits, target).mean(),
        "caption_len_mean": caption_lengths.float().mean(),
        "replaced_fraction": replaced.sum() / real,
        "region_k_mean": cells.flatten(1).sum(1).float().mean(),
        "region_fallbacks": fallback.sum(),
    }
    return StepOutput(
        loss=losses["loss"],
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
