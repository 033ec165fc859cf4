"""The training application: default run, ZeRO-2 on 2 CPU processes, exact resume, signals,
non-finite losses and configuration errors."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch, wait_for_metric_lines

from pg_train.config import ConfigError, load_config
from pg_train.model.io.state_check import CheckpointError
from pg_train.train import REQUEUE_EXIT_CODE, NonFiniteLossError, train

FAST = [
    "batch_size=2",
    "objective.max_caption_len=6",
    "objective.topk=16",
    "data.num_samples=24",
    "tensorboard=false",
    "progress=false",
    "report=false",
    "eval_every=0",
]


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_cli_default_job_runs_five_steps_with_finite_losses_and_a_checkpoint(tmp_path):
    cmd = [
        str(Path(sys.prefix) / "bin" / "accelerate"),
        "launch",
        "--num_processes",
        "1",
        "launch/train.py",
        "--max-steps",
        "5",
        "--output-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = metrics(tmp_path)  # the embedded default job: a curriculum, evaluated at step 0 and at the end
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 5] and "eval/cycle_gIoU" in lines[0]
    assert [r["objective"] for r in lines[1:]] == ["supervised"] * 4 + ["pseudo_label+supervised"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines[1:])
    assert (tmp_path / "checkpoints" / "step-00000005" / "trainer_state_rank0.json").is_file()
    assert (tmp_path / "config.yaml").is_file() and any((tmp_path / "tensorboard").rglob("events.out.tfevents*"))
    assert "done: 5 steps" in proc.stdout
    from PIL import Image

    assert Image.open(tmp_path / "report.png").size[0] > 0 and (tmp_path / "report.html").is_file()


@pytest.mark.slow
def test_zero2_two_processes_shard_data_partition_optimizer_and_agree_on_weights(tmp_path):
    accelerate_launch(
        "tests/dist/train_probe.py", str(tmp_path / "probe"), f"output_dir={tmp_path / 'run'}", "max_steps=4", *FAST
    )
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(ranks[0]["consumed"]) & set(ranks[1]["consumed"])
    assert len(ranks[0]["consumed"]) == len(ranks[1]["consumed"]) == 4 * 2
    assert ranks[0]["trainable_checksum"] == ranks[1]["trainable_checksum"]
    assert ranks[0]["trainable_bytes_hash"] == ranks[1]["trainable_bytes_hash"]  # bitwise equal
    assert ranks[0]["ema_checksum"] == ranks[1]["ema_checksum"]
    for r in ranks:  # Adam's two moments, split in half across the two ranks
        assert 0.9 * r["trainable_elements"] <= r["optimizer_state_elements"] <= 1.1 * r["trainable_elements"]
    # and the optimizer state really is sharded on disk: one file per rank
    shards = list((tmp_path / "run" / "checkpoints").rglob("*optim_states.pt"))
    assert len(shards) == 2


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run_under_zero2(tmp_path):
    args = [*FAST, "max_steps=6", "save_every=100"]
    accelerate_launch("tests/dist/train_probe.py", str(tmp_path / "full"), f"output_dir={tmp_path / 'full_run'}", *args)
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "cut"),
        f"output_dir={tmp_path / 'cut_run'}",
        *args,
        "stop_at_step=3",
    )
    cut = json.loads((tmp_path / "cut.rank0.json").read_text())
    assert cut["exit_code"] == REQUEUE_EXIT_CODE
    assert (tmp_path / "cut_run" / "checkpoints" / "step-00000003").is_dir()
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "resumed"),
        f"output_dir={tmp_path / 'cut_run'}",
        *args,
        "resume=auto",
    )
    full = [json.loads((tmp_path / f"full.rank{r}.json").read_text()) for r in (0, 1)]
    resumed = [json.loads((tmp_path / f"resumed.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["loss"] for r in metrics(tmp_path / "cut_run")] == [r["loss"] for r in metrics(tmp_path / "full_run")]
    for f, r in zip(full, resumed):
        assert r["trainable_bytes_hash"] == f["trainable_bytes_hash"]
        assert r["ema_checksum"] == f["ema_checksum"]
        assert r["consumed"] == f["consumed"]


def test_signal_usr1_checkpoints_and_exits_with_requeue_code_then_resumes(tmp_path):
    cmd = [
        sys.executable,
        "launch/train.py",
        "--output-dir",
        str(tmp_path),
        "--max-steps",
        "500",
        "save_every=1000",
        *FAST,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metric_lines(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, stderr[-3000:]
    stopped_at = metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    assert stopped_at < 500
    resumed = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            str(stopped_at + 2),
            "--resume",
            "auto",
            "save_every=1000",
            *FAST,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{stopped_at:08d}'} at step {stopped_at}" in resumed.stdout
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, stopped_at + 3))


def poison_calls(monkeypatch, poisoned: set[int]) -> None:
    """Make the objective's listed (1-based) calls return a NaN loss."""
    import pg_train.objectives.mix as objectives_mix

    real_step, calls = objectives_mix.pseudo_gumbel_step, {"n": 0}

    def flaky_step(*args, **kwargs):
        calls["n"] += 1
        out = real_step(*args, **kwargs)
        if calls["n"] in poisoned:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(objectives_mix, "pseudo_gumbel_step", flaky_step)


