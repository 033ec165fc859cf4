"""The command line a new user meets first (issue 29): `--help` without torch, any `--max-steps`
for every shipped config, resuming a finished run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from pg_train.cli import DEFAULT_JOB, main
from pg_train.config import load_config, supervised_steps

SHIPPED = [DEFAULT_JOB, *sorted((REPO / "configs").glob("*.yaml"))]

# What keeps a one-step run of a shipped config short here without changing what it exercises
# (its objective, model settings, evaluation at step 0 and at the end): small batches, short
# captions, two held-out scenes, no report.
TINY = ["batch_size=2", "objective.max_caption_len=6", "eval_samples=2", "report=false", "progress=false"]


def test_help_answers_without_importing_torch():
    """`pg-train --help` parses before anything heavy is imported (it took 5-9 s with torch first;
    docs/cli.md has the measured times)."""
    code = (
        "import sys\nfrom pg_train.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nprint('IMPORTED', sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-steps" in proc.stdout and "IMPORTED []" in proc.stdout


@pytest.mark.parametrize("max_steps, expected", [(1, 1), (2, 1), (3, 2), (4, 3), (900, 675)])
def test_the_default_curriculum_keeps_a_stage_of_each_kind_at_any_max_steps(max_steps, expected):
    """supervised_fraction 0.75 of max_steps, at least one supervised step and, from two steps on,
    at least one Pseudo-Gumbel step (round(0.75 x 2) = 2 used to leave none and refuse the run)."""
    cfg = load_config([DEFAULT_JOB], [f"max_steps={max_steps}"])
    assert supervised_steps(cfg) == expected


def test_an_explicit_supervised_stage_longer_than_the_run_makes_it_all_supervised():
    cfg = load_config([DEFAULT_JOB], ["max_steps=2", "curriculum.supervised_steps=675"])
    assert supervised_steps(cfg) == 2


@pytest.mark.parametrize("max_steps", [1, 2])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_accepts_a_small_max_steps(path, max_steps):
    assert load_config([path], [f"max_steps={max_steps}"]).max_steps == max_steps


def run_config(path: Path, steps: int, out: Path, *overrides: str) -> list[dict]:
    """`pg-train --config PATH --max-steps STEPS` with TINY (in this process: the imports once);
    its metrics.jsonl lines, after checking the steps, the checkpoint and the summary."""
    args = ["--config", str(path), "--max-steps", str(steps), "--output-dir", str(out), *TINY, *overrides]
    assert main(args) == 0, path.name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, steps + 1)), path.name
    assert (out / "checkpoints" / f"step-{steps:08d}").is_dir(), path.name
    return lines


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory) -> Path:
    """A one-step warm-up checkpoint for the Pseudo-Gumbel stages' `model.init_from` (both
    recipes' stages share the warm-ups' model settings: tiny-112, LoRA 32/64, trained encoders
    and vocabulary layers)."""
    out = tmp_path_factory.mktemp("warm")
    run_config(REPO / "configs" / "quick_warmup.yaml", 1, out, "eval_every=0")
    return out / "checkpoints" / "step-00000001"


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_trains_one_step(path, tmp_path, warm_start, capsys):
    """One optimizer step of each shipped config through the CLI. Overrides: TINY and no
    held-out evaluation (the default job's test below keeps it); configs/sa2va_4b_zero2.yaml on
    the tiny preset (Sa2VA-4B does not build on a CPU; the file's other settings, gradient
    checkpointing included, still apply); a Pseudo-Gumbel stage starts from a one-step warm-up's
    checkpoint instead of a finished warm-up's."""
    extra = {"sa2va_4b_zero2.yaml": ["model.preset=tiny"]}
    extra |= {name: [f"model.init_from={warm_start}"] for name in ("learn_tiny_pg.yaml", "quick_pg.yaml")}
    run_config(path, 1, tmp_path, "eval_every=0", *extra.get(path.name, []))
    assert "done: 1 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_the_default_job_trains_two_steps_one_of_each_stage_and_evaluates(tmp_path, capsys):
    lines = run_config(DEFAULT_JOB, 2, tmp_path)
    assert [r["objective"] for r in lines if "objective" in r] == ["supervised", "pseudo_gumbel"]
    assert [r["step"] for r in lines if "eval/cycle_gIoU" in r] == [0, 2]
    assert "done: 2 steps" in capsys.readouterr().out


def test_resuming_a_finished_run_says_it_is_finished_with_its_last_numbers(tmp_path, capsys):
    args = ["--output-dir", str(tmp_path), "--max-steps", "2", *TINY, "eval_every=0", "objective_kind=supervised"]
    assert main(args) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    last = json.loads(before.splitlines()[-1])
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "already finished: the checkpoint is at step 2, max_steps is 2; nothing to do" in out
    assert f"last logged step 2: loss {last['loss']:.4f}, mask IoU {last['iou']:.3f}" in out
    assert "done: 0 steps" not in out and (tmp_path / "metrics.jsonl").read_text() == before
