"""Profile one warm Pseudo-Gumbel step of ours and of the design note's literal step on a GPU
(torch.profiler, CUDA time per op) to explain where the step's time goes.

    python launch/gpu/profile_step.py OUT_DIR [--batch 8] [--preset sa2va-4b]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pg_train.accel import build_accelerator
from pg_train.bench.seed_step import full_copy_ema_update, seed_literal_step
from pg_train.bench.step import make_batches
from pg_train.ema import EMATeacher
from pg_train.model import build_offline
from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.window import NonFiniteGuard, optimizer_window


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="sa2va-4b")
    args = parser.parse_args()
    out = Path(args.out)
    device = torch.device("cuda")
    cfg = PseudoGumbelConfig(max_caption_len=16, min_caption_len=16, topk=128)
    for variant in ("ours", "seed"):
        model = build_offline(args.preset, device="cuda", dtype=torch.bfloat16, seed=0)
        batches = make_batches(model, args.batch, 2, device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        teacher = EMATeacher(model, 0.999) if variant == "ours" else copy.deepcopy(model).eval().requires_grad_(False)
        accelerator = build_accelerator(micro_batch_size=args.batch)
        for i, batch in enumerate(batches):
            ctx = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if i == 1 else None
            if ctx:
                ctx.__enter__()
            if variant == "ours":  # the optimizer step training runs, each stage a profiler range
                optimizer_window(
                    iter([batch]),
                    lambda b, observer, m=model, t=teacher: pseudo_gumbel_step(m, t, b, cfg, observer=observer),
                    model=model,
                    optimizer=optimizer,
                    ema=teacher,
                    accelerator=accelerator,
                    grad_accum=1,
                    grad_clip=1.0,
                    guard=NonFiniteGuard(limit=2),
                    step=i,
                    observer=record_function,
                )
            else:
                with record_function("teacher+forward"):
                    loss = seed_literal_step(model, teacher, batch, cfg)["loss"]
                with record_function("backward"):
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                full_copy_ema_update(teacher, model, 0.999)
            torch.cuda.synchronize()
            if ctx:
                ctx.__exit__(None, None, None)
                table = ctx.key_averages().table(sort_by="cuda_time_total", row_limit=30)
                (out / f"profile_{variant}.txt").write_text(table)
                print(f"== {variant}\n{table}", flush=True)
        del model, teacher, optimizer, batches
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
