"""EMA placement=cpu: exactness of the device-to-host update (GPU) and its cost (GPU or CPU).

    python3 launch/gpu/ema_cpu_check.py [--steps 50] [--json OUT.json]            # race check, CUDA
    python3 launch/gpu/ema_cpu_check.py --timing [--fraction 0.25] [--json OUT]    # cost, any device

Race check (CUDA): large bf16 parameters on the GPU are changed by kernels queued right before
each update (so a copy that the host reads too early sees the old values); the shadow is compared
after every update with the closed form computed from blocking copies. The CPU suite cannot show
this race.

--timing: the update with Sa2VA-4B's trainable tensor shapes (built on `meta`: LoRA r=128, mlp1,
text_hidden_fcs, the SAM2 decoder; 261 M elements, a 1.04 GB fp32 shadow) in bf16 on --device,
timed: the update before the host threads (fp32 copies, one `_foreach_lerp_`, one torch thread:
what `accelerate launch` gives each process), the memory floor (one fp32 read + write of the
shadow: no update can touch the shadow for less), `EMATeacher.update` with one host thread and
with the default host threads, and the step's EMA work (update + the log's distance) with the
distance as a second pass (before) and fused into the update (now). --fraction keeps that share of the tensors (every
k-th, in order) so the timing fits a small machine; the full-size figure is scaled by elements
(the update is a memory-bound stream: time is linear in bytes). Step fractions are against
--step-s (default 1.855 s: the Sa2VA-4B step at batch 2, 64-token captions, H200, issue 28).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from pg_train.bench.ema import timed
from pg_train.ema import EMATeacher, default_host_threads, host_lerp_

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from pg_vs_supervised import stamp  # noqa: E402  (commit, date, versions, device, load)


def race_check(args) -> dict:
    student = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(args.numel, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    )
    ema = EMATeacher(student, decay=0.5, placement="cpu")
    expected = [s.clone() for s in ema.shadow]
    worst = 0.0
    for step in range(args.steps):
        with torch.no_grad():
            for i, p in enumerate(student):
                p.add_(float(step + i + 1)).mul_(1.0001)  # long kernels queued just before the copy
        ema.update(student)
        for e, p in zip(expected, student):
            e.lerp_(p.detach().float().cpu(), 0.5)  # blocking copy: the reference
        worst = max(worst, max(float((s - e).abs().max()) for s, e in zip(ema.shadow, expected)))
    return {"steps": args.steps, "numel_per_param": args.numel, "max_abs_diff": worst, "exact": worst == 0.0}


def trainable_shapes(preset: str) -> list[torch.Size]:
    from pg_train.model import build_model

    return [p.shape for p in build_model(preset, device="meta").parameters() if p.requires_grad]


def timing(args) -> dict:
    shapes = trainable_shapes(args.preset)
    every = max(1, round(1 / args.fraction))
    kept = shapes[::every]
    full, sliced = sum(s.numel() for s in shapes), sum(s.numel() for s in kept)
    device = torch.device(args.device)
    torch.manual_seed(0)
    student = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16, device=device)) for s in kept]
    )
    torch.set_num_threads(1)  # accelerate launch's default per process (make train states it)
    threads = args.host_threads or default_host_threads()
    before = EMATeacher(student, decay=0.999, placement="cpu", host_threads=1)
    shadow = before.shadow

    def update_before_threads():  # the update as it was: fp32 copies, one _foreach_lerp_
        current = [p.detach().to(device="cpu", dtype=torch.float32, non_blocking=True) for p in student]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        torch._foreach_lerp_(shadow, current, 0.001)

    def separate_distance():  # the step log's distance as a second pass (before it was fused)
        total = 0.0
        for p, s in zip(student, shadow):
            total += float((p.detach().to(s.device, torch.float32) - s).pow(2).sum())
        return math.sqrt(total)

    floor_copy = [s.clone() for s in shadow]
    variants = {
        "before (one _foreach_lerp_, 1 thread)": update_before_threads,
        "floor: one fp32 read+write of the shadow (copy_)": lambda: torch._foreach_copy_(floor_copy, shadow),
    }
    for n in sorted({1, threads}):
        ema = EMATeacher(student, decay=0.999, placement="cpu", host_threads=n)
        variants[f"EMATeacher.update, {n} host thread(s)"] = lambda ema=ema: ema.update(student)
        del ema
    # per step the loop updates and then logs the distance (pg_train.train): before vs now, 1 thread
    fused = EMATeacher(student, decay=0.999, placement="cpu", host_threads=1)
    variants["1 thread, step's EMA work before: update, then a distance pass"] = lambda: (
        host_lerp_(shadow, [p.detach() for p in student], 0.001, None),
        separate_distance(),
    )
    variants["1 thread, step's EMA work now: update (distance fused) + distance_to"] = lambda: (
        fused.update(student),
        fused.distance_to(student),
    )
    results = {}
    for name, fn in variants.items():
        seconds = timed(fn, args.repeats)  # median after a warm-up call
        scaled = seconds * full / sliced
        results[name] = {"slice_s": seconds, "full_size_s": scaled, "of_step": scaled / args.step_s}
        print(
            f"{name:45} slice {seconds * 1e3:8.1f} ms   full size {scaled * 1e3:8.1f} ms   {scaled / args.step_s:6.1%} of a {args.step_s} s step"
        )
    return {
        "device": str(device),
        "preset": args.preset,
        "tensors": len(kept),
        "tensors_full": len(shapes),
        "elements": sliced,
        "elements_full": full,
        "fraction": sliced / full,
        "host_threads": threads,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "step_s": args.step_s,
        "results": results,
    }


def stamp_for(device: str) -> dict:
    """scripts/pg_vs_supervised.py's stamp (commit, date, versions, load), naming the GPU when
    the timing ran on one."""
    record = stamp()
    if device.startswith("cuda"):
        record["device"] = torch.cuda.get_device_name()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="race check: elements per parameter (64 Mi)")
    parser.add_argument("--timing", action="store_true", help="time the update at Sa2VA-4B's sizes instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="sa2va-4b", help="--timing: whose trainable tensor shapes (meta)")
    parser.add_argument("--fraction", type=float, default=1.0, help="--timing: share of the tensors kept")
    parser.add_argument("--host-threads", type=int, help="--timing: default: pg_train.ema.default_host_threads()")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-s", type=float, default=1.855)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.timing:
        report = timing(args)
        ok = True
    else:
        if not torch.cuda.is_available():
            print("the race check needs a CUDA device (--timing runs anywhere)")
            return 2
        report = race_check(args)
        ok = report["exact"]
    report = {"command": " ".join([sys.executable, *sys.argv]), **report, **stamp_for(args.device)}
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
