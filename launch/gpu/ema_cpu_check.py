"""EMA placement=cpu: exactness of the device-to-host update (GPU) and its cost (GPU or CPU).

    python3 launch/gpu/ema_cpu_check.py [--steps 50] [--json OUT.json]            # race check, CUDA
    python3 launch/gpu/ema_cpu_check.py --timing [--fraction 0.25] [--json OUT]    # cost, any device

Race check (CUDA): large bf16 parameters on the GPU are changed by kernels queued right before
each update (so a copy that the host reads too early sees the old values); the shadow is compared
after every update with the closed form computed from blocking copies; then the teacher swap
(`as_teacher`, its backup from the staging or copied out again when the student changed) must give
exactly the reference's bf16 rounding and restore the student bitwise. The CPU suite cannot show
these races.

--timing: the step's EMA work with Sa2VA-4B's trainable tensor shapes (built on `meta`: LoRA
r=128, mlp1, text_hidden_fcs, the SAM2 decoder; 261 M elements, a 1.04 GB fp32 shadow) in bf16 on
--device, the default host threads, one torch thread (what `accelerate launch` gives each
process), side by side in one run: the memory floor (one fp32 read + write of the shadow: no
every-step update can touch the shadow for less); before (the update with the distance fused,
then `as_teacher` as it was: buffers allocated per call, the fp32 shadow converted on the fly);
and for each --stages k (`ema.update_stages`) the update + the step log's distance, the teacher
swap (`as_teacher` enter + exit) and their sum, per step (timed over k steps: every shard once).
The variants are timed in interleaved rounds (`run_interleaved`), the median of --repeats.
Each step first moves the student's version counters, as the optimizer would, so no staged copy
is reused that a real step would have invalidated. With the student on the CPU (this machine)
the swap's copies are host memcpys; from a CUDA student they are DMA transfers (the update
stages the student, so at k=1 the swap only moves the bf16 mirror in and the student back).
--fraction keeps that share of the tensors (every k-th, in order) so the timing fits a small
machine; the full-size figure is scaled by elements (memory-bound streams: time is linear in
bytes). Step fractions are against --step-s (default 1.855 s: the Sa2VA-4B step at batch 2,
64-token captions, H200, issue 28).
"""

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pg_train.ema import EMATeacher, default_host_threads, host_lerp_

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from pg_vs_supervised import stamp  # noqa: E402  (commit, date, versions, device, load)


def race_check(args) -> dict:
    student = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.zeros(args.numel, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    )
    ema = EMATeacher(student, decay=0.5, placement="cpu")
    expected = [s.clone() for s in ema.shadow]
    worst, swap_worst, restored = 0.0, 0.0, True
    for step in range(args.steps):
        with torch.no_grad():
            for i, p in enumerate(student):
                p.add_(float(step + i + 1)).mul_(1.0001)  # long kernels queued just before the copy
        ema.update(student)
        for e, p in zip(expected, student):
            e.lerp_(p.detach().float().cpu(), 0.5)  # blocking copy: the reference
        worst = max(worst, max(float((s - e).abs().max()) for s, e in zip(ema.shadow, expected)))
        if step % 2:  # odd steps: the student changes after the update, so the swap copies it out again
            with torch.no_grad():
                for p in student:
                    p.mul_(1.0001)
        before = [p.detach().clone() for p in student]
        with ema.as_teacher(student):  # the teacher: exactly the reference shadow's rounding (compared on device)
            swap_worst = max(
                swap_worst,
                max(
                    float((p.detach().float() - e.to(p.device).to(p.dtype).float()).abs().max())
                    for p, e in zip(student, expected)
                ),
            )
        restored = restored and all(torch.equal(p.detach(), b) for p, b in zip(student, before))
    return {
        "steps": args.steps,
        "numel_per_param": args.numel,
        "max_abs_diff": worst,
        "swap_max_abs_diff": swap_worst,
        "student_restored": restored,
        "exact": worst == 0.0 and swap_worst == 0.0 and restored,
    }


def trainable_shapes(preset: str) -> list[torch.Size]:
    from pg_train.model import build_model

    return [p.shape for p in build_model(preset, device="meta").parameters() if p.requires_grad]


