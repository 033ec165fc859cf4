"""Referring segmentation on a RefCOCO-family split, scored as papers report it.

    python -m pg_train.evaluate --checkpoint DIR --refer-dir refer_seg/refcoco --images coco/train2014 \\
        [--splits val testA testB] [--split-by unc] [--samples N] [--output eval/]

Every expression (ref, sentence) of a split is one sample, as in Sa2VA's evaluator:
- referring: segment the image from the expression;
- cycle: the model captions the ref's region (greedy), then segments the same image from its
  own caption.
The predicted mask logits are upsampled (bilinear) to the image's own resolution and
thresholded at 0, then scored against the annotation's mask there: cIoU = ΣI / ΣU over the
split, gIoU = mean per-expression I / U, an empty union scoring 1. An expression whose image or
annotation cannot be read is counted under its reason, not scored.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data.loader import PairDataset, Preprocess, collate_pairs, preprocess_for
from .data.refer import ReferPairs
from .data.types import RawPair
from .gallery import gallery_samples, write_gallery
from .inference import (
    caption_inputs,
    decode,
    inference_mode,
    inputs_on_device,
    model_device,
    model_dtype,
    segment_image2,
)
from .scores import ciou_giou, intersection_union

KINDS = ("referring", "cycle")
Predictor = Callable[[dict], dict]  # batch -> {"referring": logits [B, h, w], "cycle": ..., "cycle_captions": [str]}


class _AsPairs:
    """A ReferPairs split seen as pairs of each image with itself, for PairDataset's
    preprocessing (views, tiling, region mask); keeps each mask at the image's resolution for
    scoring, until the item that loaded it takes it."""

    def __init__(self, source: ReferPairs):
        self.source = source
        self.truths: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> RawPair:
        image, mask, caption, where = self.source.load_target(index)
        self.truths[index] = mask
        return RawPair(image, mask, image, mask, caption, where)


class ExpressionItems(Dataset):
    """Model inputs for each expression, as training preprocesses them, plus its mask at the
    image's resolution. No refill: a bad expression is reported, never replaced by another."""

    def __init__(self, source: ReferPairs, preprocess: Preprocess, limit: int | None = None):
        self.expressions = _AsPairs(source)
        self.pairs = PairDataset(self.expressions, preprocess, max_refill=0)
        self.count = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        item = self.pairs[index]
        truth = self.expressions.truths.pop(index, None)
        if "pixel_values1" in item:
            item["truth"] = torch.from_numpy(truth)
        return item


def collate_expressions(items: list[dict]) -> dict:
    """collate_pairs, plus each good item's mask at its image's resolution (`truths`)."""
    batch = collate_pairs(items)
    batch["truths"] = [item["truth"] for item in items if "truth" in item]
    return batch


def model_predictor(model, cfg, device, dtype: torch.dtype) -> Predictor:
    """Referring and cycle mask logits for a batch from `model` (the teacher is the model),
    through pg_train.inference as every evaluation computes them."""

    def predict(batch: dict) -> dict:
        with inference_mode(model):
            tensors = inputs_on_device(batch, device, dtype)
            inputs = caption_inputs(model, tensors, cfg)
            out = {kind: segment_image2(model, tensors, *inputs[kind]) for kind in KINDS}
            out["cycle_captions"] = decode(model, *inputs["cycle"])
        return out

    return predict


