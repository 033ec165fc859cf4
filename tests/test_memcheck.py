"""memcheck: exact static prediction on the tiny preset, the reference prediction, and the
audits catching each of the design note's three suspected bugs."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pg_train.memcheck.__main__ import main
from pg_train.memcheck.predict import Deployment, predict
from pg_train.model import build_model


def run(tmp_path, *args):
    path = tmp_path / "report.json"
    code = main(["--json", str(path), *args])
    return code, json.loads(path.read_text())


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--zero-stage", "3"], 2), (["--inject", "nope"], 2)])
def test_help_and_usage_errors_answer_without_importing_torch(argv, code):
    """`python -m pg_train.memcheck --help` (and a usage error) parse before torch, the model or
    the package's exports load: it cost ~5 CPU s of imports (docs/measurements/cpu_first_call_dry_run.json)."""
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['memcheck', *{argv!r}]\n"
        "try:\n    runpy.run_module('pg_train.memcheck', run_name='__main__')\nexcept SystemExit as e:\n"
        "    print('EXIT', e.code)\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'pg_train.memcheck.measure') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=60)
    assert f"EXIT {code}" in proc.stdout and "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    if code == 0:
        assert "--inject {no-ema,detach-text-embeds" in proc.stdout  # the bugs listed from memcheck.bugs


def test_healthy_tiny_run_matches_prediction_exactly_and_passes(tmp_path, capsys):
    code, report = run(tmp_path)
    assert code == 0 and report["exit_code"] == 0
    rows = {r["component"]: r for r in report["measured_config"]["comparison"]}
    for component in ("frozen weights", "trainable weights", "gradients", "optimizer state", "EMA"):
        assert rows[component]["measured"] > 0
        assert abs(rows[component]["error"]) <= 0.01, component
    assert abs(rows["activations saved for backward"]["error"]) <= 0.5
    assert (
        abs(rows["peak RSS growth, first step"]["error"]) <= 1.0 and rows["peak RSS growth, first step"]["measured"] > 0
    )
    assert all(a["passed"] for a in report["audits"]) and len(report["audits"]) == 4
    out = capsys.readouterr().out
    assert "design note" in out and "memcheck: PASS (exit 0)" in out


@pytest.mark.parametrize(
    "bug, failing_audit, diagnosis",
    [
        ("no-ema", "EMA exists", "EMA is absent"),
        ("detach-text-embeds", "gradients reach LoRA", "detached"),
        ("no-optimizer-step", "optimizer holds state", "optimizer state is absent"),
    ],
)
def test_broken_runs_exit_1_with_the_right_diagnosis(tmp_path, capsys, bug, failing_audit, diagnosis):
    code, report = run(tmp_path, "--inject", bug)
    assert code == 1
    failed = [a for a in report["audits"] if not a["passed"]]
    assert [a["name"] for a in failed] and all(a["name"].startswith(failing_audit) for a in failed)
    assert diagnosis in capsys.readouterr().out


def test_out_of_tolerance_exits_2(tmp_path):
    code, report = run(tmp_path, "--peak-tolerance", "0.0001")
    assert code == 2 and all(a["passed"] for a in report["audits"])


def test_a_frozen_tower_that_keeps_its_graph_exits_2_though_every_audit_passes(tmp_path):
    """A leak no audit sees (the frozen ViT keeps its activations): the activation check must."""
    code, report = run(tmp_path, "--inject", "frozen-vit-keeps-graph", "--steps", "1")
    rows = {r["component"]: r for r in report["measured_config"]["comparison"]}
    assert code == 2 and all(a["passed"] for a in report["audits"])
    assert not rows["activations saved for backward"]["within"] and rows["activations saved for backward"]["error"] > 1


DEFAULT_JOB = ["--config", "pg_train/default_job.yaml", "--world-size", "1", "--zero-stage", "0"]
# The default job (batch 4): a supervised warm-up (steps 0-674 = 0.75 x 900), then each micro-batch
# 2 unlabelled samples trained with pseudo-labels + 2 labelled ones trained supervised. Step 675
# records drift diagnostics (every 25), so that kind is measured at 676.
WARM_UP, TWO_STREAMS = "supervised (4 samples)", "pseudo_label+supervised (2 + 2 samples)"


def saved_rows(report) -> dict:
    """Each measured step's 'activations saved for backward' row, by step."""
    return {
        step["step"]: next(r for r in step["comparison"] if r["component"].startswith("activations saved"))
        for step in report["measured_config"]["steps"]
    }


