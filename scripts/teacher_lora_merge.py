"""What merging LoRA into the teacher's weights would buy (and why pg_train does not do it).

    python scripts/teacher_lora_merge.py [--preset bench] [--dtype fp32|bf16] [--repeats 4]

Times the teacher's caption generation (batch 8, 16 tokens) with LoRA as adapters and with the
adapters merged into a copy's weights (PEFT `merge()`), alternating, and compares the captions.
Merged weights are W + s*B*A stored in the model's dtype: in bf16 a small adapter delta is
rounded away, so the merged teacher is not the EMA teacher there (README, "The whole step").
"""

import argparse
import copy
import statistics
import time

import torch
from peft.tuners.lora import LoraLayer

from pg_train.memcheck.measure import build_batch
from pg_train.model import build_offline
from pg_train.objectives.passes import batch_region_cells
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    unmerged = build_offline(args.preset, device="cpu", dtype=dtype, seed=0).eval()
    merged = copy.deepcopy(unmerged)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    batch = build_batch(unmerged, 8, torch.device("cpu"), seed=0)
    cfg = PseudoGumbelConfig(max_caption_len=16, min_caption_len=16)
    cells, _ = batch_region_cells(batch, unmerged.grid_size, cfg)
    times, captions = {"adapters": [], "merged": []}, {}
    for _ in range(args.repeats):
        for name, model in (("adapters", unmerged), ("merged", merged)):
            pixel_values = batch["pixel_values1"].clone()  # a fresh tensor: no ViT reuse across variants
            start = time.perf_counter()
            captions[name], _ = generate_pseudo_tokens_with_ema(model, pixel_values, cells, cfg)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(
            f"{name:9} teacher generation: median {statistics.median(values[1:] or values):.3f} s over {len(values) - 1 or 1} runs after the first"
        )
    print(
        f"captions equal: {torch.equal(captions['adapters'], captions['merged'])} (fresh LoRA: B = 0, so merging changes nothing yet)"
    )
    print("what a merge keeps of an adapter delta s*B*A, stored in the weight's dtype (one 2048x2048 weight):")
    weight = torch.randn(2048, 2048) * 0.02
    for ratio in (1e-1, 1e-2, 1e-3):
        delta = torch.randn(2048, 2048) * 0.02 * ratio
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            kept = (weight + delta).to(dt).float() - weight.to(dt).float()
            print(
                f"  |delta|/|W| = {ratio:g}, {name}: relative error of the merged delta {float((kept - delta).norm() / delta.norm()):.3f}"
            )


if __name__ == "__main__":
    main()
