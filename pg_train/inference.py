"""The one path from a model's weights to captions and masks.

In-training evaluation, `pg-train-evaluate`, the RefCOCO evaluation, the report's gallery and
`pg-train-predict` all call these functions, so the same weights give the same captions and
masks wherever they are asked (a training checkpoint, a `save_pretrained` directory, the run
itself). Two levels:

- batches, as the data loader collates them (`pixel_values1/2`, region 1's cell maps
  `region_nearest1` / `region_coverage1`, `sam_pixel_values2`, `num_views1/2`, `captions`):
  `caption_regions`, `encode_texts`, `segment_from_ids`, and the evaluation's four inputs
  (`caption_inputs`);
- images (PIL) and region masks (numpy bool [H, W]), preprocessed as the model's preset says:
  `segment(model, images, texts)`, `caption(model, images, regions)`,
  `segment_from_own_caption(model, images, regions)`; masks come back at each image's own
  resolution (logits upsampled bilinearly and thresholded at 0, the RefCOCO protocol).

Captions are decoded greedily or as the objective's settings say (`cfg`: a PseudoGumbelConfig;
None: the model preset's defaults, as a run without a config would use). Every function runs
under `torch.no_grad()` with the model in eval mode (its mode restored after).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import image_tensor
from .data.loader import batch_to_device, collate_pairs, preprocess_for, region_tensors
from .distributed import unwrap
from .objectives.passes import (
    answer_caption_embeds,
    batch_region_cells,
    forward_mask_with_text_embeds,
    tokenize_captions,
)
from .objectives.settings import PseudoGumbelConfig
from .objectives.teacher import generate_pseudo_tokens_with_ema

KINDS = ("referring", "cycle", "shuffled", "empty")


@contextlib.contextmanager
def inference_mode(model):
    """no_grad, the module in eval mode, its former mode restored on exit."""
    module = unwrap(model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def default_objective(model) -> PseudoGumbelConfig:
    """The caption settings of a model without a training config: its preset's defaults."""
    from .config import objective_for

    return objective_for(unwrap(model).preset)


def model_dtype(model) -> torch.dtype:
    return next(p for p in model.parameters() if p.is_floating_point()).dtype


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def inputs_on_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """A collated batch's model inputs and captions on `device` (pixels in `dtype`); image 2
    stays image 1's tensor when it was. `truths` (masks at each image's own resolution, for
    scoring as RefCOCO does) stay on the CPU."""
    tensors = batch_to_device(batch, device, dtype)
    tensors["captions"] = batch["captions"]
    if "truths" in batch:
        tensors["truths"] = batch["truths"]
    return tensors


# ---- batch level ---------------------------------------------------------------------------------
def caption_regions(model, batch: dict, cfg: PseudoGumbelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption ids [B, T] padded, lengths [B]) of each sample's region 1 of image 1 of a
    collated `batch` (its cells from the full-resolution mask), as the objective's teacher
    captions them."""
    cells, _ = batch_region_cells(batch, unwrap(model).grid_size, cfg)
    with inference_mode(model):
        return generate_pseudo_tokens_with_ema(
            model, batch["pixel_values1"], cells, cfg, num_views=batch.get("num_views1")
        )


def encode_texts(model, texts: list[str | None], max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], lengths [B]) of texts as answer-context ids (how captions are fed back), cut
    at `max_len` ids."""
    ids, lens = tokenize_captions(model, texts, max_len)
    device = device if device is not None else model_device(model)
    return ids.to(device), lens.to(device)


def decode(model, ids: torch.Tensor, lens: torch.Tensor) -> list[str]:
    tokenizer = unwrap(model).tokenizer
    return [tokenizer.decode(row[:n]) for row, n in zip(ids.tolist(), lens.tolist())]


def segment_from_ids(
    model,
    pixel_values: torch.Tensor,
    sam_pixel_values: torch.Tensor,
    ids: torch.Tensor,
    lens: torch.Tensor,
    num_views=None,
) -> torch.Tensor:
    """Mask logits [B, S/4, S/4] of each image segmented from caption ids (answer-context ids,
    as caption_regions or encode_texts give them), read as training's pass 2 reads them."""
    with inference_mode(model):
        embeds, space_slot = answer_caption_embeds(unwrap(model), ids, lens)
        return forward_mask_with_text_embeds(
            model, pixel_values, sam_pixel_values, embeds, lens, space_slot=space_slot, num_views=num_views
        )