def test_memcheck_finds_the_steps_each_configuration_trains():
    from pg_train.config import load_config
    from pg_train.memcheck.steps import step_kinds

    def kinds(batch_size, *overrides, files=("pg_train/default_job.yaml",)):
        return [(k.label, k.step) for k in step_kinds(load_config(list(files), list(overrides)), batch_size)]

    assert kinds(4) == [(WARM_UP, 1), (TWO_STREAMS, 676)]  # step 0 records diagnostics too
    assert kinds(4, "curriculum.objective=pseudo_gumbel")[1] == ("pseudo_gumbel+supervised (2 + 2 samples)", 676)
    # one sample per micro-batch: the labelled share alternates whole micro-batches (data.streams' credit)
    assert kinds(1, files=["configs/sa2va_4b_zero2.yaml"]) == [
        ("supervised (1 sample)", 0),
        ("pseudo_label (1 sample)", 500),
    ]
    assert kinds(3, "curriculum.labelled_fraction=0.3", "objective.diagnostics_every=0") == [
        ("supervised (3 samples)", 0),
        ("pseudo_label (3 samples)", 675),  # 0.3 x 3 = 0.9 labelled owed: none yet
        ("pseudo_label+supervised (2 + 1 samples)", 676),  # 1.8 owed: one
    ]
    # with the grounding gate, self-training may wait: the closed gate's steps are the warm-up's kind
    assert [k for k, _ in kinds(4, "curriculum.gate_min_gap=0.1")] == [WARM_UP, TWO_STREAMS]
    assert kinds(2, files=[]) == [("pseudo_gumbel (2 samples)", 0)]
    assert kinds(2, "objective_kind=mixed", files=[]) == [("mixed (2 samples, both objectives)", 0)]
    assert kinds(2, "objective_kind=supervised", files=[]) == [("supervised (2 samples)", 0)]


def test_a_two_stream_step_is_predicted_as_its_parts_on_their_shares():
    """The two-stream step keeps both parts' graphs until backward: its saved activations are the
    sum of a pseudo-label step on the unlabelled share and a supervised step on the labelled one."""
    from pg_train.memcheck.predict import step_phases
    from pg_train.memcheck.steps import StepKind

    model = build_model("sa2va-4b", device="meta", dtype=torch.bfloat16)
    d = Deployment(batch_size=4, caption_len=64, text_len=20)

    def saved(*parts):
        return step_phases(model, d, StepKind(parts))["backward"]["saved"]

    both = saved(("pseudo_label", 3), ("supervised", 1))
    assert both == saved(("pseudo_label", 3)) + saved(("supervised", 1))
    assert saved(("supervised", 1)) < saved(("pseudo_label", 1))  # 20 ground-truth tokens, not 64
    phases = list(step_phases(model, d, StepKind((("pseudo_label", 3), ("supervised", 1)))))
    assert phases == [
        "pseudo_label: teacher generation",
        "pseudo_label: pass 1 (caption logits)",
        "pseudo_label: pass 2 (segment)",
        "supervised: pass 1 (caption logits)",
        "supervised: pass 2 (segment)",
        "backward",
    ]
    pred = predict(
        model,
        dataclasses.replace(
            d, steps=(StepKind((("supervised", 4),)), StepKind((("pseudo_label", 2), ("supervised", 2))))
        ),
    )
    assert set(pred.steps) == {"supervised (4 samples)", "pseudo_label+supervised (2 + 2 samples)"}
    assert pred.peak_bytes == pred.static_bytes("cuda:0") + max(
        max(p["total"] for p in phases.values()) for phases in pred.steps.values()
    )


