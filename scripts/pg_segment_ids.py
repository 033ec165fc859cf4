"""What the Pseudo-Gumbel segmentation ids change (issue 30, item 8; docs/fidelity.md).

A teacher caption comes back as answer-context ids (`a` `Ġred` ...). Inside the segmentation
prompt the official code reads the caption as the tokenizer encodes the whole prompt string, with
the space after `Please segment` glued to the first word (`Ġa` `Ġred` ...): the canonical ids.
Pseudo-Gumbel keeps the teacher's token positions (its straight-through mixture lives on them), so
it can only rewrite the first id, through its leading-space twin (`a` -> `Ġa`) or, where none
exists, a separate space token before it (templates.LeadingSpace). Where the answer context split
the first word into pieces (`re` `d` for `red` in the tiny vocabulary) or BPE merges the space
differently, the ids differ from the canonical ones for the same text.

Two measurements, written to one JSON file with the usual stamp (commit, date, versions, device):

- `tiny`: a trained tiny checkpoint (`--checkpoint`, e.g. configs/quick_warmup.yaml's run) on its
  held-out synthetic scenes, captions in three forms (the data's own "the ...", without the
  article, capitalised); for each caption whose PG ids differ from the canonical ones, the IoU
  between the two masks (logits > 0 at the decoder's resolution) and each mask's IoU with the
  ground truth.
- `sa2va_4b_lm` (`--lm`): Sa2VA-4B's language model (Qwen2.5-3B dims, 36 layers, the real Qwen
  vocabulary from dashscope's qwen.tiktoken) with random weights in bf16 on the CPU, the
  segmentation prompt with random image-slot embeddings: the [SEG] hidden state (what SAM2 reads
  through text_hidden_fcs) and the next-token logits at [SEG], canonical vs PG ids of the same
  caption, next to the difference between two different captions for scale. The ViT and SAM2
  are not run (too heavy for a 2-core CPU; they do not see the caption ids).

    PYTHONPATH=$PWD nice -n 8 .venv/bin/python scripts/pg_segment_ids.py \
        --checkpoint RUN_DIR --lm --json docs/measurements/pg_segment_ids.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained tiny run or checkpoint (configs/quick_warmup.yaml's)")
    p.add_argument("--samples", type=int, default=96, help="held-out scenes for the tiny measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lm", action="store_true", help="also measure on Sa2VA-4B's language model (random bf16)")
    p.add_argument("--lm-captions", type=int, default=8, help="captions whose PG ids differ, for the 4B LM")
    p.add_argument("--image-tokens", type=int, default=256, help="image slots in the 4B segmentation prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", required=True, help="where the report goes")
    return p.parse_args(argv)


def pg_route_ids(prompts, text: str) -> list[int]:
    """The ids the segmentation pass reads for a teacher caption of `text`: its answer ids, the
    first through its leading-space twin, a space id before it where it has none."""
    answer = prompts.answer_ids(text)
    if not answer:
        return []
    twin, needs_slot = prompts.leading_space.on(torch.device("cpu"))
    first = answer[0]
    return ([prompts.leading_space.space_id] if bool(needs_slot[first]) else []) + [int(twin[first])] + answer[1:]


FORMS = ("data", "no_article", "colour_first", "capitalised")


def caption_forms(caption: str) -> dict[str, str]:
    """The data's caption ("the large red star at the center"), the same without its article,
    without article and size (the colour, the word that tells the objects apart, first), and
    capitalised."""
    words = caption.split()
    bare = words[1:] if len(words) > 1 and words[0].lower() in ("the", "a", "an") else words
    colour_first = bare[1:] if len(bare) > 1 and bare[0] in ("tiny", "small", "medium", "large") else bare
    return {
        "data": caption,
        "no_article": " ".join(bare),
        "colour_first": " ".join(colour_first),
        "capitalised": caption[:1].upper() + caption[1:],
    }


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row IoU of two bool [B, H, W] masks (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def measure_tiny(args) -> dict:
    from pg_train.builders import load_checkpoint
    from pg_train.distributed import unwrap
    from pg_train.evaluate import heldout_batches
    from pg_train.inference import inference_mode
    from pg_train.objectives.passes import answer_caption_embeds, forward_mask_with_text_embeds, resize_target

    model, cfg = load_checkpoint(args.checkpoint, "cpu", command="pg_segment_ids")
    module = unwrap(model)
    prompts = module.prompts
    from pg_train.data.heldout import HELDOUT_SEED_OFFSET

    # the run's own held-out scenes (as its in-training evaluation drew them)
    seed = (
        cfg.eval.seed
        if cfg is not None and cfg.eval.seed is not None
        else (cfg.seed if cfg else 0) + HELDOUT_SEED_OFFSET
    )
    batches = heldout_batches(model, args.samples, args.batch_size, seed, "cpu", data=cfg.data if cfg else None)
    rows: dict[str, list[dict]] = {}
    for batch in batches:
        masks = None
        for form in FORMS:
            texts = [caption_forms(c)[form] for c in batch["captions"]]
            canonical = [prompts.segment_caption_ids(t) for t in texts]
            pg = [pg_route_ids(prompts, t) for t in texts]
            answers = [prompts.answer_ids(t) for t in texts]
            with inference_mode(model):
                width = max(len(c) for c in canonical)
                ids = torch.full((len(texts), width), module.tokenizer.pad_token_id, dtype=torch.long)
                for i, c in enumerate(canonical):
                    ids[i, : len(c)] = torch.tensor(c)
                lens = torch.tensor([len(c) for c in canonical])
                canon_logits = forward_mask_with_text_embeds(
                    model,
                    batch["pixel_values2"],
                    batch["sam_pixel_values2"],
                    module.embed_tokens()(ids),
                    lens,
                    num_views=batch.get("num_views2"),
                )
                width = max(len(a) for a in answers)
                ids = torch.full((len(texts), width), module.tokenizer.pad_token_id, dtype=torch.long)
                for i, a in enumerate(answers):
                    ids[i, : len(a)] = torch.tensor(a)
                lens = torch.tensor([len(a) for a in answers])
                embeds, space_slot = answer_caption_embeds(module, ids, lens)
                pg_logits = forward_mask_with_text_embeds(
                    model,
                    batch["pixel_values2"],
                    batch["sam_pixel_values2"],
                    embeds,
                    lens,
                    space_slot=space_slot,
                    num_views=batch.get("num_views2"),
                )
            if masks is None:
                masks = resize_target(batch["masks2"], canon_logits.shape[-2:]) > 0.5
            canon_mask, pg_mask = canon_logits > 0, pg_logits > 0
            between = iou(canon_mask, pg_mask)
            with_truth = iou(canon_mask, masks), iou(pg_mask, masks)
            for i, text in enumerate(texts):
                rows.setdefault(form, []).append(
                    {
                        "text": text,
                        "differ": pg[i] != canonical[i],
                        "iou_canonical_vs_pg": float(between[i]),
                        "iou_truth_canonical": float(with_truth[0][i]),
                        "iou_truth_pg": float(with_truth[1][i]),
                        "max_abs_logit_diff": float((canon_logits[i] - pg_logits[i]).abs().max()),
                    }
                )
    summary = {}
    for form, items in rows.items():
        differ = [r for r in items if r["differ"]]
        same = [r for r in items if not r["differ"]]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        summary[form] = {
            "captions": len(items),
            "pg_ids_differ": len(differ),
            "mean_iou_canonical_vs_pg_where_differ": mean([r["iou_canonical_vs_pg"] for r in differ]),
            "min_iou_canonical_vs_pg_where_differ": min((r["iou_canonical_vs_pg"] for r in differ), default=None),
            "mean_iou_truth_canonical_where_differ": mean([r["iou_truth_canonical"] for r in differ]),
            "mean_iou_truth_pg_where_differ": mean([r["iou_truth_pg"] for r in differ]),
            "max_abs_logit_diff_where_differ": max((r["max_abs_logit_diff"] for r in differ), default=None),
            "max_abs_logit_diff_where_same": max((r["max_abs_logit_diff"] for r in same), default=None),
            "examples": [
                {
                    "text": r["text"],
                    "canonical": module.tokenizer.convert_ids_to_tokens(prompts.segment_caption_ids(r["text"])),
                    "pg": module.tokenizer.convert_ids_to_tokens(pg_route_ids(prompts, r["text"])),
                }
                for r in differ[:3]
            ],
        }
    return {"checkpoint": str(args.checkpoint), "heldout_seed": seed, "forms": summary}


def qwen_captions() -> list[str]:
    """Captions of the shapes a teacher writes (tests/test_templates.py's set)."""
    import itertools

    starts = ["a", "A", "the", "The", "two", "3", "left", "man's", '"red"', "(small)"]
    middles = ["red circle", "dog on the left", "person in a blue shirt", "cup near 2 plates", 'sign saying "stop"']
    ends = ["", ".", ",", ")", "!", '"', " ."]
    return [f"{s} {m}{e}" for s, m, e in itertools.product(starts, middles, ends)]


def measure_4b_lm(args) -> dict:
    from pg_train.model.arch.presets import PRESETS
    from pg_train.model.arch.sa2va import build_language_model
    from pg_train.model.text.qwen_vocab import build_qwen_tokenizer, find_qwen_tiktoken
    from pg_train.model.text.templates import PromptBuilder

    if find_qwen_tiktoken() is None:
        return {"skipped": "qwen.tiktoken not installed (pip install --no-deps dashscope)"}
    preset = PRESETS["sa2va-4b"]
    tokenizer = build_qwen_tokenizer()
    prompts = PromptBuilder(
        tokenizer, preset.special_token_ids, args.image_tokens, "sa2va", "phi3_chat", preset.language.vocab_size
    )
    captions = qwen_captions()
    differ = [c for c in captions if pg_route_ids(prompts, c) != prompts.segment_caption_ids(c)]
    chosen = differ[:: max(1, len(differ) // args.lm_captions)][: args.lm_captions]
    torch.manual_seed(0)
    started = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        lm = build_language_model(preset).eval()
    finally:
        torch.set_default_dtype(default)
    build_s = time.perf_counter() - started
    print(f"[4b lm] built in {build_s:.0f} s; {len(differ)}/{len(captions)} captions differ", flush=True)
    embed = lm.get_input_embeddings()
    prefix = prompts.segment_prefix()
    suffix, seg_index = prompts.segment_suffix()
    image_slots = [i for i, t in enumerate(prefix) if t == preset.special_token_ids["<IMG_CONTEXT>"]]
    image_embeds = torch.randn(len(image_slots), preset.language.hidden_size) * embed.weight.float().std()

    @torch.no_grad()
    def seg_state(caption_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor(prefix + caption_ids + suffix)[None]
        embeds = embed(ids).clone()
        embeds[0, image_slots] = image_embeds.to(embeds.dtype)
        out = lm(inputs_embeds=embeds, output_hidden_states=True)
        at = len(prefix) + len(caption_ids) + seg_index
        return out.hidden_states[-1][0, at].float(), out.logits[0, at].float()

    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    rows = []
    started = time.perf_counter()
    for caption in chosen:
        canon_h, canon_l = seg_state(prompts.segment_caption_ids(caption))
        pg_h, pg_l = seg_state(pg_route_ids(prompts, caption))
        print(f"[4b lm] {caption!r}: [SEG] hidden rel diff {rel(pg_h, canon_h):.3g}", flush=True)
        rows.append(
            {
                "caption": caption,
                "canonical": tokenizer.convert_ids_to_tokens(prompts.segment_caption_ids(caption)),
                "pg": tokenizer.convert_ids_to_tokens(pg_route_ids(prompts, caption)),
                "seg_hidden_rel_diff": rel(pg_h, canon_h),
                "seg_logits_max_abs_diff": float((pg_l - canon_l).abs().max()),
                "seg_logits_argmax_equal": bool(pg_l.argmax() == canon_l.argmax()),
            }
        )
    # scale: two different captions, both canonical
    a_h, a_l = seg_state(prompts.segment_caption_ids("a red circle"))
    b_h, b_l = seg_state(prompts.segment_caption_ids("a blue circle"))
    return {
        "preset": "sa2va-4b language model (random init, bf16, CPU)",
        "image_tokens": args.image_tokens,
        "captions": len(captions),
        "pg_ids_differ": len(differ),
        "build_seconds": round(build_s, 1),
        "forward_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "scale_two_captions": {
            "captions": ["a red circle", "a blue circle"],
            "seg_hidden_rel_diff": rel(b_h, a_h),
            "seg_logits_max_abs_diff": float((b_l - a_l).abs().max()),
        },
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    torch.set_num_threads(args.threads)
    from pg_vs_supervised import stamp

    report: dict = {"command": " ".join(["scripts/pg_segment_ids.py", *(argv or sys.argv[1:])])}
    if args.checkpoint:
        report["tiny"] = measure_tiny(args)
        print(json.dumps(report["tiny"]["forms"], indent=1))
    if args.lm:
        report["sa2va_4b_lm"] = measure_4b_lm(args)
        print(json.dumps(report["sa2va_4b_lm"], indent=1))
    report.update(stamp())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
