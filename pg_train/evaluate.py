"""Does the model ground language? Referring segmentation, the caption cycle, and controls.

    python -m pg_train.evaluate --checkpoint DIR [--manifest PAIRS.jsonl | --samples N] [--output DIR]

- referring: segment image 2 from the ground-truth expression — cIoU (sum of intersections /
  sum of unions) and gIoU (mean per-sample IoU), the RefCOCO convention;
- cycle: the model captions region 1 of image 1 (greedy), then segments image 2 from its own
  caption — what Pseudo-Gumbel trains;
- controls on the same samples: another sample's caption (shuffled) and an empty caption. The
  gap between cycle and shuffled is what the captions carry about the object.
Also caption statistics, a JSON of every number and a PNG gallery.

    python -m pg_train.evaluate --checkpoint DIR --refer-dir refer_seg/refcoco --images coco/train2014

scores RefCOCO-family splits instead, as papers report them (pg_train/eval_refcoco.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .distributed import unwrap
from .model.regions import region_cells
from .pseudo_gumbel import (
    PseudoGumbelConfig,
    answer_caption_embeds,
    forward_mask_with_text_embeds,
    generate_pseudo_tokens_with_ema,
    iou_counts,
    resize_target,
)
from .supervised import tokenize_captions

KINDS = ("referring", "cycle", "shuffled", "empty")


def caption_inputs(model, batch: dict, cfg: PseudoGumbelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Caption ids and lengths per kind. shuffled = the cycle caption of the next sample in the
    batch (another object); empty = no caption at all."""
    device = batch["pixel_values1"].device
    cells, _ = region_cells(
        batch["region_masks1"],
        unwrap(model).grid_size,
        cfg.region_threshold,
        cfg.empty_region_policy,
        rule=cfg.region_rule,
    )
    generated, generated_len = generate_pseudo_tokens_with_ema(
        model, batch["pixel_values1"], cells, cfg, num_views=batch.get("num_views1")
    )
    truth, truth_len = tokenize_captions(model, batch["captions"], cfg.max_caption_len)
    B = generated.shape[0]
    order = torch.roll(torch.arange(B), 1)
    return {
        "referring": (truth.to(device), truth_len.to(device)),
        "cycle": (generated, generated_len),
        "shuffled": (generated[order], generated_len[order]),
        "empty": (
            torch.full((B, 1), unwrap(model).tokenizer.pad_token_id, device=device),
            torch.zeros(B, dtype=torch.long, device=device),
        ),
    }


def segment_from_caption(model, batch: dict, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Mask logits [B, S/4, S/4] for image 2 of `batch` from caption ids (any kind of
    caption_inputs), the caption read as training's pass 2 reads it."""
    embeds, space_slot = answer_caption_embeds(unwrap(model), ids, lens)
    return forward_mask_with_text_embeds(
        model,
        batch["pixel_values2"],
        batch["sam_pixel_values2"],
        embeds,
        lens,
        space_slot=space_slot,
        num_views=batch.get("num_views2"),
    )


def ciou_giou(inter: torch.Tensor, union: torch.Tensor) -> dict[str, float]:
    """RefCOCO's two numbers from per-sample pixel counts: cIoU = sum(I) / sum(U) (large objects
    weigh more), gIoU = mean(I / U) (every sample weighs the same; U = 0 counts as IoU 1)."""
    inter, union = inter.double(), union.double()
    per_sample = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return {
        "cIoU": float(inter.sum() / union.sum()) if float(union.sum()) > 0 else 0.0,
        "gIoU": float(per_sample.mean()) if len(per_sample) else 0.0,
    }


@torch.no_grad()
def evaluate(
    model, batches, cfg: PseudoGumbelConfig, gallery_path: str | Path | None = None, gallery_size: int = 8
) -> dict:
    """Numbers over all `batches` (dicts as the data loader yields, on the model's device)."""
    module = unwrap(model)
    was_training = module.training
    module.eval()
    inter = {k: [] for k in KINDS}
    union = {k: [] for k in KINDS}
    lengths, tokens, rows = [], [], []
    language = {k: [] for k in KINDS}  # the [SEG] language embedding SAM2 receives, per kind
    captured: list[torch.Tensor] = []
    hook = module.text_hidden_fcs.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu()))
    try:
        for batch in batches:
            if batch["region_masks1"].shape[0] < 2:
                raise ValueError(
                    "evaluation batches need at least 2 samples (the shuffled control swaps captions within a batch)"
                )
            inputs = caption_inputs(model, batch, cfg)
            target = None
            predictions = {}
            for kind, (ids, lens) in inputs.items():
                captured.clear()
                logits = segment_from_caption(model, batch, ids, lens)
                language[kind] += captured
                if target is None:
                    target = resize_target(batch["masks2"].to(logits.device), logits.shape[-2:])
                i, u = iou_counts(logits, target)
                inter[kind].append(i.cpu())
                union[kind].append(u.cpu())
                predictions[kind] = logits
            ids, lens = inputs["cycle"]
            for row, n in zip(ids.tolist(), lens.tolist()):
                lengths.append(n)
                tokens += row[:n]
            if gallery_path is not None and len(rows) < gallery_size:
                rows += _samples_from(
                    module, batch, inputs["cycle"], predictions["cycle"], target, gallery_size - len(rows)
                )
    finally:
        hook.remove()
        module.train(was_training)
    results = {
        k: ciou_giou(
            torch.cat(inter[k]) if inter[k] else torch.zeros(0), torch.cat(union[k]) if union[k] else torch.zeros(0)
        )
        for k in KINDS
    }
    results["samples"] = sum(len(t) for t in inter["cycle"])
    results["cycle_minus_shuffled_gIoU"] = results["cycle"]["gIoU"] - results["shuffled"]["gIoU"]
    results["language_embedding"] = (
        caption_sensitivity(torch.cat(language["cycle"]), torch.cat(language["shuffled"])) if language["cycle"] else {}
    )
    results["captions"] = {
        "mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "distinct_token_fraction": len(set(tokens)) / max(1, len(tokens)),
        "cut_at_limit_fraction": float(np.mean([n >= cfg.max_caption_len for n in lengths])) if lengths else 0.0,
    }
    if gallery_path is not None:
        write_gallery(rows, gallery_path)
        results["gallery"] = str(gallery_path)
    return results


