"""launch/gpu/first_call.sh, the first device call of a GPU session, dry-run on the CPU: every
stage runs (tiny shapes), each leaves one JSON line, and what comes back fits the device's
limits (at most 8 files, plain names, two folders deep at most)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = ["smoke", "graphs", "bench", "memcheck", "ema", "train"]


@pytest.mark.slow
def test_first_call_dry_run_runs_every_stage_and_returns_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    # No time limit asserted here (timing goals live in docs/benchmarks.md, measured with the command
    # there): the stages' own timeouts bound it.
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PY_DRY": str(REPO / ".venv/bin/python")}
    proc = subprocess.run(
        ["bash", "launch/gpu/first_call.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in lines] == STAGES
    failed = {s["stage"]: s["tail"] for s in lines if s["rc"] != 0 or s["skipped"] or s["timed_out"]}
    assert not failed, failed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and len(p.relative_to(out).parts) <= 3 for p in files)
    # each stage's product is there and says what the stage is for
    bench = json.loads((out / "bench.json").read_text())
    assert bench["args"]["gradient_checkpointing"] and bench["caption_lens"] == [2, 1]
    assert set(bench["marginal_decode_ms_per_token"]) == {"ours"}
    assert "reference" in json.loads((out / "memcheck.json").read_text())
    assert "torch" in (out / "env.txt").read_text()  # the versions, from the smoke stage
    ema = json.loads((out / "ema_cpu.json").read_text())
    assert ema["preset"] == "tiny" and len(ema["results"]) >= 2
    steps = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["objective"] == "pseudo_gumbel" for s in steps)
    log = (out / "first_call.log").read_text()
    assert "=== stage train" in log and "accelerate_configs/single_gpu.yaml" in log
    # every stage's python forked from the one warm server (launch/gpu/warm_python.py), its CPU counted
    assert all("warm_python.py" in line for line in log.splitlines() if line.startswith("=== stage"))
    assert all(s["cpu_s"] > 0.5 for s in lines), [(s["stage"], s["cpu_s"]) for s in lines]
