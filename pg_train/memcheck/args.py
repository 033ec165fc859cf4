"""`python -m pg_train.memcheck`: predicted budget vs measured reality, and the audits of the real step.

With no arguments: the Sa2VA-4B prediction for the documented default deployment (8 GPUs,
ZeRO-2, bf16, batch 1 per GPU, 64-token captions, EMA `same`) beside the design note's table and
two rules of thumb, then a measured audit of the tiny preset on this machine's device. With
`--config`, the steps that configuration trains (memcheck.steps: a curriculum's supervised warm-up
and its two-stream step, ...), each predicted and measured; the budget is the largest.

JSON (`--json PATH`): {"reference": prediction (its "steps": phases per kind of step, "peak_step"),
"measured_config": {"prediction", "steps": [{step, comparison, phases, losses, predicted_peak,
measured_peak}], "peak_step": {predicted, measured}, "comparison": [{component, predicted,
measured, error}] (every step's; named `component [step]` when there are several), "phases" (the
last step's)}, "audits": [{name, passed, evidence}], "exit_code"}; bytes everywhere.
"""

from __future__ import annotations

import argparse

from .bugs import BUGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, parsed without torch (this module imports only argparse and memcheck.bugs):
    `--help` and usage errors answer in a fraction of a second instead of ~5 s of imports."""
    parser = argparse.ArgumentParser(
        prog="python -m pg_train.memcheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="training YAML (preset, batch, caption length, EMA, LoRA, optimizer, ...)",
    )
    parser.add_argument("--preset", help="model preset to predict (default sa2va-4b) and measure (default tiny)")
    parser.add_argument("--world-size", type=int, default=8, help="processes for the prediction (default 8)")
    parser.add_argument(
        "--zero-stage", type=int, default=2, choices=(0, 2), help="DeepSpeed ZeRO stage of the prediction (0 = none)"
    )
    parser.add_argument("--offload", action="store_true", help="predict ZeRO-2 with the optimizer state in host memory")
    parser.add_argument("--ema-placement", help="same | cpu | full:<device>")
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--caption-len", type=int)
    parser.add_argument(
        "--image-size",
        default="1024x1024",
        help="input images WIDTHxHEIGHT: how many views a tiling preset cuts "
        "them into (Sa2VA-4B: 1024x1024 -> 9 tiles + thumbnail = 2,560 image tokens; default 1024x1024)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (the last is reported)")
    parser.add_argument("--no-measure", action="store_true", help="prediction only")
    parser.add_argument(
        "--measure-preset", help="preset of the measured run (default: tiny on CPU, the predicted preset on CUDA)"
    )
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="relative error allowed per static component (default 0.05)"
    )
    parser.add_argument(
        "--peak-tolerance",
        type=float,
        default=0.5,
        help="relative error allowed for the peak / saved activations (default 0.5)",
    )
    parser.add_argument(
        "--rss-tolerance",
        type=float,
        default=1.0,
        help="CPU: relative error allowed for the first step's RSS growth (default 1.0)",
    )
    parser.add_argument(
        "--inject",
        action="append",
        default=[],
        choices=BUGS,
        help="reproduce a suspected bug in the measured run (self-test)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="measure through Accelerate/DeepSpeed (run under `accelerate launch ... -m pg_train.memcheck`): "
        "ZeRO partitions are measured and audited per rank",
    )
    return parser.parse_args(argv)
