"""Sa2VA-4B (real dimensions, random weights, bf16) Pseudo-Gumbel steps on one GPU.

Times and measures each stage of a step (CUDA allocator peaks) for a few batch sizes, with and
without gradient checkpointing, and writes a JSON report. The tokenizer is the tiny offline
one (no real tokenizer is available offline), so captions use its 480 ordinary ids while every
vocabulary-sized cost (lm_head rows, top-k over 151,679 logits) is the real one.

    python launch/gpu/real_step.py OUT.json [--batches 1,4,8]
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pg_train.ema import EMATeacher  # noqa: E402
from pg_train.model import build_model, component_parameter_counts, enable_gradient_checkpointing  # noqa: E402
from pg_train.model.presets import get_preset  # noqa: E402
from pg_train.model.regions import region_cells  # noqa: E402
from pg_train.model.tokenizer import load_tiny_tokenizer  # noqa: E402
from pg_train.pseudo_gumbel import (  # noqa: E402
    PseudoGumbelConfig, forward_for_logits, forward_mask_with_text_embeds, generate_pseudo_tokens_with_ema,
    mask_loss, random_mask_tokens, resize_target, sample_generators, special_ids, topk_gumbel_softmax, uniform_noise,
)

GiB = 2**30


CUDA = torch.cuda.is_available()


class Stage:
    """Wall time (synchronised) and allocator peak above the level at entry (CUDA only)."""

    def __init__(self, name, report):
        self.name, self.report = name, report

    def __enter__(self):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        entry = {"s": round(time.perf_counter() - self.start, 4)}
        if CUDA:
            torch.cuda.synchronize()
            entry["s"] = round(time.perf_counter() - self.start, 4)
            entry["peak_above_entry_gib"] = round((torch.cuda.max_memory_allocated() - self.base) / GiB, 3)
            entry["peak_total_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 3)
        self.report[self.name] = entry


def make_batch(B, device, sam_size):
    g = torch.Generator().manual_seed(B)
    masks = torch.zeros(B, 448, 448)
    for b in range(B):
        top, left = 40 + 30 * (b % 5), 60 + 25 * (b % 7)
        masks[b, top : top + 90 + 10 * b, left : left + 120] = 1
    return {
        "pixel_values1": torch.randn(B, 3, 448, 448, generator=g).to(device, torch.bfloat16),
        "region_masks1": masks.to(device),
        "pixel_values2": torch.randn(B, 3, 448, 448, generator=g).to(device, torch.bfloat16),
        "sam_pixel_values2": torch.randn(B, 3, sam_size, sam_size, generator=g).to(device, torch.bfloat16),
        "masks2": masks.flip(-1).to(device),
    }


def step(model, ema, batch, cfg, report):
    special = special_ids(model)
    seeds = torch.arange(batch["pixel_values1"].shape[0])
    cells, _ = region_cells(batch["region_masks1"], model.grid_size)
    with Stage("1_teacher_generation", report):
        captions, lengths = generate_pseudo_tokens_with_ema(ema, batch["pixel_values1"], cells, cfg, student=model)
    masked, _ = random_mask_tokens(captions, lengths, cfg.mask_ratio, special, sample_generators(seeds, 0))
    with Stage("3_pass1_caption_logits", report):
        logits = forward_for_logits(model, batch["pixel_values1"], cells, masked, lengths)
    with Stage("4_gumbel", report):
        uniform = uniform_noise(sample_generators(seeds, 1), logits.shape[1], cfg.topk)
        embeds, _ = topk_gumbel_softmax(logits, model.embed_tokens().weight, special, uniform, cfg.tau, cfg.topk)
    with Stage("5_pass2_segment", report):
        mask_logits = forward_mask_with_text_embeds(model, batch["pixel_values2"], batch["sam_pixel_values2"], embeds, lengths)
    losses = mask_loss(mask_logits, resize_target(batch["masks2"], mask_logits.shape[-2:]))
    with Stage("6_backward", report):
        losses["loss"].backward()
    with Stage("ema_update", report):
        ema.update(model)
    report["caption_len_mean"] = float(lengths.float().mean())
    report["region_k"] = cells.flatten(1).sum(1).tolist()
    report["loss"] = float(losses["loss"].detach())
    model.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--preset", default="sa2va-4b", help="tiny: a dry run of this script on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if CUDA else "cpu")
    results = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__}
    preset = dataclasses.replace(get_preset(args.preset), special_token_ids=None)
    start = time.perf_counter()
    model = build_model(preset, device=device, dtype=torch.bfloat16, tokenizer=load_tiny_tokenizer(), seed=0)
    if CUDA:
        torch.cuda.synchronize()
    results["build_s"] = round(time.perf_counter() - start, 2)
    results["params"] = component_parameter_counts(model)
    results["weights_gib"] = round(torch.cuda.memory_allocated() / GiB, 3) if CUDA else None
    ema = EMATeacher(model, placement="same")
    results["ema_bytes"] = ema.memory_bytes()
    results["after_ema_gib"] = round(torch.cuda.memory_allocated() / GiB, 3) if CUDA else None
    cfg = PseudoGumbelConfig(max_caption_len=64, min_caption_len=64, topk=128)
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        for B in [int(b) for b in args.batches.split(",")]:
            report = {"batch": B, "gradient_checkpointing": checkpointing}
            try:
                batch = make_batch(B, device, model.preset.sam2.image_size)
                step(model, ema, batch, cfg, {})  # warm-up
                if CUDA:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step(model, ema, batch, cfg, report)
                report["step_s"] = round(time.perf_counter() - t0, 4)
                if CUDA:  # each stage resets the allocator's peak: the step's peak is the largest stage peak
                    report["step_peak_gib"] = max(v["peak_total_gib"] for v in report.values() if isinstance(v, dict))
            except torch.cuda.OutOfMemoryError as err:
                report["oom"] = str(err)[:200]
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            runs.append(report)
            print(json.dumps(report), flush=True)
    results["runs"] = runs
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
