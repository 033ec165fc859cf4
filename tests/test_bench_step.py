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
    assert ours["persistent_bytes"] < seed["persistent_bytes"]  # shadow of trainables vs a full copy
    for report in (ours, seed):
        assert report["times_s"]["total"] > 0 and report["times_s"]["teacher"] > 0 and report["times_s"]["pass2"] > 0


def test_seed_full_copy_ema_moves_every_parameter_by_the_closed_form():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    full_copy_ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)


# ---- fused AdamW (builders.build_optimizer): CUDA only, CPU unchanged ------------------------------
class FakeParam:
    def __init__(self, cuda: bool, floating: bool = True):
        self.is_cuda, self.floating = cuda, floating

    def is_floating_point(self):
        return self.floating


def test_fused_adamw_applies_only_when_every_parameter_is_a_cuda_float_and_deepspeed_is_not_in_charge(monkeypatch):
    from pg_train.builders import fused_adamw_applies

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert fused_adamw_applies([FakeParam(True), FakeParam(True)])
    assert fused_adamw_applies([{"params": [FakeParam(True)]}, {"params": [FakeParam(True)]}])
    assert not fused_adamw_applies([FakeParam(True), FakeParam(False)])
    assert not fused_adamw_applies([FakeParam(True, floating=False)])
    assert not fused_adamw_applies([])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not fused_adamw_applies([FakeParam(True)])


def adamw_run(optimizer_of, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    optimizer = optimizer_of(list(model.parameters()))
    for step in range(steps):
        model(torch.randn(3, 5, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, [p.detach().clone() for p in model.parameters()]


def test_build_optimizer_on_cpu_is_torch_default_adamw_bitwise():
    from pg_train.builders import build_optimizer
    from pg_train.config import TrainConfig

    cfg = TrainConfig()
    cfg.optim.weight_decay = 0.05
    o = cfg.optim
    built, ours = adamw_run(lambda params: build_optimizer(params, cfg))
    _, plain = adamw_run(
        lambda params: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))
    assert all(not g["fused"] and not g["foreach"] for g in built.param_groups)
    assert not built._optimizer_step_pre_hooks  # the one-shot check ran and removed itself


def test_build_optimizer_switches_to_fused_at_the_first_step_when_the_parameters_moved(monkeypatch):
    """Training builds the optimizer before Accelerate moves the model: the first step decides.
    (Off CUDA, the decision is forced: torch's CPU fused kernel stands in for the CUDA one.)"""
    import pg_train.builders as builders
    from pg_train.config import TrainConfig

    cfg = TrainConfig()
    moved = {"now": False}
    monkeypatch.setattr(builders, "fused_adamw_applies", lambda params: moved["now"])

    def build_then_move(params):
        optimizer = builders.build_optimizer(params, cfg)
        assert all(not g["fused"] for g in optimizer.param_groups)  # built before the move
        moved["now"] = True
        return optimizer

    built, ours = adamw_run(build_then_move)
    assert all(g["fused"] and g["foreach"] is False for g in built.param_groups)
    assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device for p, s in built.state.items())
    o = cfg.optim
    _, fused = adamw_run(
        lambda params: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