def evaluate_split(
    source: ReferPairs,
    predict: Predictor,
    preprocess: Preprocess,
    batch_size: int = 8,
    limit: int | None = None,
    workers: int = 0,
    progress: bool = True,
    examples: int = 8,
    desc: str = "",
) -> dict:
    """cIoU / gIoU of each kind over the split's expressions (see the module docstring)."""
    from tqdm.auto import tqdm

    items = ExpressionItems(source, preprocess, limit)
    loader = DataLoader(items, batch_size=batch_size, collate_fn=collate_expressions, num_workers=workers)
    inter = {k: [] for k in KINDS}
    union = {k: [] for k in KINDS}
    skipped: Counter = Counter()
    samples = []
    with tqdm(total=len(items), desc=desc, unit="expr", disable=not progress) as bar:
        for batch in loader:
            skipped.update(reason for reason, _ in batch["skipped"])
            if batch["truths"]:
                out = predict(batch)
                for b, truth in enumerate(batch["truths"]):
                    for kind in KINDS:
                        i, u = intersection_union(out[kind][b], truth)
                        inter[kind].append(i)
                        union[kind].append(u)
                    if len(samples) < examples:
                        cycle_captions = out.get("cycle_captions")
                        samples.append(
                            {
                                "expression": batch["captions"][b],
                                "cycle_caption": cycle_captions[b] if cycle_captions else None,
                                **{
                                    f"{kind}_IoU": inter[kind][-1] / union[kind][-1] if union[kind][-1] else 1.0
                                    for kind in KINDS
                                },
                            }
                        )
            bar.update(len(batch["truths"]) + len(batch["skipped"]))
    results = {
        kind: ciou_giou(torch.tensor(inter[kind], dtype=torch.float64), torch.tensor(union[kind], dtype=torch.float64))
        for kind in KINDS
    }
    results.update(expressions=len(inter["referring"]), skipped=dict(skipped), examples=samples)
    return results


def format_table(results: dict) -> str:
    """Per split: expressions, referring and cycle cIoU / gIoU in percent (as papers print them)."""
    lines = [
        f"{'split':8} {'expressions':>11} {'referring cIoU':>15} {'gIoU':>6} {'cycle cIoU':>11} {'gIoU':>6}  skipped"
    ]
    for split, r in results["splits"].items():
        lines.append(
            f"{split:8} {r['expressions']:>11} {100 * r['referring']['cIoU']:>15.1f} {100 * r['referring']['gIoU']:>6.1f} "
            f"{100 * r['cycle']['cIoU']:>11.1f} {100 * r['cycle']['gIoU']:>6.1f}  {sum(r['skipped'].values()) or '-'}"
        )
    return "\n".join(lines)


def split_gallery(model, cfg, source: ReferPairs, preprocess: Preprocess, path: Path, n: int = 8) -> Path:
    """A PNG of the split's first `n` expressions: the image with the ref's region (yellow) and
    the model's caption of it, the mask predicted from the expression (red) over the
    annotation's (green)."""
    items = ExpressionItems(source, preprocess, n)
    batch = collate_expressions([items[i] for i in range(len(items))])
    samples = []
    if batch["truths"]:
        tensors = inputs_on_device(batch, model_device(model), model_dtype(model))
        samples = gallery_samples(model, [tensors], cfg, n, kind="referring")
    write_gallery(samples, path)
    return path


def run(args, model, objective) -> int:
    """`python -m pg_train.evaluate --refer-dir ...` (arguments parsed and the model loaded by
    pg_train.evaluate): every split's numbers to refcoco.json, a gallery PNG per split."""
    from .distributed import unwrap

    device = model_device(model)
    preprocess = preprocess_for(unwrap(model).preset)
    predict = model_predictor(model, objective, device, model_dtype(model))
    # every expression, the mask as annotated (no minimum size): the split as papers score it
    everything = ReferPairs(
        args.refer_dir, args.images, args.split_by, split=None, per="sentence", pairing="same", min_pixels=0
    )
    splits = args.splits or [s for s in everything.splits if s != "train"]
    results = {
        "refer_dir": str(args.refer_dir),
        "refs": everything.refs_path.name,
        "checkpoint": str(args.checkpoint),
        "splits": {},
    }
    out = Path(args.output)
    for split in splits:
        source = everything.subset(split)
        results["splits"][split] = evaluate_split(
            source, predict, preprocess, args.batch_size, args.samples, args.workers, desc=split
        )
        gallery = split_gallery(model, objective, source, preprocess, out / f"gallery_{split}.png")
        results["splits"][split]["gallery"] = str(gallery)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refcoco.json").write_text(json.dumps(results, indent=2))
    print(f"{Path(args.refer_dir).name} ({results['refs']}), checkpoint {args.checkpoint}; IoU in percent")
    print(format_table(results))
    print(f"wrote {out / 'refcoco.json'} and {', '.join(f'gallery_{s}.png' for s in splits)}")
    return 0