def caption_sensitivity(own: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How much the language embedding SAM2 receives moves when only the caption changes
    (same image 2, another sample's caption) compared with how much it moves across images.

    A ratio near 0 means the [SEG] state ignores the caption: every mask is then a caption-free
    guess, whatever the IoU, which is what a model that only learned saliency looks like.
    """
    caption_effect = float((own - other).norm(dim=1).mean())
    image_spread = float((own - own.mean(0)).norm(dim=1).mean())
    return {
        "caption_effect": caption_effect,
        "image_spread": image_spread,
        "ratio": caption_effect / max(image_spread, 1e-12),
    }


# ---- gallery --------------------------------------------------------------------------------------
def whole_image_views(batch: dict, which: str) -> torch.Tensor:
    """[B, 3, S, S]: each sample's last view, which shows the whole image (the thumbnail when
    its image is tiled)."""
    pixels, views = batch[f"pixel_values{which}"], batch.get(f"num_views{which}")
    if views is None:
        return pixels
    return pixels[views.to(pixels.device).cumsum(0) - 1]


TILE = 224
TEXT_HEIGHT = 44
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def _to_array(pixel_values: torch.Tensor) -> np.ndarray:
    """[TILE, TILE, 3] uint8 RGB of one normalised view."""
    array = ((pixel_values.float().cpu() * STD + MEAN).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(array).resize((TILE, TILE)))


def _mask_array(mask: torch.Tensor) -> np.ndarray:
    """[TILE, TILE] bool of a mask at any resolution (nearest: the pixels the model scored)."""
    image = Image.fromarray((mask.float().cpu().numpy() > 0.5).astype(np.uint8) * 255)
    return np.asarray(image.resize((TILE, TILE), Image.Resampling.NEAREST)) > 127


def _samples_from(module, batch, cycle_caption, cycle_logits, target, limit) -> list[dict]:
    """Gallery samples of one batch as data, at most `limit`: image1 / image2 [TILE, TILE, 3]
    uint8 (the whole-image view), region1 / true2 / pred2 [TILE, TILE] bool (the region of
    image 1; image 2's true mask at SAM2's input resolution and the mask predicted from the
    model's own caption at the logits'), the caption (decoded), the ground-truth expression, and
    the sample's IoU against `target` (at the logits' resolution, as the metrics count it)."""
    ids, lens = cycle_caption
    whole1, whole2 = whole_image_views(batch, "1"), whole_image_views(batch, "2")
    predicted = (cycle_logits > 0).float()
    inter, union = iou_counts(cycle_logits, target)
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


@torch.no_grad()
def gallery_samples(model, batches, cfg: PseudoGumbelConfig, n: int = 4) -> list[dict]:
    """The first `n` samples of `batches` as data (see _samples_from): the model captions region
    1 of image 1 (greedy, as the cycle evaluation), then segments image 2 from that caption. Only
    the cycle path runs (one caption generation and one mask pass a batch), so it is cheap."""
    module = unwrap(model)
    was_training = module.training
    module.eval()
    samples: list[dict] = []
    try:
        for batch in batches:
            if len(samples) >= n:
                break
            inputs = caption_inputs(model, batch, cfg)
            logits = segment_from_caption(model, batch, *inputs["cycle"])
            target = resize_target(batch["masks2"].to(logits.device), logits.shape[-2:])
            samples += _samples_from(module, batch, inputs["cycle"], logits, target, n - len(samples))
    finally:
        module.train(was_training)
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
        draw.text((4, top + TILE + 24), f"truth: {s['truth']}"[:90], fill="gray")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ---- loading and CLI -------------------------------------------------------------------------------
def heldout_batches(
    model, samples: int, batch_size: int, seed: int, device, manifest: str | None = None, data=None
) -> list[dict]:
    """Preprocessed evaluation batches: the manifest if given, else synthetic scenes of `seed`
    drawn like `data`'s (a DataConfig: sizes, colours, object counts — the defaults when it is
    None or not synthetic). Training uses small seeds; the default held-out seed is 10,000+."""
    import dataclasses

    from .data import DataConfig, ManifestPairs, PairDataset, build_source, collate_pairs
    from .data.loader import preprocess_for

    preset = unwrap(model).preset
    if manifest:
        source = ManifestPairs(manifest)
    else:
        synthetic = data if data is not None and data.source == "synthetic" else DataConfig()
        source = build_source(dataclasses.replace(synthetic, num_samples=samples, sample_offset=0), seed=seed)
    dataset = PairDataset(source, preprocess_for(preset))
    count = min(samples, len(dataset))
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    batches, step = [], max(2, batch_size)
    for start in range(0, count, step):
        batch = collate_pairs([dataset[i] for i in range(start, min(count, start + step))])
        if len(batch["captions"]) < 2:  # the shuffled control needs a second sample
            continue
        batches.append(batch_on_device(batch, device, dtype))
    return batches


def batch_on_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """A collated batch's model inputs and captions on `device` (pixels in `dtype`); image 2
    stays image 1's tensor when it was."""
    from .data.loader import batch_to_device

    tensors = batch_to_device(batch, device, dtype)
    tensors["captions"] = batch["captions"]
    return tensors


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """A training checkpoint (`runs/x/checkpoints/step-N`, next to the run's config.yaml) or a
    released-format Sa2VA directory (config.json + safetensors)."""
    path = Path(path)
    if (path / "config.json").is_file():
        from .model import from_pretrained

        return from_pretrained(path, device=device), None
    config = path.parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(
            f"{path}: neither a released checkpoint (config.json) nor a training checkpoint next to {config}"
        )
    from .builders import build_student, load_training_weights
    from .config import load_config

    cfg = load_config([config], ["resume=null", "model.init_from=null"])
    model = build_student(cfg)
    load_training_weights(model, path)
    return model.to(device), cfg


