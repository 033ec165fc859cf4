"""ema.overlap: the teacher captions batch t+1 while the student trains on batch t. Its captions
must be exactly those of a teacher one EMA update older (computed here through the ordinary,
non-overlapped caption path from a saved EMA state), and a run cut and resumed must equal the
uninterrupted one."""

import copy
import json
from pathlib import Path

import pytest
import torch
from test_train import FAST

import pg_train.objectives.mix as objectives_mix
from pg_train.config import ConfigError, load_config
from pg_train.objectives.passes import batch_region_cells
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema
from pg_train.train import REQUEUE_EXIT_CODE, train

OVERLAP = [
    *FAST,
    "ema.placement=full:cpu",
    "ema.overlap=true",
    "ema.decay=0.5",  # a teacher that moves every step, so one update older is visibly different
    "optim.lr=0.01",
    "optim.warmup_steps=1",
]


def test_overlap_teacher_captions_are_those_of_a_teacher_one_update_older(tmp_path, monkeypatch):
    calls = []  # per step: the captions the step used, its inputs, the EMA state when it ran
    real_step = objectives_mix.pseudo_gumbel_step

    def spy(student, teacher, batch, cfg, **kwargs):
        ids, lengths = batch["teacher_captions"]
        calls.append(
            {
                "ids": ids.clone(),
                "lengths": lengths.clone(),
                "pixel_values1": batch["pixel_values1"].clone(),
                "region_nearest1": batch["region_nearest1"].clone(),
                "region_coverage1": batch["region_coverage1"].clone(),
                "ema": copy.deepcopy(teacher.state_dict()),
            }
        )
        return real_step(student, teacher, batch, cfg, **kwargs)

    monkeypatch.setattr(objectives_mix, "pseudo_gumbel_step", spy)
    cfg = load_config([], [*OVERLAP, f"output_dir={tmp_path}", "max_steps=5"])
    result = train(cfg)
    assert result.exit_code == 0 and len(calls) == 5

    reference = copy.deepcopy(result.ema)  # the ordinary caption path, fed an older EMA state
    student = result.model

    def captions(call, ema_state):
        reference.load_state_dict(ema_state)
        cells, _ = batch_region_cells(call, student.grid_size, cfg.objective)
        return generate_pseudo_tokens_with_ema(reference, call["pixel_values1"], cells, cfg.objective, student=student)

    differs = 0
    for t, call in enumerate(calls):
        older = calls[max(t - 1, 0)]["ema"]  # batch 0 has no older teacher: the initial one captions it
        ids, lengths = captions(call, older)
        assert torch.equal(lengths, call["lengths"]), t
        assert torch.equal(ids, call["ids"][:, : ids.shape[1]]) and ids.shape == call["ids"].shape, t
        fresh_ids, fresh_lengths = captions(call, call["ema"])  # what the overlap-free teacher would say
        differs += not (torch.equal(fresh_lengths, lengths) and torch.equal(fresh_ids, ids))
    assert differs > 0, "the teacher never changed its captions: this run cannot tell one update older apart"


def test_overlap_teacher_resume_equals_the_uninterrupted_run(tmp_path):
    args = [*OVERLAP, "max_steps=6", "save_every=100"]
    full = train(load_config([], [*args, f"output_dir={tmp_path / 'full'}"]))
    cut = train(load_config([], [*args, f"output_dir={tmp_path / 'cut'}", "stop_at_step=3"]))
    assert cut.exit_code == REQUEUE_EXIT_CODE
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-00000003" / "trainer_state_rank0.json").read_text())
    assert state["teacher_captions"] is not None  # the batch in flight travels with the checkpoint
    resumed = train(load_config([], [*args, f"output_dir={tmp_path / 'cut'}", "resume=auto"]))
    assert resumed.exit_code == 0

    def losses(run):
        return [json.loads(line)["loss"] for line in (Path(tmp_path) / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("cut") == losses("full")
    assert resumed.ema.checksum() == full.ema.checksum()


@pytest.mark.parametrize(
    "override, message",
    [
        (["ema.placement=same"], "needs ema.placement=full"),
        (["ema.placement=full:cpu", "objective_kind=supervised"], "objectives with a teacher"),
        (["ema.placement=full:cpu", "objective.do_sample=true"], "greedily"),
    ],
)
def test_overlap_teacher_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], ["ema.overlap=true", *override])
