"""Does the model ground language? Referring segmentation, the caption cycle, and controls.

    python -m pg_train.evaluate --checkpoint DIR [--config RUN/config.yaml] [--manifest PAIRS.jsonl | --seed N]
        [--samples N] [--output DIR]

on the run's own held-out set (pg_train/data/heldout.py: its config's eval: section, or carved
out of its training data), unless --manifest / --seed name other data (then a warning):

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

from .checkpoint_files import TRAINING_CONFIG
from .distributed import unwrap
from .gallery import gallery_samples, samples_from, write_gallery
from .inference import KINDS, caption_inputs, inference_mode, inputs_on_device, model_dtype, segment_image2
from .objectives.drift import token_f1, words
from .objectives.settings import PseudoGumbelConfig
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
    lengths, tokens, rows, f1, exact = [], [], [], [], []
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
            for row, n, truth in zip(ids.tolist(), lens.tolist(), batch["captions"]):
                lengths.append(n)
                tokens += row[:n]
                said = module.tokenizer.decode(row[:n])  # issue 26: cycle captions against the ground truth
                f1.append(token_f1(said, truth))
                exact.append(float(words(said) == words(truth)))
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
        "token_f1": float(np.mean(f1)) if f1 else 0.0,
        "exact": float(np.mean(exact)) if exact else 0.0,
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
    None or not synthetic). A run's own held-out set: `batches_of(model, heldout, ...)`."""
    from .data import DataConfig, ManifestPairs
    from .data.heldout import EvalConfig, HeldOut, synthetic_heldout

    if manifest:
        heldout = HeldOut(ManifestPairs(manifest))
    else:
        synthetic = data if data is not None and data.source == "synthetic" else DataConfig()
        heldout = synthetic_heldout(synthetic, EvalConfig(seed=seed), seed, samples)
    return batches_of(model, heldout, batch_size, device, samples)


