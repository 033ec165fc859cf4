"""Sa2VA-4B (real dimensions, random weights, bf16) Pseudo-Gumbel steps on one GPU, swept over
batch sizes with and without gradient checkpointing: time and allocator peak per stage.

The stages are memcheck's measured step (pg_train.memcheck.measure). The tokenizer is the tiny
offline one (no real tokenizer is available offline), so captions use its 480 ordinary ids while
every vocabulary-sized cost (lm_head rows, top-k over 151,679 logits) is the real one.

    python launch/gpu/real_step.py OUT.json [--batches 1,4,8] [--preset tiny]   # tiny: a CPU dry run
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from pg_train.ema import EMATeacher  # noqa: E402
from pg_train.memcheck.cli import build  # noqa: E402
from pg_train.memcheck.measure import build_batch, measure  # noqa: E402
from pg_train.model import component_parameter_counts, enable_gradient_checkpointing  # noqa: E402
from pg_train.objectives.settings import PseudoGumbelConfig  # noqa: E402

GiB = 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--preset", default="sa2va-4b")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    start = time.perf_counter()
    model = build(args.preset, None, str(device), torch.bfloat16).train()
    results = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "build_s": round(time.perf_counter() - start, 2),
        "params": component_parameter_counts(model),
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ema = EMATeacher(model, placement="same")
    cfg = PseudoGumbelConfig(max_caption_len=64, min_caption_len=64, topk=128)
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_gradient_checkpointing(model)
        for B in [int(b) for b in args.batches.split(",")]:
            report = {"batch": B, "gradient_checkpointing": checkpointing}
            try:
                meas = measure(model, optimizer, ema, cfg, build_batch(model, B, device), steps=2)
                report["phases"] = meas.phases
                report["step_s"] = round(sum(p["s"] for p in meas.phases.values()), 4)
                report["step_peak_gib"] = round(meas.peak_bytes / GiB, 3) if cuda else None
            except torch.cuda.OutOfMemoryError as err:
                report["oom"] = str(err)[:200]
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            runs.append(report)
            print(json.dumps({k: v for k, v in report.items() if k != "phases"}), flush=True)
    results["runs"] = runs
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
