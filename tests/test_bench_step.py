"""The whole-step benchmark's baseline must be a fair one: with equal weights and noise it gives
the same teacher captions, the same Gumbel picks and the same loss as our step."""

import argparse

import torch

from pg_train.bench.seed_step import full_copy_ema_update
from pg_train.bench.step import run_variant


def test_seed_literal_baseline_agrees_with_our_step_on_the_first_step():
    args = argparse.Namespace(preset="tiny", batch=3, steps=1, caption_len=6, topk=32, peak_tflops=1.0)
    ours = run_variant("ours", args, torch.device("cpu"), torch.float32)
    seed = run_variant("seed", args, torch.device("cpu"), torch.float32)
    untrimmed = run_variant("untrimmed", args, torch.device("cpu"), torch.float32)
    for other in (seed, untrimmed):
        assert ours["first_captions"] == other["first_captions"]
        assert ours["first_hard_ids"] == other["first_hard_ids"]
        assert abs(ours["first_loss"] - other["first_loss"]) < 1e-5
    from pg_train.model import decoder

    assert decoder.TRIM_LAST_LAYER  # the untrimmed variant puts the switch back
    assert ours["persistent_bytes"] < seed["persistent_bytes"]  # shadow of trainables vs a full copy
    for report in (ours, seed):
        assert report["times_s"]["total"] > 0 and report["times_s"]["teacher"] > 0 and report["times_s"]["pass2"] > 0


def test_seed_full_copy_ema_moves_every_parameter_by_the_closed_form():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    full_copy_ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