def batches_of(model, heldout, batch_size: int, device, samples: int | None = None) -> list[dict]:
    """The first `samples` pairs of a held-out set (data.heldout.HeldOut) as preprocessed
    batches on `device`, of at least 2 samples each (the shuffled control swaps captions within a
    batch). A refcoco-protocol set's batches carry each mask at its image's resolution
    (`truths`), where its IoU is counted."""
    from .data import PairDataset, collate_pairs
    from .data.loader import preprocess_for

    preprocess = preprocess_for(unwrap(model).preset)
    if heldout.protocol == "refcoco":
        from .eval_refcoco import ExpressionItems, collate_expressions

        dataset, collate = ExpressionItems(heldout.source, preprocess), collate_expressions
    else:
        dataset, collate = PairDataset(heldout.source, preprocess), collate_pairs
    count = len(dataset) if samples is None else min(samples, len(dataset))
    dtype = model_dtype(model)
    batches, step = [], max(2, batch_size)
    for start in range(0, count, step):
        batch = collate([dataset[i] for i in range(start, min(count, start + step))])
        if len(batch["captions"]) < 2:  # the shuffled control needs a second sample
            continue
        batches.append(inputs_on_device(batch, device, dtype))
    return batches


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(model, the run's config or None): a training checkpoint of any layout (DeepSpeed ZeRO
    consolidated), a run directory or a released-format Sa2VA directory (builders.load_checkpoint)."""
    from .builders import load_checkpoint as load

    return load(path, device, command="pg-train-evaluate")


def load_for_evaluation(path: str | Path, device: str, config: str | Path | None = None):
    """(model, the run's config or None, the objective settings to evaluate with): the run's
    (`config`: a run's config.yaml; else a training checkpoint's run, or the training_config.yaml
    an exported directory carries), or without one the preset's defaults, as training would use."""
    from .config import load_config, objective_for

    model, cfg = load_checkpoint(path, device)
    if config is not None:
        cfg = load_config([config], ["resume=null", "model.init_from=null", "model.checkpoint=null"])
    return model, cfg, (cfg.objective if cfg is not None else objective_for(model.preset))


def data_key(description: dict) -> tuple:
    """What makes two held-out sets the same set: source, split, n."""
    return description.get("source"), description.get("split"), description.get("n")


def config_warnings(checkpoint, given: str | None, cfg) -> list[str]:
    """A warning when --config names data settings (data:, eval:, seed) other than those of the
    run that wrote `checkpoint` (when its config can be read)."""
    from .checkpoint_files import resolve_checkpoint, run_config_path
    from .config import load_config, to_dict

    if given is None or cfg is None:
        return []
    own_path = run_config_path(resolve_checkpoint(checkpoint, "pg-train-evaluate"))
    if not own_path.is_file() or own_path.resolve() == Path(given).resolve():
        return []
    own = load_config([own_path], ["resume=null", "model.init_from=null", "model.checkpoint=null"])
    settings = lambda c: (to_dict(c.data), to_dict(c.eval), c.seed)  # noqa: E731
    if settings(own) == settings(cfg):
        return []
    return [
        f"--config {given} has other data settings (data:, eval: or seed) than the run that wrote {checkpoint} "
        f"({own_path}): the held-out set is --config's, not that run's"
    ]


def choose_heldout(run_cfg, args, samples: int) -> tuple[object, list[str]]:
    """(the held-out set to evaluate on, warnings): --manifest or --seed when given, else the
    run's own held-out set (its data: and eval: sections), else (no run config) default
    synthetic scenes. A set that differs from the run's, or samples the run trained on, is a
    warning."""
    from .data import DataConfig, ManifestPairs
    from .data.heldout import EvalConfig, HeldOut, split_run_data, synthetic_heldout

    warnings = []
    own = None
    if run_cfg is not None:
        _, own = split_run_data(run_cfg.data, run_cfg.eval, run_cfg.seed, samples, carve_out=bool(run_cfg.eval_every))
    if args.manifest:
        source = ManifestPairs(args.manifest)
        chosen = HeldOut(source, {"source": "manifest", "split": str(args.manifest), "chosen": "--manifest"})
        chosen.description.update(n=min(samples, len(source)), available=len(source))
    elif args.seed is not None or own is None:
        data = run_cfg.data if run_cfg is not None and run_cfg.data.source == "synthetic" else DataConfig()
        seed = 10_000 if args.seed is None else args.seed
        chosen = synthetic_heldout(data, EvalConfig(seed=seed), seed, samples)
        chosen.description.update(chosen="--seed" if args.seed is not None else "default (no run config)")
        if own is None:
            warnings.append(
                f"{args.checkpoint} comes without its run's config (a model directory without "
                f"{TRAINING_CONFIG}): evaluating on default synthetic scenes ({chosen.label()}), which say "
                "nothing about the data the model was trained for; pass --config RUN_DIR/config.yaml (or --manifest)"
            )
    else:
        chosen = own
    if own is not None and data_key(chosen.description) != data_key(own.description):
        warnings.append(
            f"evaluating on {chosen.label()}, but the run's held-out set (its config.yaml) is {own.label()}: "
            "these numbers are not comparable with the run's eval/* metrics"
        )
    if chosen.description.get("trained_on"):
        warnings.append(
            f"the run trained on these samples ({chosen.label()}): it had eval_every=0 and no eval: section, so "
            "nothing was held out; these are training-set numbers"
        )
    return chosen, warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pg_train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--config",
        help="the run's config.yaml whose held-out set (data: and eval: sections) and objective to use "
        f"(default: a training checkpoint's run, or the {TRAINING_CONFIG} an exported directory carries)",
    )
    parser.add_argument("--manifest", help="JSONL pairs to evaluate on instead of the run's held-out set")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="default: the run's eval_samples (32 without a run config); the whole split (--refer-dir)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the run's (as training evaluates), else 8"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="evaluate on synthetic scenes of this seed instead of the run's held-out set",
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
    model, cfg, objective = load_for_evaluation(args.checkpoint, device, args.config)
    if args.refer_dir:
        from .eval_refcoco import run

        args.batch_size = args.batch_size or 8
        return run(args, model, objective)
    samples = args.samples or (cfg.eval_samples if cfg is not None else 32)
    batch_size = args.batch_size or (max(2, cfg.batch_size) if cfg is not None else 8)
    heldout, warnings = choose_heldout(cfg, args, samples)
    warnings += config_warnings(args.checkpoint, args.config, cfg)
    for warning in warnings:
        print(f"\n*** WARNING: {warning}\n", file=sys.stderr, flush=True)
    batches = batches_of(model, heldout, batch_size, device, samples)
    out = Path(args.output)
    results = evaluate(model, batches, objective, gallery_path=out / "gallery.png")
    results["data"] = {
        **heldout.description,
        "scored": results["samples"],
        "config": str(args.config) if args.config else ("the checkpoint's run" if cfg else None),
    }
    results["data_mismatch"] = any("not comparable" in w for w in warnings)
    results["warnings"] = warnings
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    print(f"{results['samples']} samples from {heldout.label()}")
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
