"""memcheck's audits on the step training runs: each test breaks the real code path (here, with
monkeypatch; pg_train itself patches nothing) and memcheck must exit 1 naming the right audit.
And the phase observer: bench, memcheck and the step itself see the same ordered stages."""

import contextlib
import json

import torch

from pg_train.distributed import unwrap
from pg_train.ema import EMATeacher
from pg_train.memcheck.__main__ import main
from pg_train.objectives import pseudo_gumbel

GRADIENTS, EMA, OPTIMIZER, CHECKPOINTING = (
    "gradients reach LoRA",
    "EMA exists",
    "optimizer holds state",
    "gradient checkpointing is on",
)


def run(tmp_path, capsys, *args):
    path = tmp_path / "report.json"
    code = main(["--json", str(path), *args])
    return code, json.loads(path.read_text()), capsys.readouterr().out


def assert_exit_1_naming(tmp_path, capsys, audit_prefix: str, evidence: str, *args):
    """memcheck exits 1, and the failing audits are exactly the named one, with `evidence`."""
    code, report, out = run(tmp_path, capsys, *args)
    assert code == 1 and "memcheck: FAIL (exit 1)" in out
    failed = [a for a in report["audits"] if not a["passed"]]
    assert [a["name"] for a in failed] and all(a["name"].startswith(audit_prefix) for a in failed), [
        a["name"] for a in failed
    ]
    assert any(evidence in line for a in failed for line in a["evidence"]), failed


def test_audit_real_step_catches_a_detach_inside_pseudo_gumbel_step(tmp_path, capsys, monkeypatch):
    real = pseudo_gumbel.topk_gumbel_softmax

    def detached(*args, **kwargs):  # a .detach() between the caption logits and the mask loss
        text_embeds, hard_ids = real(*args, **kwargs)
        return text_embeds.detach(), hard_ids

    monkeypatch.setattr(pseudo_gumbel, "topk_gumbel_softmax", detached)
    assert_exit_1_naming(tmp_path, capsys, GRADIENTS, "detached")


def test_audit_real_step_catches_a_teacher_that_is_the_students_current_weights(tmp_path, capsys, monkeypatch):
    @contextlib.contextmanager
    def no_swap(self, student):  # yields the student without swapping the EMA weights in
        yield unwrap(student)

    monkeypatch.setattr(EMATeacher, "as_teacher", no_swap)
    assert_exit_1_naming(tmp_path, capsys, EMA, "the EMA shadow was not swapped in (no swap)")


def test_audit_real_step_names_frozen_lora(tmp_path, capsys, monkeypatch):
    import pg_train.model

    real = pg_train.model.build_offline

    def frozen_lora(*args, **kwargs):
        model = real(*args, **kwargs)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        return model

    monkeypatch.setattr(pg_train.model, "build_offline", frozen_lora)
    assert_exit_1_naming(tmp_path, capsys, GRADIENTS, "LoRA adapters frozen")


def test_audit_real_step_names_gradient_checkpointing_requested_but_off(tmp_path, capsys, monkeypatch):
    code, report, _ = run(tmp_path, capsys, "--gradient-checkpointing")
    audit = next(a for a in report["audits"] if a["name"].startswith(CHECKPOINTING))
    assert code == 0 and audit["passed"] and "requested: yes" in audit["evidence"][0]

    import pg_train.model

    monkeypatch.setattr(pg_train.model, "enable_gradient_checkpointing", lambda model: None)  # silently off
    assert_exit_1_naming(
        tmp_path, capsys, CHECKPOINTING, "gradient checkpointing requested but off", "--gradient-checkpointing"
    )


def test_audit_real_step_catches_a_shadow_not_in_fp32(tmp_path, capsys, monkeypatch):
    real_init = EMATeacher.__init__

    def bf16_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.shadow = [s.to(torch.bfloat16) for s in self.shadow]

    @torch.no_grad()
    def update_in_shadow_dtype(self, student):
        params = self._params(unwrap(student))
        torch._foreach_lerp_(
            self.shadow, [p.detach().to(s.dtype) for p, s in zip(params, self.shadow)], 1.0 - self.current_decay()
        )
        self.num_updates += 1

    monkeypatch.setattr(EMATeacher, "__init__", bf16_init)
    monkeypatch.setattr(EMATeacher, "update", update_in_shadow_dtype)
    assert_exit_1_naming(tmp_path, capsys, EMA, "FAIL shadow is fp32")