def test_nonfinite_loss_skips_the_update_and_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    poison_calls(monkeypatch, {2, 3})
    cfg = load_config([], [*FAST, f"output_dir={tmp_path}", "max_steps=5", "max_nonfinite_in_a_row=3"])
    result = train(cfg)
    lines = metrics(tmp_path)
    assert [r["skipped_nonfinite"] for r in lines] == [0, 1, 1, 0, 0]
    assert [r["loss"] is None for r in lines] == [False, True, True, False, False]
    assert [r["ema_updates"] for r in lines] == [1, 1, 1, 2, 3]  # no EMA update without an optimizer step
    assert result.exit_code == 0 and lines[-1]["nonfinite_total"] == 2
    poison_calls(monkeypatch, {1, 2, 3})
    cfg = load_config([], [*FAST, f"output_dir={tmp_path / 'b'}", "max_steps=10", "max_nonfinite_in_a_row=3"])
    with pytest.raises(NonFiniteLossError, match="3 micro-batches in a row"):
        train(cfg)


@pytest.mark.parametrize(
    "poisoned, dropped, ema_updates",
    [
        ({1}, [1, 0, 0, 0], [1, 2, 3, 4]),  # first micro-batch lost: the window steps on the second
        ({1, 2}, [2, 0, 0, 0], [0, 1, 2, 3]),  # the whole window lost: no update, and later windows stay aligned
        ({4}, [0, 1, 0, 0], [1, 2, 3, 4]),  # the boundary micro-batch lost: the first one's gradients still apply
    ],
)
def test_nonfinite_micro_batches_under_gradient_accumulation_keep_windows_aligned(
    tmp_path, monkeypatch, poisoned, dropped, ema_updates
):
    poison_calls(monkeypatch, poisoned)
    result = train(load_config([], [*FAST, f"output_dir={tmp_path}", "max_steps=4", "grad_accum=2"]))
    lines = metrics(tmp_path)
    assert [r["skipped_nonfinite"] for r in lines] == dropped
    assert [r["ema_updates"] for r in lines] == ema_updates
    assert [r["loss"] is None for r in lines] == [d == 2 for d in dropped]
    adam_steps = {int(state["step"]) for state in result.optimizer.optimizer.state.values()}
    assert adam_steps == {ema_updates[-1]}  # the optimizer stepped exactly when the EMA did
    assert result.exit_code == 0 and all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.slow
def test_lost_boundary_micro_batch_under_zero2_gradient_accumulation_applies_the_rest_on_every_rank(tmp_path):
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "probe"),
        f"output_dir={tmp_path / 'run'}",
        "max_steps=3",
        "grad_accum=2",
        *FAST,
        env={"PG_POISON": "1:4"},
    )  # rank 1, step 2's last micro-batch returns NaN
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [[0, 1, 0], [0, 1, 0]]
    assert [r["ema_updates"] for r in ranks] == [[1, 2, 3], [1, 2, 3]]
    assert [r["optimizer_steps"] for r in ranks] == [3, 3]  # DeepSpeed itself stepped at every window's end
    assert ranks[0]["finite_weights"] and ranks[1]["finite_weights"]
    assert ranks[0]["trainable_bytes_hash"] == ranks[1]["trainable_bytes_hash"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("batch_size=two", "batch_size: expected an integer"),
        ("ema.placement=gpu", "ema.placement"),
        ("data.source=manifest", "data.manifest: required"),
        ("objective.min_caption_len=100", "objective.min_caption_len"),
        ("model.preset=huge", "model.preset: unknown preset"),
        ("resume=/does/not/exist", "resume:"),
    ],
)
def test_config_error_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config([], [override])


