"""The EMA teacher: fp32 shadow, placements, exact restore, accumulation, checkpoints."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_batch

from pg_train.ema import EMATeacher
from pg_train.model import build_model
from pg_train.model.text.regions import region_cells
from pg_train.objectives.settings import PseudoGumbelConfig
from pg_train.objectives.teacher import generate_pseudo_tokens_with_ema


def perturb_trainable(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_shadow_is_fp32_and_covers_exactly_the_trainable_tensors():
    model = build_model("tiny", seed=0)
    ema = EMATeacher(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert ema.names == trainable
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    frozen_bytes = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert ema.memory_bytes() == {"cpu": sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)}
    assert ema.memory_bytes()["cpu"] < frozen_bytes  # the frozen base is shared, not copied


def test_placement_same_cpu_and_full_give_identical_captions():
    student = build_model("tiny", seed=0)
    perturb_trainable(student, seed=1)
    pixel_values, _, masks = make_batch(student)
    cells, _ = region_cells(masks, student.grid_size)
    cfg = PseudoGumbelConfig(max_caption_len=10)
    captions = {}
    emas = {p: EMATeacher(student, decay=0.9, placement=p) for p in ("same", "cpu", "full:cpu")}
    perturb_trainable(student, seed=2)  # the student moves away; every EMA follows it the same way
    for placement, ema in emas.items():
        ema.update(student)
        ids, lengths = generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student)
        captions[placement] = (ids.tolist(), lengths.tolist())
    assert captions["same"] == captions["cpu"] == captions["full:cpu"]
    # ... and they are the EMA's captions, not the student's.
    student_ids, _ = generate_pseudo_tokens_with_ema(student, pixel_values, cells, cfg)
    assert student_ids.tolist() != captions["same"][0]
    assert emas["full:cpu"].memory_bytes()["cpu"] > emas["same"].memory_bytes()["cpu"]


def test_restore_after_swap_is_bitwise_even_on_error():
    student = build_model("tiny", seed=0, dtype=torch.bfloat16)
    ema = EMATeacher(student, placement="cpu")
    perturb_trainable(student, seed=3)
    before = snapshot(student)
    with ema.as_teacher(student) as teacher:
        assert teacher is student
        lora = next(n for n in ema.names if "lora_B" in n)
        assert not torch.equal(dict(teacher.named_parameters())[lora], before[lora])  # swapped in
    after = snapshot(student)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.as_teacher(student):
            raise RuntimeError("boom")
    after_error = snapshot(student)
    assert all(torch.equal(before[k], after_error[k]) for k in before)


def test_fp32_shadow_follows_slow_bf16_drift_like_fp64_reference():
    """At decay 0.999 a bf16 shadow loses most updates; the fp32 shadow tracks an fp64 reference."""
    param = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.w = param
    ema = EMATeacher(model, decay=0.999)
    reference = torch.ones(64, dtype=torch.float64)
    bf16_shadow = torch.ones(64, dtype=torch.bfloat16)
    for step in range(1, 301):
        with torch.no_grad():
            param.fill_(1.0 + 0.01 * step)  # the student drifts slowly (values rounded to bf16)
        ema.update(model)
        reference = 0.999 * reference + 0.001 * param.detach().double()
        bf16_shadow = (0.999 * bf16_shadow + 0.001 * param.detach()).to(torch.bfloat16)
    moved = float(reference[0] - 1.0)
    assert moved > 0.3
    torch.testing.assert_close(ema.shadow[0].double(), reference, rtol=1e-6, atol=1e-6)
    # The failure mode this guards against: a bf16 shadow loses most of the movement.
    assert abs(float(bf16_shadow[0]) - float(reference[0])) > 0.5 * moved


def test_closed_form_after_n_updates():
    model = torch.nn.Linear(3, 2)
    ema = EMATeacher(model, decay=0.9)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.5)
    for _ in range(7):
        ema.update(model)
    for s, s0 in zip(ema.shadow, start):
        torch.testing.assert_close(s, 2.5 + (s0 - 2.5) * 0.9**7, rtol=1e-6, atol=1e-6)
    # warm-up: decay_n = min(d, (1+n)/(10+n))
    warm = EMATeacher(model, decay=0.999, warmup=True)
    assert [round(warm.current_decay(), 6) for _ in range(1)] == [0.1]
    warm.num_updates = 990
    assert warm.current_decay() == pytest.approx(991 / 1000)
    warm.num_updates = 100_000
    assert warm.current_decay() == 0.999


def test_accumulation_four_microbatches_make_one_update():
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMATeacher(model, decay=0.5)
    updates = []
    for micro in range(8):
        with accelerator.accumulate(model):
            loss = model(torch.randn(2, 4)).pow(2).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        updates.append(ema.update_if_stepped(model, accelerator))
    assert updates == [False, False, False, True] * 2
    assert ema.num_updates == 2


def test_checkpoint_state_resumes_in_a_fresh_process(tmp_path):
    student = build_model("tiny", seed=0)
    ema = EMATeacher(student, decay=0.9)
    for seed in range(3):
        perturb_trainable(student, seed)
        ema.update(student)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    script = textwrap.dedent(f"""
        import torch
        from pg_train.ema import EMATeacher
        from pg_train.model import build_model
        ema = EMATeacher(build_model("tiny", seed=0), decay=0.5)
        ema.load_state_dict(torch.load({str(tmp_path / "ema.pt")!r}, weights_only=True))
        print(repr(ema.checksum()), ema.num_updates, ema.decay)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) == ema.checksum() and out[1:] == ["3", "0.9"]
    other = EMATeacher(build_model("tiny", seed=0, lora=False))
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(ema.state_dict())


