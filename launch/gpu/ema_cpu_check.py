"""GPU check: the EMA with placement=cpu follows the student exactly (no stale device-to-host copy).

    python3 launch/gpu/ema_cpu_check.py [--steps 50] [--json OUT.json]

Large bf16 parameters on the GPU are changed by kernels queued right before each update (so a
copy that the host reads too early sees the old values); the shadow is compared after every
update with the closed form computed from blocking copies. The CPU suite cannot show this race.
"""

import argparse
import json
import sys

import torch

from pg_train.ema import EMATeacher


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--numel", type=int, default=64 * 2**20, help="elements per parameter (default 64 Mi)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
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
    report = {
        "steps": args.steps,
        "numel_per_param": args.numel,
        "max_abs_diff": worst,
        "exact": worst == 0.0,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