def test_config_error_from_cli_exits_2_before_building_anything(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: 1e-4\n  momentum: 0.9\n")
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(tmp_path / "bad.yaml"),
            "--output-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.yaml: unknown config key 'optim.momentum'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_files_and_overrides_compose(tmp_path):
    (tmp_path / "a.yaml").write_text("max_steps: 7\noptim:\n  lr: 0.001\nobjective:\n  tau: 0.5\n")
    (tmp_path / "b.yaml").write_text("optim:\n  lr: 0.002\n")
    cfg = load_config(
        [tmp_path / "a.yaml", tmp_path / "b.yaml"], ["objective.tau=0.9", "model.lora_targets=[q_proj,v_proj]"]
    )
    assert cfg.max_steps == 7 and cfg.optim.lr == 0.002 and cfg.objective.tau == 0.9
    assert cfg.model.lora_targets == ["q_proj", "v_proj"]


def test_scientific_notation_without_a_dot_is_a_number():
    assert load_config([], ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.slow
def test_zero2_with_optimizer_offload_trains_on_two_processes(tmp_path):
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "probe"),
        f"output_dir={tmp_path / 'run'}",
        "max_steps=3",
        *FAST,
        config="accelerate_configs/cpu_zero2_offload_2proc.yaml",
    )
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["trainable_bytes_hash"] == ranks[1]["trainable_bytes_hash"]
    assert all(loss is not None for loss in ranks[0]["losses"]) and len(ranks[0]["losses"]) == 3


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_accelerate_configs_are_consistent(name):
    import yaml

    config = yaml.safe_load((REPO / "accelerate_configs" / name).read_text())
    assert config["num_processes"] >= config["num_machines"] >= 1
    if config["distributed_type"] == "DEEPSPEED":
        ds = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 2
        assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"


def test_bitsandbytes_8bit_adamw_and_4bit_base_train_and_resume(tmp_path):
    args = [*FAST, f"output_dir={tmp_path}", "optim.name=adamw8bit", "model.quantize_4bit=true", "save_every=2"]
    first = train(load_config([], [*args, "max_steps=2"]))
    module = first.model
    q_proj = module.language_model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.uint8  # NF4 storage
    assert type(first.optimizer.optimizer).__name__ == "AdamW8bit"
    lora_before = q_proj.lora_B.default.weight.detach().clone()
    resumed = train(load_config([], [*args, "max_steps=4", "resume=auto"]))
    lines = metrics(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in lines)
    assert not torch.equal(
        resumed.model.language_model.model.layers[0].self_attn.q_proj.lora_B.default.weight, lora_before
    )
    from pg_train.model import to_sa2va_state_dict

    with pytest.raises(ValueError, match="4-bit"):
        to_sa2va_state_dict(resumed.model)


@pytest.mark.slow
def test_zero2_with_8bit_adamw_on_two_processes(tmp_path):
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "probe"),
        f"output_dir={tmp_path / 'run'}",
        "max_steps=3",
        *FAST,
        "optim.name=adamw8bit",
    )
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["trainable_bytes_hash"] == ranks[1]["trainable_bytes_hash"]
    for r in ranks:  # two 1-byte moments, half of the parameters each (+ block scales)
        assert r["optimizer_state_elements"] < 1.1 * r["trainable_elements"]


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank_under_zero2(tmp_path):
    accelerate_launch(
        "tests/dist/train_probe.py",
        str(tmp_path / "probe"),
        f"output_dir={tmp_path / 'run'}",
        "max_steps=3",
        *FAST,
        env={"PG_POISON": "1:2"},
    )  # rank 1's second step returns NaN
    ranks = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"] for r in ranks] == [[0, 1, 0], [0, 1, 0]]
    assert ranks[0]["finite_weights"] and ranks[1]["finite_weights"]
    assert ranks[0]["trainable_bytes_hash"] == ranks[1]["trainable_bytes_hash"]


@pytest.mark.parametrize("kind", ["supervised", "mixed"])
def test_supervised_and_mixed_objectives_train_with_periodic_evaluation(tmp_path, kind):
    result = train(
        load_config(
            [],
            [
                *FAST,
                f"output_dir={tmp_path}",
                "max_steps=2",
                f"objective_kind={kind}",
                "eval_every=2",
                "eval_samples=4",
            ],
        )
    )
    lines = metrics(tmp_path)
    assert result.exit_code == 0 and [r["step"] for r in lines] == [
        0,
        1,
        2,
    ]  # step 0: the starting point, evaluation only
    assert "loss" not in lines[0] and "eval/cycle_gIoU" in lines[0]
    lines = lines[1:]
    assert all(r["loss"] is not None and r["lm_loss"] > 0 for r in lines)
    assert "eval/cycle_gIoU" in lines[1] and "eval/shuffled_gIoU" in lines[1] and "eval/cycle_gIoU" not in lines[0]
    assert (
        0 <= lines[1]["eval/caption_sensitivity"] and not torch.backends.cuda.cudnn_sdp_enabled()
    )  # off unless cudnn_attention=true


