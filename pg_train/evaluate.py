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
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .distributed import unwrap
from .gallery import gallery_samples, samples_from, write_gallery
from .inference import KINDS, caption_inputs, inference_mode, inputs_on_device, segment_image2
from .pseudo_gumbel import PseudoGumbelConfig
from .scores import ciou_giou, sample_counts

__all__ = ["KINDS", "ciou_giou", "evaluate", "gallery_samples", "heldout_batches", "main"]


@contextlib.contextmanager
def language_embeddings(module):
    """A list that collects the [SEG] language embedding SAM2 receives (text_hidden_fcs' output)
    on every mask pass while the context is open."""
    captured: list[torch.Tensor] = []
    hook = module.text_hidden_fcs.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu()))
    try:
        yield captured
    finally:
        hook.remove()


def evaluate(
    model, batches, cfg: PseudoGumbelConfig, gallery_path: str | Path | None = None, gallery_size: int = 8
) -> dict:
    """Numbers over all `batches` (dicts as the data loader yields, on the model's device):
    cIoU / gIoU per kind, the language-embedding sensitivity, caption statistics; with
    `gallery_path`, a PNG of the first `gallery_size` samples."""
    module = unwrap(model)
    inter = {k: [] for k in KINDS}
    union = {k: [] for k in KINDS}
    lengths, tokens, rows = [], [], []
    language = {k: [] for k in KINDS}  # the [SEG] language embedding SAM2 receives, per kind
    with inference_mode(model), language_embeddings(module) as captured:
        for batch in batches:
            if batch["region_masks1"].shape[0] < 2:
                raise ValueError(
                    "evaluation batches need at least 2 samples (the shuffled control swaps captions within a batch)"
                )
            inputs = caption_inputs(model, batch, cfg)
            predictions = {}
            for kind, (ids, lens) in inputs.items():
                captured.clear()
                predictions[kind] = segment_image2(model, batch, ids, lens)
                language[kind] += captured
                i, u = sample_counts(predictions[kind], batch)
                inter[kind].append(i)
                union[kind].append(u)
            ids, lens = inputs["cycle"]
            for row, n in zip(ids.tolist(), lens.tolist()):
                lengths.append(n)
                tokens += row[:n]
            if gallery_path is not None and len(rows) < gallery_size:
                cycle_counts = (inter["cycle"][-1], union["cycle"][-1])
                rows += samples_from(
                    module, batch, inputs["cycle"], predictions["cycle"], cycle_counts, gallery_size - len(rows)
                )
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
        batches.append(inputs_on_device(batch, device, dtype))
    return batches


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(model, the run's config or None): a training checkpoint of any layout (DeepSpeed ZeRO
    consolidated), a run directory or a released-format Sa2VA directory (builders.load_checkpoint)."""
    from .builders import load_checkpoint as load

    return load(path, device, command="pg-train-evaluate")


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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.refer_dir and not args.images:
        raise SystemExit("--refer-dir needs --images (the COCO train2014 folder the refs' images are in)")
    model, cfg, objective = load_for_evaluation(args.checkpoint, device)
    if args.refer_dir:
        from .eval_refcoco import run

        return run(args, model, objective)
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
