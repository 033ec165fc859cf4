"""Measure README's "Use your model" on a finished run: export it, evaluate the export, predict.

    python scripts/use_your_model.py RUN_DIR [--work DIR] [--json docs/measurements/cpu_use_your_model.json]
                                     [--pictures docs/]

Runs the user's commands as subprocesses (what a user waits for, interpreter start included):
`python -m pg_train.export RUN_DIR` (EMA and student, bf16), `python -m pg_train.evaluate` on
each export (the run's own held-out set, eval_samples and batch size: the export carries the
run's config), and `python -m pg_train.predict` on 16 held-out synthetic scenes written as
PNG files (a manifest: 8 with their description as text, 8 with their object's mask as region).
Wall and CPU seconds per command, the held-out numbers, commit, date, versions and device go to
the JSON; with --pictures the first text and region overlays are copied there.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from pg_vs_supervised import stamp  # commit, date, versions, device, load (scripts/ is on sys.path)
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def timed(*args: str) -> dict:
    """Run `python -m ARGS` in the repository; wall and CPU seconds (the child's user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": "python -m " + " ".join(args), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def scenes(run: Path, folder: Path, count: int, seed: int) -> Path:
    """`count` synthetic scenes drawn like the run's training scenes (another seed) as PNG files
    and a predict manifest: the first half queried by their description, the rest by their mask."""
    import dataclasses

    from pg_train.config import load_config
    from pg_train.data import build_source

    cfg = load_config([run / "config.yaml"], ["resume=null"])
    source = build_source(dataclasses.replace(cfg.data, num_samples=count, sample_offset=0), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        raw = source.load(i)
        raw.image2.save(folder / f"scene{i:02d}.png")
        Image.fromarray(raw.mask2.astype(np.uint8) * 255).save(folder / f"scene{i:02d}_mask.png")
        query = {"text": raw.caption} if i < count // 2 else {"region": f"scene{i:02d}_mask.png"}
        lines.append(json.dumps({"image": f"scene{i:02d}.png", **query}))
    manifest = folder / "inputs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--work", default="use_your_model", help="where exports, evaluations and predictions go")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--pictures", help="copy the first --text and --region overlays into this folder")
    args = parser.parse_args(argv)
    run, work = Path(args.run_dir).resolve(), Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    report: dict = {"run": str(run), "commands": {}, "held_out": {}}
    for weights in ("ema", "student"):
        report["commands"][f"export_{weights}"] = timed(
            "pg_train.export", str(run), str(work / weights), "--weights", weights
        )
        report["commands"][f"evaluate_{weights}"] = timed(
            "pg_train.evaluate", "--checkpoint", str(work / weights), "--output", str(work / f"eval_{weights}")
        )
        numbers = json.loads((work / f"eval_{weights}" / "eval.json").read_text())
        report["held_out"][weights] = {k: numbers[k]["gIoU"] for k in ("referring", "cycle", "shuffled", "empty")}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if "eval/cycle_gIoU" in r][-1]
    report["held_out"]["in_training_last"] = {
        "step": last["step"],
        **{k: last[f"eval/{k}_gIoU"] for k in ("referring", "cycle", "shuffled", "empty")},
    }
    manifest = scenes(run, work / "images", 16, seed=config["seed"] + 20_000)
    report["commands"]["predict_16_images"] = timed(
        "pg_train.predict", str(work / "ema"), "--manifest", str(manifest), "--out", str(work / "predictions")
    )
    records = [json.loads(line) for line in (work / "predictions" / "predictions.jsonl").read_text().splitlines()]
    report["predictions"] = records
    report.update(stamp())
    print(json.dumps({k: v for k, v in report.items() if k != "predictions"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.pictures:
        Path(args.pictures).mkdir(parents=True, exist_ok=True)
        first_text = next(r for r in records if "text" in r)
        first_region = next(r for r in records if "region" in r)
        shutil.copy(work / "predictions" / first_text["overlay"], Path(args.pictures) / "predict_text.png")
        shutil.copy(work / "predictions" / first_region["overlay"], Path(args.pictures) / "predict_region.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