def test_extra_trainable_prefixes_unfreeze_named_parts_only():
    from pg_train.train import build_student

    model = build_student(load_config([], ["model.extra_trainable=[vision_model.]"]))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("vision_model."))
    assert not any(
        p.requires_grad
        for n, p in model.named_parameters()
        if n.startswith("grounding_encoder.sam2_model.image_encoder.")
    )
    with pytest.raises(ValueError, match="matches no parameter"):
        build_student(load_config([], ["model.extra_trainable=[nothing.]"]))


def test_init_from_a_training_checkpoint_loads_its_weights_and_starts_a_new_stage(tmp_path):
    from safetensors.torch import load_file

    from pg_train.train import build_student

    first = train(load_config([], [*FAST, f"output_dir={tmp_path / 'a'}", "max_steps=2", "save_every=2"]))
    checkpoint = tmp_path / "a" / "checkpoints" / "step-00000002"
    saved = load_file(str(checkpoint / "model.safetensors"))
    model = build_student(load_config([], [f"model.init_from={checkpoint}"]))
    state = model.state_dict()
    assert first.exit_code == 0 and state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    fresh = build_student(load_config([], []))
    assert any(not torch.equal(fresh.state_dict()[k], saved[k]) for k in saved)  # training moved something
    # a folder that is neither a model directory, a checkpoint nor a run directory is named as such
    with pytest.raises(CheckpointError, match="model.init_from: .* is no checkpoint pg_train can read"):
        build_student(load_config([], [f"model.init_from={tmp_path}"]))


def test_curriculum_trains_supervised_then_pseudo_gumbel_in_one_run(tmp_path):
    """objective_kind=curriculum: supervised for curriculum.supervised_steps, then Pseudo-Gumbel
    with its own warm-up and cosine from curriculum.lr, its teacher restarted from the student."""
    args = [*FAST, f"output_dir={tmp_path}", "max_steps=6", "objective_kind=curriculum"]
    args += ["curriculum.supervised_steps=3", "curriculum.lr=0.002", "optim.lr=0.001", "optim.warmup_steps=2"]
    args += ["optim.min_lr_ratio=0.1", "ema.decay=0.9"]
    assert train(load_config([], args)).exit_code == 0
    lines = metrics(tmp_path)
    assert [r["objective"] for r in lines] == ["supervised"] * 3 + ["pseudo_gumbel"] * 3
    assert all("lm_loss" in r for r in lines[:3]) and not any("lm_loss" in r for r in lines[3:])
    assert [r["ema_updates"] for r in lines] == [1, 2, 3, 1, 2, 3]  # the teacher restarts at the switch
    # each stage its own schedule: warm-up peak x (i + 1) / 2 for i < 2, then the cosine's start (the peak)
    assert [r["lr"] for r in lines] == pytest.approx([0.0005, 0.001, 0.001, 0.001, 0.002, 0.002])


def test_summary_prints_held_out_giou_at_the_first_and_last_evaluation(tmp_path):
    from pg_train.train import held_out_summary

    kinds = ("referring", "cycle", "shuffled", "empty")
    rows = [
        {"step": 0, **{f"eval/{k}_gIoU": v for k, v in zip(kinds, (0.08, 0.07, 0.08, 0.06))}},
        {"step": 1, "loss": 1.0},
        {"step": 50, **{f"eval/{k}_gIoU": v for k, v in zip(kinds, (0.5, 0.5, 0.5, 0.5))}},
        {"step": 100, "loss": 0.5, **{f"eval/{k}_gIoU": v for k, v in zip(kinds, (0.72, 0.61, 0.33, 0.30))}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = held_out_summary(tmp_path / "metrics.jsonl")
    assert "step 0 -> step 100" in lines[0]
    assert "referring 0.080 -> 0.720 (+0.640)" in lines[1] and "cycle     0.070 -> 0.610 (+0.540)" in lines[2]
    assert "shuffled  0.080 -> 0.330 (+0.250)" in lines[3] and "empty     0.060 -> 0.300 (+0.240)" in lines[4]
    (tmp_path / "none.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert held_out_summary(tmp_path / "none.jsonl") == []