def load_for_evaluation(path: str | Path, device: str):
    """(model, the run's config or None, the objective settings to evaluate with): the run's,
    or for a released checkpoint its preset's defaults, as training would use."""
    model, cfg = load_checkpoint(path, device)
    if cfg is None:
        from .config import objective_for

        return model, cfg, objective_for(model.preset)
    return model, cfg, cfg.objective


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", help="JSONL pairs to evaluate on (default: held-out synthetic scenes)")
    parser.add_argument(
        "--samples", type=int, default=None, help="default: 32 (synthetic or manifest), the whole split (--refer-dir)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--seed", type=int, default=10_000, help="synthetic held-out seed (training uses its own, small seed)"
    )
    parser.add_argument("--output", default="eval")
    refer = parser.add_argument_group("RefCOCO-family split (pg_train/eval_refcoco.py)")
    refer.add_argument(
        "--refer-dir", help="folder with instances.json and refs(unc|umd|google).p: evaluate its splits instead"
    )
    refer.add_argument("--images", help="the COCO train2014 image folder")
    refer.add_argument("--splits", nargs="+", help="default: every split of the refs file except train")
    refer.add_argument(
        "--split-by", choices=("unc", "umd", "google"), help="default: the only refs(*).p in --refer-dir"
    )
    refer.add_argument("--workers", type=int, default=0, help="image-reading processes")
    args = parser.parse_args(argv)
    if args.refer_dir:
        from .eval_refcoco import run

        return run(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, objective = load_for_evaluation(args.checkpoint, device)
    # held-out scenes drawn like the run's training scenes (sizes, colours, object counts), another seed
    batches = heldout_batches(
        model, args.samples or 32, args.batch_size, args.seed, device, args.manifest, data=cfg.data if cfg else None
    )
    out = Path(args.output)
    results = evaluate(model, batches, objective, gallery_path=out / "gallery.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    print(f"{results['samples']} samples from {args.manifest or 'held-out synthetic scenes'}")
    print(f"{'':12} {'cIoU':>7} {'gIoU':>7}")
    for kind in KINDS:
        print(f"{kind:12} {results[kind]['cIoU']:7.3f} {results[kind]['gIoU']:7.3f}")
    c = results["captions"]
    lang = results["language_embedding"]
    print(f"language embedding: caption effect / image spread = {lang['ratio']:.3f} (near 0: masks ignore the caption)")
    print(
        f"cycle - shuffled gIoU: {results['cycle_minus_shuffled_gIoU']:+.3f}; captions: {c['mean_length']:.1f} tokens, "
        f"{c['distinct_token_fraction']:.2f} distinct, {c['cut_at_limit_fraction']:.2f} cut at the limit"
    )
    print(f"wrote {out / 'eval.json'} and {out / 'gallery.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
