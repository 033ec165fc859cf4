"""EMA teacher costs: update and swap time vs a teacher generation (tiny, this machine), and the
bytes each placement holds for Sa2VA-4B (meta) next to the seed's full bf16 copy.

    python -m pg_train.bench.ema [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pg_train.ema import EMATeacher
from pg_train.model import build_model
from pg_train.model.text.regions import region_cells
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--caption-len", type=int, default=64)
    args = parser.parse_args(argv)

    student = build_model("tiny", seed=0)
    B = args.batch
    pixel_values = torch.randn(B, 3, 448, 448)
    masks = torch.zeros(B, 448, 448)
    masks[:, 100:300, 120:260] = 1
    cells, _ = region_cells(masks, student.grid_size)
    cfg = PseudoGumbelConfig(max_caption_len=args.caption_len, min_caption_len=args.caption_len)
    print(
        f"tiny preset on {torch.get_num_threads()} CPU threads, batch {B}, {args.caption_len}-token captions; median of {args.repeats}"
    )
    print(f"{'placement':10} {'update ms':>10} {'swap in+out ms':>15} {'generation ms':>14} {'(update+swap)/gen':>18}")
    for placement in ("same", "cpu", "full:cpu"):
        ema = EMATeacher(student, placement=placement)
        update = timed(lambda: ema.update(student), args.repeats)

        def swap():
            with ema.as_teacher(student):
                pass

        swap_s = timed(swap, args.repeats) if placement != "full:cpu" else 0.0
        generation = timed(
            lambda: generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student),
            max(3, args.repeats // 4),
        )
        print(
            f"{placement:10} {update * 1e3:>10.3f} {swap_s * 1e3:>15.3f} {generation * 1e3:>14.1f} {(update + swap_s) / generation:>18.4f}"
        )

    real = build_model("sa2va-4b", device="meta")
    full_bf16 = sum(p.numel() for p in real.parameters()) * 2
    print(
        "\nSa2VA-4B (built on meta), bytes the EMA holds per device, LoRA r=128 + mlp1 + fcs + SAM2 decoder trainable:"
    )
    print(f"{'placement':12} {'device':8} {'GiB':>7} {'vs full bf16 copy':>18}")
    print(f"{'seed: copy':12} {'cuda:0':8} {full_bf16 / 2**30:>7.2f} {1.0:>17.2f}x")
    for placement in ("same", "cpu", "full:cuda:1"):
        for device, nbytes in EMATeacher.predicted_bytes(real, placement).items():
            print(f"{placement:12} {device:8} {nbytes / 2**30:>7.2f} {nbytes / full_bf16:>17.3f}x")


if __name__ == "__main__":
    main()
