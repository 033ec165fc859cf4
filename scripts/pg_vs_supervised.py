"""Does Pseudo-Gumbel add anything? (issue 20) A warm-up on few labelled pairs, then three arms.

For each seed:
  warm-up   supervised, from random weights, on the labelled scenes [0, L) of the seed
  (a) pg    Pseudo-Gumbel from the warm-up on the unlabelled scenes [L, N) (no ground-truth text)
  (b) sup   supervised from the warm-up on the same labelled scenes [0, L), same steps and schedule
  (c) none  the warm-up itself
Every arm's final checkpoint is scored on one fixed held-out set (synthetic scenes of
--eval-seed, drawn like the training data; the same scenes for every arm and seed) with
pg_train.evaluate: referring gIoU (ground-truth text), cycle gIoU (the model's own caption of
region 1 segments image 2) and the shuffled / empty caption controls.

    .venv/bin/python scripts/pg_vs_supervised.py                 # 3 seeds, the configs/quick_* recipe
    .venv/bin/python scripts/pg_vs_supervised.py --seeds 0 --warmup-steps 200 --steps 50   # smoke

Runs go through launch/train.py subprocesses, one at a time, with OMP_NUM_THREADS=--threads
(default 1: on a shared 2-core machine a second thread is no faster and stalls under load).
Prints a markdown table and writes --json (commit, date, versions, device, per-seed numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ("pg", "sup", "none")
ARM_NAMES = {
    "pg": "(a) warm-up + Pseudo-Gumbel on the unlabelled scenes",
    "sup": "(b) warm-up + supervised on the same labelled scenes",
    "none": "(c) warm-up only",
}
KINDS = ("referring", "cycle", "shuffled", "empty")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--scenes", type=int, default=1000, help="N: labelled + unlabelled scenes per seed")
    p.add_argument("--labelled", type=float, default=0.1, help="fraction of the N scenes that are labelled")
    p.add_argument("--warmup-config", default="configs/quick_warmup.yaml")
    p.add_argument("--pg-config", default="configs/quick_pg.yaml")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: the warm-up config's max_steps")
    p.add_argument("--steps", type=int, default=None, help="steps of arms (a) and (b); default: the PG config's")
    p.add_argument("--eval-samples", type=int, default=96)
    p.add_argument("--eval-seed", type=int, default=20_000, help="held-out scenes' seed (one set for all runs)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every training run")
    p.add_argument(
        "--cont-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for arms (a) and (b), e.g. optim.lr=3e-4",
    )
    p.add_argument("--pg-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for arm (a) only")
    p.add_argument(
        "--pg-tag", default="", help="suffix of arm (a)'s run directories: a variant of (a) next to reused (b), (c)"
    )
    p.add_argument("--out", default="/tmp/pg_vs_supervised", help="run directories")
    p.add_argument("--json", default="docs/measurements/pg_vs_supervised.json")
    p.add_argument(
        "--reuse", action="store_true", help="keep finished runs (a final checkpoint) instead of redoing them"
    )
    return p.parse_args(argv)


def final_checkpoint(run: Path, steps: int) -> Path:
    return run / "checkpoints" / f"step-{steps:08d}"


def train(run: Path, config: str, overrides: list[str], steps: int, args) -> tuple[Path, float]:
    """One launch/train.py run; (its final checkpoint, wall seconds)."""
    checkpoint = final_checkpoint(run, steps)
    if args.reuse and checkpoint.is_dir():
        return checkpoint, 0.0
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / config)]
    cmd += [*overrides, f"max_steps={steps}", f"save_every={steps}", "eval_every=0", "keep_last=1"]
    cmd += [f"output_dir={run}", "progress=false", "resume=null"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"[pg_vs_supervised] {run.name}: {' '.join(cmd[2:])}", flush=True)
    started = time.perf_counter()
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
    log = run.parent / f"{run.name}.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not checkpoint.is_dir():
        sys.exit(f"[pg_vs_supervised] {run.name} failed (exit {result.returncode}); see {log}")
    return checkpoint, time.perf_counter() - started


def evaluate(checkpoint: Path, args) -> dict[str, float]:
    """gIoU / cIoU per kind on the fixed held-out set (sample_offset 0, --eval-seed)."""
    import torch

    from pg_train.evaluate import evaluate as run_evaluation
    from pg_train.evaluate import heldout_batches, load_for_evaluation

    torch.manual_seed(0)
    model, cfg, objective = load_for_evaluation(checkpoint, "cpu")
    data = dataclasses.replace(cfg.data, sample_offset=0)
    batches = heldout_batches(model, args.eval_samples, 8, seed=args.eval_seed, device="cpu", data=data)
    numbers = run_evaluation(model, batches, objective)
    out = {f"{k}_{m}": numbers[k][m] for k in KINDS for m in ("gIoU", "cIoU")}
    out["caption_distinct_token_fraction"] = numbers["captions"]["distinct_token_fraction"]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict, seeds: list[int]) -> str:
    lines = [
        "| arm | cycle gIoU | referring gIoU | shuffled gIoU | cycle − shuffled | per-seed cycle | per-seed referring |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        rows = [results[s][arm] for s in seeds]
        cells = []
        for key in ("cycle_gIoU", "referring_gIoU", "shuffled_gIoU"):
            m, sd = mean_std([r[key] for r in rows])
            cells.append(f"{m:.3f} ± {sd:.3f}")
        m, sd = mean_std([r["cycle_gIoU"] - r["shuffled_gIoU"] for r in rows])
        cells.append(f"{m:+.3f} ± {sd:.3f}")
        cells.append(" / ".join(f"{r['cycle_gIoU']:.3f}" for r in rows))
        cells.append(" / ".join(f"{r['referring_gIoU']:.3f}" for r in rows))
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stamp() -> dict:
    import torch

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "load_average_at_end": os.getloadavg(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pg_train.config import load_config

    warm_cfg = load_config([ROOT / args.warmup_config], args.set)
    pg_cfg = load_config([ROOT / args.pg_config], [*args.set, *args.cont_set])
    warmup_steps = args.warmup_steps or warm_cfg.max_steps
    steps = args.steps or pg_cfg.max_steps
    labelled = max(1, round(args.scenes * args.labelled))
    unlabelled = args.scenes - labelled
    # arm (b) follows arm (a)'s schedule (learning rate, warm-up, decay) on the labelled data
    schedule = [f"optim.{k}={getattr(pg_cfg.optim, k)}" for k in ("lr", "warmup_steps", "min_lr_ratio")]
    out = Path(args.out)
    results, walls = {}, {}
    started = time.perf_counter()
    for seed in args.seeds:
        base = [*args.set, f"seed={seed}"]
        warm, walls[(seed, "warmup")] = train(
            out / f"s{seed}_warmup",
            args.warmup_config,
            [*base, f"data.num_samples={labelled}", "data.sample_offset=0"],
            warmup_steps,
            args,
        )
        init = [f"model.init_from={warm}", *args.cont_set]
        pg, walls[(seed, "pg")] = train(
            out / f"s{seed}_pg{args.pg_tag}",
            args.pg_config,
            [*base, *init, f"data.num_samples={unlabelled}", f"data.sample_offset={labelled}", *args.pg_set],
            steps,
            args,
        )
        sup, walls[(seed, "sup")] = train(
            out / f"s{seed}_sup",
            args.warmup_config,
            [*base, *init, *schedule, f"data.num_samples={labelled}", "data.sample_offset=0"],
            steps,
            args,
        )
        results[seed] = {arm: evaluate(ckpt, args) for arm, ckpt in (("pg", pg), ("sup", sup), ("none", warm))}
        for arm in ARMS:
            r = results[seed][arm]
            print(
                f"[pg_vs_supervised] seed {seed} {arm}: cycle {r['cycle_gIoU']:.3f} referring {r['referring_gIoU']:.3f}"
                f" shuffled {r['shuffled_gIoU']:.3f} empty {r['empty_gIoU']:.3f}",
                flush=True,
            )
    text = table(results, args.seeds)
    print(text)
    record = {
        **stamp(),
        "command": "python scripts/pg_vs_supervised.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {
            "scenes": args.scenes,
            "labelled_scenes": f"[0, {labelled})",
            "unlabelled_scenes": f"[{labelled}, {args.scenes})",
            "warmup_config": args.warmup_config,
            "pg_config": args.pg_config,
            "warmup_steps": warmup_steps,
            "continuation_steps": steps,
            "overrides": args.set,
            "continuation_overrides": args.cont_set,
            "pg_overrides": args.pg_set,
            "pg_tag": args.pg_tag,
            "eval": {"samples": args.eval_samples, "seed": args.eval_seed, "sample_offset": 0},
            "threads": args.threads,
        },
        "results": {str(s): results[s] for s in args.seeds},
        "wall_s": {f"seed{s}_{stage}": round(w, 1) for (s, stage), w in walls.items()},
        "total_wall_s": round(time.perf_counter() - started, 1),
        "table_markdown": text,
    }
    path = ROOT / args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[pg_vs_supervised] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
