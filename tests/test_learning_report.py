"""scripts/learning_report.py: the ablation table and the curves PNG from metrics.jsonl files."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_run(directory: Path, evals: list[tuple[int, float, float]]) -> None:
    directory.mkdir(parents=True)
    lines = [{"step": s, "loss": 1.0} for s, _, _ in evals]  # training lines without eval are skipped
    lines += [
        {"step": s, "eval/cycle_gIoU": c, "eval/shuffled_gIoU": sh, "eval/referring_gIoU": c + 0.01}
        for s, c, sh in evals
    ]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_learning_report_table_and_png(tmp_path):
    write_run(tmp_path / "a", [(0, 0.08, 0.08), (100, 0.5, 0.3)])
    write_run(tmp_path / "b", [(0, 0.5, 0.3), (50, 0.7, 0.25)])
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "learning_report.py"),
            "--out",
            str(tmp_path / "docs"),
            f"warm={tmp_path / 'a'}",
            f"+pg={tmp_path / 'b'}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| warm | 100 | 0.500 | 0.300 | +0.200 | 0.510 | 0.080 |" in out
    assert "| pg | 50 | 0.700 | 0.250 | +0.450 | 0.710 | 0.500 |" in out
    with Image.open(tmp_path / "docs" / "curves.png") as image:
        assert image.size == (900, 520)
        assert len(set(image.getdata())) > 3  # curves were drawn, not an empty canvas