def segment_image2(model, batch: dict, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Mask logits of image 2 of a collated `batch` from caption ids."""
    return segment_from_ids(
        model, batch["pixel_values2"], batch["sam_pixel_values2"], ids, lens, num_views=batch.get("num_views2")
    )


def caption_inputs(model, batch: dict, cfg: PseudoGumbelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Caption (ids, lengths) per evaluation kind: referring = the ground-truth text; cycle = the
    model's caption of region 1 of image 1; shuffled = the cycle caption of the previous sample
    in the batch (another object); empty = no caption at all."""
    device = batch["pixel_values1"].device
    generated, generated_len = caption_regions(model, batch, cfg)
    truth, truth_len = encode_texts(model, batch["captions"], cfg.max_caption_len, device)
    B = generated.shape[0]
    order = torch.roll(torch.arange(B), 1)
    return {
        "referring": (truth, truth_len),
        "cycle": (generated, generated_len),
        "shuffled": (generated[order], generated_len[order]),
        "empty": (
            torch.full((B, 1), unwrap(model).tokenizer.pad_token_id, device=device),
            torch.zeros(B, dtype=torch.long, device=device),
        ),
    }


def mask_at(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool [H, W]: one sample's mask logits upsampled bilinearly to (H, W) and thresholded at
    0 (how RefCOCO evaluators score, and the mask a user gets)."""
    upsampled = F.interpolate(logits.float()[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return upsampled[0, 0].cpu() > 0


# ---- image level ---------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One image's answer: the mask at the image's resolution, the low-resolution logits, a
    score (the mean predicted probability over the mask's pixels; 0 for an empty mask) and the
    caption the mask was segmented from (the given text, or the model's own)."""

    mask: np.ndarray  # bool [H, W]
    logits: torch.Tensor  # [S/4, S/4] float32, cpu
    score: float
    caption: str


def image_inputs(model, images: list, regions: list[np.ndarray] | None = None) -> dict:
    """A batch of images as the model reads them (image 1 = image 2 = each image; region 1 the
    given mask, or the whole image), on the model's device and in its dtype."""
    preprocess = preprocess_for(unwrap(model).preset)
    items = []
    for i, image in enumerate(images):
        image = image.convert("RGB")
        region = regions[i] if regions is not None else np.ones((image.height, image.width), bool)
        if tuple(region.shape) != (image.height, image.width):
            raise ValueError(
                f"region {i}: mask {region.shape[1]}x{region.shape[0]} != image {image.width}x{image.height}"
            )
        views = preprocess.views(image)
        items.append(
            {
                "pixel_values1": views,
                "num_views1": torch.tensor(len(views)),
                **region_tensors(np.asarray(region, bool), preprocess),
                "pixel_values2": views,
                "num_views2": torch.tensor(len(views)),
                "sam_pixel_values2": image_tensor(image, preprocess.sam_size, preprocess.sam_normalise),
                "masks2": torch.zeros(preprocess.sam_size, preprocess.sam_size),
                "caption": None,
                "index": i,
                "skipped": [],
            }
        )
    return inputs_on_device(collate_pairs(items), model_device(model), model_dtype(model))


def _predictions(images: list, logits: torch.Tensor, captions: list[str]) -> list[Prediction]:
    out = []
    for image, row, text in zip(images, logits, captions):
        mask = mask_at(row, (image.height, image.width))
        probs = F.interpolate(row.float()[None, None], size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
        score = float(probs.sigmoid().cpu()[mask].mean()) if mask.any() else 0.0
        out.append(Prediction(mask.numpy(), row.float().cpu(), score, text))
    return out


def segment(model, images: list, texts: list[str], cfg: PseudoGumbelConfig | None = None) -> list[Prediction]:
    """Each image segmented from its text (referring segmentation)."""
    cfg = cfg or default_objective(model)
    batch = image_inputs(model, images)
    ids, lens = encode_texts(model, texts, cfg.max_caption_len)
    return _predictions(images, segment_image2(model, batch, ids, lens), list(texts))


def caption(model, images: list, regions: list[np.ndarray], cfg: PseudoGumbelConfig | None = None) -> list[str]:
    """The model's caption of each image's region (bool [H, W] at the image's resolution)."""
    cfg = cfg or default_objective(model)
    batch = image_inputs(model, images, regions)
    ids, lens = caption_regions(model, batch, cfg)
    return decode(model, ids, lens)


def segment_from_own_caption(
    model, images: list, regions: list[np.ndarray], cfg: PseudoGumbelConfig | None = None
) -> list[Prediction]:
    """The cycle: the model captions each image's region, then segments the image from that
    caption (the mask should cover the region when the caption names it)."""
    cfg = cfg or default_objective(model)
    batch = image_inputs(model, images, regions)
    ids, lens = caption_regions(model, batch, cfg)
    return _predictions(images, segment_image2(model, batch, ids, lens), decode(model, ids, lens))