@pytest.mark.slow
def test_ranks_hold_identical_shadows_under_zero2_on_two_processes(tmp_path):
    import json

    from conftest import accelerate_launch

    accelerate_launch("tests/dist/ema_ranks.py", str(tmp_path / "result"))
    ranks = [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["ema_updates"] == ranks[1]["ema_updates"] == 3
    assert ranks[0]["ema_checksum"] == ranks[1]["ema_checksum"]
    assert ranks[0]["trainable_checksum"] == ranks[1]["trainable_checksum"]  # gradients were reduced
    # ZeRO-2: each rank holds about half of the two Adam moments.
    for r in ranks:
        assert r["optimizer_state_elements"] < 1.2 * r["trainable_elements"]
    assert sum(r["optimizer_state_elements"] for r in ranks) >= 2 * ranks[0]["trainable_elements"]


@pytest.mark.parametrize("placement", ["same", "cpu", "full:cpu"])
def test_predicted_bytes_equal_held_bytes(placement):
    student = build_model("tiny", seed=0)
    ema = EMATeacher(student, placement=placement)
    assert ema.memory_bytes() == EMATeacher.predicted_bytes(
        student, placement, training_device="cpu", model_dtype=torch.float32
    )


def test_teacher_generates_without_dropout_and_restores_train_mode():
    import dataclasses

    from pg_train.model.arch.presets import PRESETS

    lora = dataclasses.replace(PRESETS["tiny"].lora, dropout=0.5)
    student = build_model("tiny", seed=0, lora=lora).train()
    perturb_trainable(student, seed=4, scale=0.3)
    ema = EMATeacher(student, placement="same")
    pixel_values, _, masks = make_batch(student)
    cells, _ = region_cells(masks, student.grid_size)
    cfg = PseudoGumbelConfig(max_caption_len=12)
    first, _ = generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student)
    second, _ = generate_pseudo_tokens_with_ema(ema, pixel_values, cells, cfg, student=student)
    assert student.training and torch.equal(first, second)
    student.eval()
    with ema.as_teacher(student) as teacher:
        reference, _ = generate_pseudo_tokens_with_ema(teacher, pixel_values, cells, cfg)
    assert torch.equal(first, reference)


@pytest.mark.parametrize("host_threads", [1, 8])
def test_cpu_placement_host_update_is_bitwise_the_single_foreach_lerp(host_threads, monkeypatch):
    """placement=cpu updates in chunks over host threads; the shadow must stay bitwise what one
    `torch._foreach_lerp_` over fp32 copies (the update before the threads) gives. Chunks of 999
    elements put chunk edges off every SIMD width, bf16 tensors test the per-chunk conversion."""
    import pg_train.ema as ema_module

    monkeypatch.setattr(ema_module, "HOST_CHUNK", 999)
    g = torch.Generator().manual_seed(0)
    student = torch.nn.ParameterList(
        [
            torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype))
            for n in (1, 4095, 10_007)
            for dtype in (torch.float32, torch.bfloat16)
        ]
    )
    ema = EMATeacher(student, decay=0.97, placement="cpu", host_threads=host_threads, warmup=True)
    reference = [p.detach().float().clone() for p in student]
    for step in range(5):
        with torch.no_grad():
            for p in student:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        weight = 1.0 - ema.current_decay()
        torch._foreach_lerp_(reference, [p.detach().to(torch.float32) for p in student], weight)
        ema.update(student)
        assert all(torch.equal(s, r) for s, r in zip(ema.shadow, reference)), f"step {step}"
    assert not torch.equal(ema.shadow[2], student[2].detach())  # it moved, and not onto the student


def test_cpu_placement_distance_fused_into_the_update_is_the_distance_and_never_stale(monkeypatch):
    """The step log's distance comes from the update's own pass (placement=cpu); it must equal
    the distance between the student and the shadow as they are (a float64 reference), before
    and after the student changes, and after the shadow is loaded or restarted."""
    import pg_train.ema as ema_module

    monkeypatch.setattr(ema_module, "HOST_CHUNK", 999)
    g = torch.Generator().manual_seed(1)
    student = torch.nn.ParameterList(
        [
            torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype))
            for n, dtype in ((4095, torch.bfloat16), (3001, torch.float32))
        ]
    )

    def reference(ema) -> float:
        return float(sum(((p.detach().double() - s.double()) ** 2).sum() for p, s in zip(student, ema.shadow)) ** 0.5)

    ema = EMATeacher(student, decay=0.9, placement="cpu", host_threads=2)
    for _ in range(3):
        with torch.no_grad():
            for p in student:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        values = [p.detach().clone() for p in student]
        ema.update(student)
        fused = ema.distance_to(student)
        assert fused > 0 and fused == pytest.approx(reference(ema), rel=1e-5)
        assert all(torch.equal(p.detach(), v) for p, v in zip(student, values))  # the fp32 student is not scratch
    with torch.no_grad():
        student[1].mul_(2.0)  # the student changed after the update: the fused value is stale
    assert ema.distance_to(student) == pytest.approx(reference(ema), rel=1e-5)
    state = ema.state_dict()
    state["shadow"] = [s + 1 for s in state["shadow"]]
    ema.load_state_dict(state)  # same num_updates, same student, another shadow
    assert ema.distance_to(student) == pytest.approx(reference(ema), rel=1e-5)
    ema.restart_from(student)
    assert ema.distance_to(student) == 0.0