def test_audit_real_step_catches_an_optimizer_missing_a_trainable_group(tmp_path, capsys, monkeypatch):
    import pg_train.builders

    real = pg_train.builders.build_optimizer

    def without_vectors(params, cfg):  # e.g. the no-weight-decay group (biases, norms) forgotten
        return real([p for p in params if p.dim() > 1], cfg)

    monkeypatch.setattr(pg_train.builders, "build_optimizer", without_vectors)
    assert_exit_1_naming(tmp_path, capsys, OPTIMIZER, "in no optimizer group")


def test_phase_observer_bench_memcheck_and_training_see_the_same_stages():
    from pg_train.bench.step import STAGES as BENCH_STAGES
    from pg_train.bench.step import StageClock
    from pg_train.config import TrainConfig
    from pg_train.memcheck.measure import PHASES, build_batch, measure
    from pg_train.model import build_offline
    from pg_train.objectives.pseudo_gumbel import pseudo_gumbel_step
    from pg_train.objectives.settings import PseudoGumbelConfig
    from pg_train.objectives.supervised import SupervisedConfig, supervised_step

    cpu = torch.device("cpu")
    model = build_offline("tiny", device="cpu", seed=0)
    model.train()
    ema = EMATeacher(model)
    batch = build_batch(model, 2, cpu)
    cfg = PseudoGumbelConfig(max_caption_len=4, min_caption_len=4, topk=16)

    seen = []  # what training's call of pseudo_gumbel_step goes through, recorded directly

    @contextlib.contextmanager
    def record(stage):
        seen.append(stage)
        yield

    pseudo_gumbel_step(model, ema, batch, cfg, observer=record)
    assert tuple(seen) == pseudo_gumbel.STAGES == ("teacher", "mask", "pass1", "gumbel", "pass2", "loss")

    clock = StageClock(cpu)  # bench.step's timing observer
    pseudo_gumbel_step(model, ema, batch, cfg, observer=clock)
    assert tuple(clock.times) == tuple(seen) == BENCH_STAGES[: len(seen)]
    assert all(t > 0 for t in clock.times.values())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=TrainConfig().optim.lr)
    m = measure(model, optimizer, ema, cfg, batch, steps=1)
    assert tuple(m.stages) == tuple(seen)
    assert list(m.phases)[: len(seen)] == [PHASES[s] for s in seen]
    # memcheck measures the optimizer step training runs: the window's stages follow the step's
    from pg_train.accel import build_accelerator
    from pg_train.objectives.mix import objective_step
    from pg_train.window import WINDOW_STAGES, NonFiniteGuard, optimizer_window

    assert list(m.phases) == [PHASES[s] for s in seen] + list(WINDOW_STAGES)
    trained = []  # training's window, with the objective training calls (objective_step)

    @contextlib.contextmanager
    def record_training(stage):
        trained.append(stage)
        yield

    train_cfg = TrainConfig(objective=cfg)
    optimizer_window(
        iter([batch]),
        lambda b, observer: objective_step(model, ema, b, train_cfg, "pseudo_gumbel", observer),
        model=model,
        optimizer=optimizer,
        ema=ema,
        accelerator=build_accelerator(),
        grad_accum=1,
        grad_clip=1.0,
        guard=NonFiniteGuard(limit=2),
        step=0,
        observer=record_training,
    )
    assert trained == [*seen, *WINDOW_STAGES]

    sup = []
    supervised_step(
        model,
        {**batch, "captions": ["a red square", "a blue circle"]},
        cfg,
        SupervisedConfig(),
        observer=lambda stage: sup.append(stage) or contextlib.nullcontext(),
    )
    assert sup == [s for s in seen if s in ("pass1", "pass2", "loss")]
