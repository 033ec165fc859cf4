"""The evaluation's gallery: held-out samples as data (images, region, true and predicted
masks, the model's caption, the ground truth, the IoU) and as one PNG.

`gallery_samples` computes (through pg_train.inference); `write_gallery` and pg_train.report
only draw what it returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data.images import IMAGENET_MEAN, IMAGENET_STD
from .distributed import unwrap
from .inference import caption_inputs, inference_mode, segment_image2
from .objectives.settings import PseudoGumbelConfig
from .scores import sample_counts


def whole_image_views(batch: dict, which: str) -> torch.Tensor:
    """[B, 3, S, S]: each sample's last view, which shows the whole image (the thumbnail when
    its image is tiled)."""
    pixels, views = batch[f"pixel_values{which}"], batch.get(f"num_views{which}")
    if views is None:
        return pixels
    return pixels[views.to(pixels.device).cumsum(0) - 1]


TILE = 224
TEXT_HEIGHT = 44
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _to_array(pixel_values: torch.Tensor) -> np.ndarray:
    """[TILE, TILE, 3] uint8 RGB of one normalised view."""
    array = ((pixel_values.float().cpu() * STD + MEAN).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(array).resize((TILE, TILE)))


def _mask_array(mask: torch.Tensor) -> np.ndarray:
    """[TILE, TILE] bool of a mask at any resolution (nearest: the pixels the model scored)."""
    image = Image.fromarray((mask.float().cpu().numpy() > 0.5).astype(np.uint8) * 255)
    return np.asarray(image.resize((TILE, TILE), Image.Resampling.NEAREST)) > 127


def samples_from(module, batch, cycle_caption, logits, logits_counts, limit) -> list[dict]:
    """Gallery samples of one batch as data, at most `limit`: image1 / image2 [TILE, TILE, 3]
    uint8 (the whole-image view), region1 / true2 / pred2 [TILE, TILE] bool (the region of
    image 1; image 2's true mask at SAM2's input resolution and the mask `logits` predict, at
    the logits' resolution), the model's caption of region 1 (decoded), the ground-truth
    expression, and the sample's IoU from `logits_counts` (intersections, unions: as the
    metrics count them)."""
    ids, lens = cycle_caption
    whole1, whole2 = whole_image_views(batch, "1"), whole_image_views(batch, "2")
    predicted = (logits > 0).float()
    inter, union = logits_counts
    samples = []
    for b in range(min(limit, batch["region_masks1"].shape[0])):
        samples.append(
            {
                "image1": _to_array(whole1[b]),
                "region1": _mask_array(batch["region_masks1"][b]),
                "image2": _to_array(whole2[b]),
                "true2": _mask_array(batch["masks2"][b]),
                "pred2": _mask_array(predicted[b]),
                "caption": module.tokenizer.decode(ids[b, : int(lens[b])].tolist()),
                "truth": batch["captions"][b] or "",
                "iou": float(inter[b] / union[b]) if float(union[b]) > 0 else 1.0,
            }
        )
    return samples


def gallery_samples(model, batches, cfg: PseudoGumbelConfig, n: int = 4, kind: str = "cycle") -> list[dict]:
    """The first `n` samples of `batches` as data (see samples_from): the model captions region
    1 of image 1 (as the cycle evaluation), then segments image 2 from that caption (`kind`
    "cycle") or from the ground-truth expression ("referring"). One caption generation and one
    mask pass a batch, so it is cheap."""
    module = unwrap(model)
    samples: list[dict] = []
    with inference_mode(model):
        for batch in batches:
            if len(samples) >= n:
                break
            inputs = caption_inputs(model, batch, cfg)
            logits = segment_image2(model, batch, *inputs[kind])
            found = samples_from(module, batch, inputs["cycle"], logits, sample_counts(logits, batch), n - len(samples))
            samples += [{**s, "predicted_from": kind} for s in found]
    return samples


def _overlay(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45) -> Image.Image:
    mask_image = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * int(255 * alpha)).resize(image.size)
    return Image.composite(Image.new("RGB", image.size, colour), image, mask_image)


def write_gallery(samples: list[dict], path: str | Path) -> None:
    """One row per sample: image 1 with its region (yellow) | image 2 with the true mask (green)
    and the mask predicted from the model's own caption (red); the caption underneath.
    (pg_train.report draws the same samples with matplotlib in a run's report.png, and saves
    them with save_samples.)"""
    canvas = Image.new("RGB", (2 * TILE, max(1, len(samples)) * (TILE + TEXT_HEIGHT)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, s in enumerate(samples):
        top = i * (TILE + TEXT_HEIGHT)
        left = _overlay(Image.fromarray(s["image1"]), s["region1"], (255, 200, 0))
        right = _overlay(Image.fromarray(s["image2"]), s["true2"], (0, 200, 0))
        right = _overlay(right, s["pred2"], (220, 0, 0), alpha=0.5)
        canvas.paste(left, (0, top))
        canvas.paste(right, (TILE, top))
        draw.text((4, top + TILE + 4), f"model: {s['caption']}"[:90], fill="black")
        truth = "truth (red: the mask from it)" if s.get("predicted_from") == "referring" else "truth"
        draw.text((4, top + TILE + 24), f"{truth}: {s['truth']}"[:90], fill="gray")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