@pytest.mark.slow
def test_a_stream_predicted_on_the_whole_batch_exits_2(tmp_path, monkeypatch):
    """The two-stream check keeps its teeth: predicting each part on the whole micro-batch (not
    its share) puts the two-stream step out of tolerance (exit 2); the warm-up stays within."""
    import importlib

    from pg_train.memcheck.steps import StepKind

    predict_module = importlib.import_module("pg_train.memcheck.predict")
    real = predict_module.step_phases

    def whole_batch(module, d, kind):
        total = sum(n for _, n in kind.parts)
        return real(module, d, StepKind(tuple((objective, total) for objective, _ in kind.parts), kind.step))

    monkeypatch.setattr(predict_module, "step_phases", whole_batch)
    # at the accuracy the healthy run holds (test_default_job_memcheck_measures_the_steps_the_job_trains)
    code, report = run(tmp_path, *DEFAULT_JOB, "--steps", "1", "--peak-tolerance", "0.2")
    rows = saved_rows(report)
    assert code == 2 and all(a["passed"] for a in report["audits"])
    assert rows[WARM_UP]["within"] and not rows[TWO_STREAMS]["within"]
    assert rows[TWO_STREAMS]["error"] < -0.4  # measured about half the (doubled) prediction


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "checkpointed"])
def test_default_job_memcheck_measures_the_steps_the_job_trains(tmp_path, capsys, checkpointing):
    """The default job is a curriculum: memcheck predicts and measures its warm-up step and its
    two-stream step (through objectives.mix.objective_step, as training calls it), each within
    tolerance, and says which sets the peak. It trains the vision tower and SAM2's image encoder
    (never checkpointed): their activations are predicted, so a correct run passes both ways."""
    code, report = run(tmp_path, *DEFAULT_JOB, *(["--gradient-checkpointing"] if checkpointing else []))
    rows = saved_rows(report)
    assert code == 0 and all(a["passed"] for a in report["audits"]), rows
    assert list(rows) == [WARM_UP, TWO_STREAMS]
    assert all(abs(r["error"]) <= 0.2 for r in rows.values()), rows
    rss = next(r for r in report["measured_config"]["comparison"] if r["component"].startswith("peak RSS growth"))
    assert rss["within"]
    phases = report["measured_config"]["steps"][1]["phases"]
    # both parts of the two-stream step keep a graph until backward
    assert phases["pseudo_label: pass 2 (segment)"]["saved_for_backward"] > 0
    assert phases["supervised: pass 1 (caption logits)"]["saved_for_backward"] > 0
    prediction = report["measured_config"]["prediction"]
    assert set(prediction["steps"]) == {WARM_UP, TWO_STREAMS} and prediction["peak_step"] in prediction["steps"]
    audits = [a["name"] for a in report["audits"]]
    assert any(a.endswith(f"[{TWO_STREAMS}]") for a in audits) and any(a.endswith(f"[{WARM_UP}]") for a in audits)
    assert "the peak: predicted in" in capsys.readouterr().out


@pytest.mark.slow
def test_default_job_under_predicted_towers_exit_2(tmp_path, monkeypatch):
    """The audit keeps its teeth: without the towers' activations (the prediction before they
    were modelled) the checkpointed default job is out of tolerance."""
    import importlib

    predict_module = importlib.import_module("pg_train.memcheck.predict")  # the package exports a function `predict`

    monkeypatch.setattr(predict_module, "vision_tower_saved", lambda *a: 0)
    monkeypatch.setattr(predict_module, "sam_encoder_saved", lambda *a: 0)
    code, report = run(tmp_path, *DEFAULT_JOB, "--gradient-checkpointing")
    assert code == 2 and all(r["error"] > 2 for r in saved_rows(report).values())


def test_tower_activations_are_predicted_only_when_the_towers_train():
    from pg_train.memcheck.predict import sam_encoder_saved, vision_tower_saved

    model = build_model("sa2va-4b", device="meta", dtype=torch.bfloat16)
    assert vision_tower_saved(model, 10, 2) == 0 and sam_encoder_saved(model, 1, 2) == 0  # Sa2VA: frozen
    frozen = predict(model, Deployment(batch_size=2))
    model.vision_model.encoder.layers[12].requires_grad_(True)  # the upper half of the ViT trains
    half = vision_tower_saved(model, 10, 2)
    model.vision_model.requires_grad_(True)
    full = vision_tower_saved(model, 10, 2)
    pixels = 10 * 3 * 448 * 448 * 2
    assert half > 0 and full - pixels == 2 * half  # 12 of 24 layers, then all 24 and the pixels
    model.grounding_encoder.sam2_model.image_encoder.requires_grad_(True)
    trained = predict(model, Deployment(batch_size=2))
    sam = sam_encoder_saved(model, 2, 2)
    assert sam > 0
    # both passes run the ViT over 2 images x 10 views; only pass 2 runs SAM2's encoder
    assert trained.phases["pass 1 (caption logits)"]["saved"] - frozen.phases["pass 1 (caption logits)"]["saved"] == (
        vision_tower_saved(model, 20, 2)
    )
    assert (
        trained.phases["backward"]["saved"] - frozen.phases["backward"]["saved"]
        == 2 * vision_tower_saved(model, 20, 2) + sam
    )


