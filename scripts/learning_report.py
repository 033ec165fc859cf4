"""Table and plot of held-out evaluation curves from training runs (metrics.jsonl).

    python scripts/learning_report.py --out docs/learning NAME=RUN_DIR [NAME=RUN_DIR ...]

For each run: the eval/* gIoU at its first and last evaluation (cycle, shuffled, referring) as a
markdown table, and a PNG of cycle (solid) and shuffled-control (dashed) gIoU against the step.
A run whose name starts with "+" continues the first run (a stage 2 started from its final
checkpoint): its steps are drawn after the first run's last step.
Drawn with PIL (no plotting library is a dependency of pg_train).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def evaluations(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the recipe first)")
    return [r for r in map(json.loads, path.read_text().splitlines()) if "eval/cycle_gIoU" in r]


def draw(curves: dict[str, list[tuple[int, float, float]]], path: Path, size=(900, 520), margin=60) -> None:
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    max_step = max(s for c in curves.values() for s, _, _ in c) or 1
    w, h = size[0] - 2 * margin, size[1] - 2 * margin

    def xy(step, value):
        return margin + w * step / max_step, margin + h * (1 - value)

    d.rectangle([margin, margin, margin + w, margin + h], outline="black")
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        d.line([xy(0, v), xy(max_step, v)], fill=(225, 225, 225))
        d.text((margin - 30, xy(0, v)[1] - 6), f"{v:.1f}", fill="black")
    for s in range(0, max_step + 1, max(1, max_step // 8 // 100 * 100 or 1)):
        d.text((xy(s, 0)[0] - 10, margin + h + 6), str(s), fill="black")
    d.text((margin, 20), "held-out gIoU: cycle (solid) vs shuffled-caption control (dashed)", fill="black")
    d.text((margin + w // 2 - 20, size[1] - 25), "step", fill="black")
    for i, (name, points) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        cycle = [xy(s, c) for s, c, _ in points]
        shuffled = [xy(s, sh) for s, _, sh in points]
        if len(cycle) > 1:
            d.line(cycle, fill=colour, width=3)
            for a, b in zip(shuffled[:-1], shuffled[1:]):  # dashed
                for t in range(0, 10, 2):
                    d.line(
                        [
                            (a[0] + (b[0] - a[0]) * t / 10, a[1] + (b[1] - a[1]) * t / 10),
                            (a[0] + (b[0] - a[0]) * (t + 1) / 10, a[1] + (b[1] - a[1]) * (t + 1) / 10),
                        ],
                        fill=colour,
                        width=2,
                    )
        d.text((margin + w - 230, margin + 10 + 16 * i), f"-- {name}", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=RUN_DIR; NAME starting with + continues the first run's steps")
    parser.add_argument("--out", default="docs/learning")
    args = parser.parse_args(argv)
    curves, base_end = {}, None
    print("| run | steps | cycle gIoU | shuffled gIoU | cycle − shuffled | referring gIoU | cycle at its start |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.runs:
        name, _, run = spec.partition("=")
        evals = evaluations(Path(run))
        offset = base_end if name.startswith("+") and base_end is not None else 0
        points = [(offset + r["step"], r["eval/cycle_gIoU"], r["eval/shuffled_gIoU"]) for r in evals]
        curves[name.lstrip("+")] = points
        base_end = points[-1][0] if base_end is None else base_end
        first, last = evals[0], evals[-1]
        print(
            f"| {name.lstrip('+')} | {last['step']} | {last['eval/cycle_gIoU']:.3f} | {last['eval/shuffled_gIoU']:.3f} | "
            f"{last['eval/cycle_gIoU'] - last['eval/shuffled_gIoU']:+.3f} | {last['eval/referring_gIoU']:.3f} | {first['eval/cycle_gIoU']:.3f} |"
        )
    out = Path(args.out)
    draw(curves, out / "curves.png")
    print(f"\nwrote {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