def as_teacher_before(shadow: list[torch.Tensor], student) -> None:
    """`EMATeacher.as_teacher` enter + exit as it was before the staging/mirror reuse: backup
    buffers allocated (pinned where CUDA exists) on every call, the fp32 shadow converted to the
    student's dtype on the student's device (fp32 over PCIe), the student restored."""
    params = list(student)
    pin = torch.cuda.is_available()
    with torch.no_grad():
        backup = [torch.empty(p.shape, dtype=p.dtype) for p in params]
        backup = [b.pin_memory() for b in backup] if pin else backup
        for b, p in zip(backup, params):
            b.copy_(p.detach(), non_blocking=True)
        for p, s in zip(params, shadow):
            p.copy_(s.to(p.device, non_blocking=True).to(p.dtype))
        for p, b in zip(params, backup):
            p.copy_(b.to(p.device, non_blocking=True))
    if params[0].is_cuda:
        torch.cuda.current_stream(params[0].device).synchronize()


def optimizer_step_marker(student) -> None:
    """What the step's optimizer does to the EMA's view of the student, at no cost: every
    tensor's version moves (a one-element in-place op on a view bumps the shared counter), so
    no variant may reuse a staged copy of the student that a real step would have invalidated."""
    with torch.no_grad():
        for p in student:
            p.view(-1)[:1].mul_(1.0)


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
    before = EMATeacher(student, decay=0.999, placement="cpu", host_threads=threads)
    workers = threads // torch.get_num_threads()  # the pool EMATeacher builds for itself
    shadow, pool = before.shadow, ThreadPoolExecutor(workers) if workers > 1 else None

    def update_before():  # the update as it was: chunked lerp + fused distance, no mirror
        current = [p.detach().to("cpu", non_blocking=True) for p in student]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        host_lerp_(shadow, current, 0.001, pool, distance=True)

    def step_before():
        optimizer_step_marker(student)
        update_before()
        as_teacher_before(shadow, student)

    floor_copy = [s.clone() for s in shadow]
    variants = {  # name: (one call, steps it runs)
        "floor: one fp32 read+write of the shadow (copy_)": (lambda: torch._foreach_copy_(floor_copy, shadow), 1),
        "before: update (distance fused)": (update_before, 1),
        "before: as_teacher enter+exit (allocating, fp32 converted)": (lambda: as_teacher_before(shadow, student), 1),
        "before: step's EMA work (update + as_teacher)": (step_before, 1),
    }
    for k in args.stages:
        ema = EMATeacher(student, decay=0.999, placement="cpu", host_threads=threads, update_stages=k)

        def cycle(ema=ema, k=k, teacher=True, update=True):  # k consecutive steps: every shard once
            for _ in range(k):
                optimizer_step_marker(student)
                if update:
                    ema.update(student)
                    ema.log_distance(student)
                if teacher:
                    with ema.as_teacher(student):
                        pass

        variants[f"k={k}: update + log distance"] = (lambda cycle=cycle: cycle(teacher=False), k)
        variants[f"k={k}: as_teacher enter+exit"] = (lambda cycle=cycle: cycle(update=False), k)
        variants[f"k={k}: step's EMA work (update + log distance + as_teacher)"] = (cycle, k)
    results = run_interleaved(variants, args, full / sliced)
    share = {k: results[f"k={k}: step's EMA work (update + log distance + as_teacher)"]["of_step"] for k in args.stages}
    print("step's EMA work, share of a", args.step_s, "s step:", ", ".join(f"k={k} {v:.1%}" for k, v in share.items()))
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
        "step_share_by_update_stages": share,
    }


def run_interleaved(variants: dict, args, scale: float) -> dict:
    """Seconds per step of each variant: a warm-up call each, then --repeats rounds that call every
    variant once in turn (a load that drifts during the run hits all of them alike, and each call
    starts with the others' bytes in cache, as the step's own work leaves it), the median per
    step; scaled to full size by elements (memory-bound streams: time is linear in bytes)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for fn, _ in variants.values():
        fn()
    for _ in range(args.repeats):
        for name, (fn, steps) in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) / steps)
    results = {}
    for name, values in samples.items():
        seconds = statistics.median(values)
        scaled = seconds * scale
        results[name] = {"slice_s": seconds, "full_size_s": scaled, "of_step": scaled / args.step_s}
        print(
            f"{name:62} slice {seconds * 1e3:8.1f} ms   full size {scaled * 1e3:8.1f} ms   {scaled / args.step_s:6.1%} of a {args.step_s} s step"
        )
    return results


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
    parser.add_argument(
        "--stages", type=int, nargs="+", default=[1, 2, 4], help="--timing: the ema.update_stages values timed"
    )
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