def test_reference_prediction_for_sa2va_4b_zero2():
    model = build_model("sa2va-4b", device="meta", dtype=torch.bfloat16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pred = predict(model, Deployment(world_size=8, zero_stage=2))
    assert pred.component("trainable weights") == 2 * trainable
    assert pred.component("optimizer state") == 12 * trainable // 8
    assert pred.component("EMA") == 4 * trainable
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) * 2
    assert pred.component("frozen weights") == frozen
    offload = predict(model, Deployment(world_size=8, zero_stage=2, offload_optimizer=True))
    assert offload.component("optimizer state") == 0 and any(r.component == "optimizer state" for r in offload.host)
    cpu_ema = predict(model, Deployment(ema_placement="cpu"))
    # fp32 shadow + the update's pinned bf16 staging of the GPU student's tensors + the bf16 mirror
    # of the shadow (the teacher's weights), all on the host
    assert cpu_ema.component("EMA") == 0 and sum(r.bytes for r in cpu_ema.host if r.component == "EMA") == 8 * trainable
    ckpt = predict(model, Deployment(batch_size=8, gradient_checkpointing=True))
    full = predict(model, Deployment(batch_size=8))
    assert ckpt.phases["pass 2 (segment)"]["saved"] < full.phases["pass 2 (segment)"]["saved"] / 4
    assert pred.peak_phase in pred.phases and pred.peak_bytes > pred.static_bytes("cuda:0")


@pytest.mark.slow
def test_zero2_two_processes_partition_is_measured_and_audited(tmp_path):
    from conftest import accelerate_launch

    accelerate_launch("-m", "pg_train.memcheck", "--distributed", "--json", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == 0
    rows = {r["component"]: r for r in report["measured_config"]["comparison"]}
    assert (
        abs(rows["optimizer state"]["error"]) <= 1e-3 and "gradients" not in rows
    )  # padding only; ZeRO frees grads in its step
    deployment = report["measured_config"]["prediction"]["deployment"]
    assert deployment["world_size"] == 2 and deployment["zero_stage"] == 2
    partition = [a for a in report["audits"] if a["name"].startswith("optimizer state is partitioned")]
    assert len(partition) == 1 and partition[0]["passed"]


def test_budget_counts_the_configs_extra_trainable_tensors(tmp_path):
    config = tmp_path / "extra.yaml"
    config.write_text("model:\n  preset: tiny\n  extra_trainable: [language_model.model.norm]\n")
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  preset: tiny\n")

    def trainable_bytes(path):
        _, report = run(tmp_path, "--config", str(path), "--no-measure", "--zero-stage", "0", "--world-size", "1")
        return {r["component"]: r["bytes"] for r in report["reference"]["static"]}["trainable weights"]

    norm = build_model("tiny", device="meta").language_model.model.norm.weight
    assert trainable_bytes(config) - trainable_bytes(base) == norm.numel() * 2  # bf16 on meta


@pytest.mark.parametrize("policy", ["exact", "cuda"])
def test_memcheck_predicts_the_decoding_bucket_s_static_cache_bytes_exactly(policy, monkeypatch):
    """Fast decoding keeps a bucket (static KV cache + buffers) between steps: memcheck's row for
    it must equal the bytes the bucket's tensors hold after a real decoding (tiny preset; `cuda`:
    the GPU's padded batch/prompt buckets, applied on the CPU)."""
    from pg_train.memcheck.measure import build_batch, teacher_prompt
    from pg_train.memcheck.predict import Deployment, predict
    from pg_train.model.decoding import graph_decode
    from pg_train.objectives.settings import PseudoGumbelConfig
    from pg_train.objectives.teacher import caption_batch

    if policy == "cuda":
        monkeypatch.setitem(graph_decode.POLICIES, "cpu", graph_decode.BucketPolicy())
    model = build_model("tiny", seed=0).eval()
    batch = build_batch(model, 3, torch.device("cpu"), seed=0)
    cfg = PseudoGumbelConfig(max_caption_len=7, min_caption_len=7, topk=16, static_cache=True, cuda_graphs=True)
    caption_batch(model, batch, cfg)
    (bucket,) = graph_decode.buckets_of(model.language_model)
    cache = [t for layer in bucket.cache.layers for t in (layer.keys, layer.values)]
    buffers = [t for t in vars(bucket).values() if isinstance(t, torch.Tensor)]
    held = sum(t.numel() * t.element_size() for t in cache + buffers)
    d = Deployment(
        batch_size=3,
        caption_len=7,
        dtype="fp32",
        device="cpu",
        fast_decoding=True,
        decode_prompt=teacher_prompt(model, batch, cfg),
    )
    pred = predict(model, d)
    assert pred.component("decoding buckets") == held
    if policy == "cuda":  # padded: 3 rows -> 4, the prompt rounded up
        assert bucket.batch == 4 and bucket.prompt > d.decode_prompt
    else:
        assert (bucket.batch, bucket.prompt) == (3, d.decode_prompt)
    graph_decode.release(model.language_model)
