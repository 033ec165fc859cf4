"""The EMA's staged update (`ema.update_stages`) and its allocation-free teacher swap.

References are written out here with plain per-tensor `torch.lerp_` loops and decays computed
from the definition, never with the EMA's own helpers: k=1 is bitwise the every-step EMA; with k
stages each tensor follows its own recursion with the k steps' compounded decay."""

import io
import math

import pytest
import torch

import pg_train.ema as ema_module
from pg_train.config import ConfigError, load_config
from pg_train.ema import EMATeacher, shard_tensors
from pg_train.model.io.state_check import CheckpointError

SIZES = (10_007, 4095, 3001, 999, 64, 1)


def make_student(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.ParameterList(
        [
            torch.nn.Parameter(torch.randn(n, generator=g).to(dtype if i % 2 == 0 else torch.float32))
            for i, n in enumerate(SIZES)
        ]
    )


def move(student, g):
    """An optimizer step: every trainable tensor changes in place."""
    with torch.no_grad():
        for p in student:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))


def warm_decay(d, m):
    return min(d, (1 + m) / (10 + m))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ema_module, "HOST_CHUNK", 999)  # chunk edges off every SIMD width, several per tensor


@pytest.mark.parametrize("placement, threads", [("same", 1), ("cpu", 1), ("cpu", 2), ("full:cpu", 1)])
def test_one_stage_is_bitwise_the_every_step_lerp(placement, threads):
    student, g = make_student(), torch.Generator().manual_seed(1)
    ema = EMATeacher(student, decay=0.97, placement=placement, warmup=True, host_threads=threads)
    reference = [p.detach().float().clone() for p in student]
    for n in range(6):
        move(student, g)
        ema.update(student)
        for r, p in zip(reference, student):
            r.lerp_(p.detach().float(), 1.0 - warm_decay(0.97, n))
        assert all(torch.equal(s, r) for s, r in zip(ema.shadow, reference)), f"step {n}"
    assert ema.updated_at == [5] * len(SIZES)


def test_shards_are_fixed_disjoint_and_balanced_by_elements():
    sizes = [7, 1000, 3, 998, 500, 499, 2, 2]
    shards = shard_tensors(sizes, 3)
    assert sorted(i for shard in shards for i in shard) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(sizes)  # greedy by size: within one tensor of even
    assert shard_tensors(sizes, 3) == shards and shard_tensors(sizes, 1) == [list(range(len(sizes)))]
    assert shard_tensors([5], 3) == [[0], [], []]  # more stages than tensors: empty shards
    with pytest.raises(ValueError, match="update_stages"):
        shard_tensors(sizes, 0)


@pytest.mark.parametrize("placement", ["same", "cpu"])
@pytest.mark.parametrize("k", [2, 3])
def test_each_tensor_follows_its_own_recursion_with_decay_to_the_k(placement, k):
    """Observed, not asked: which tensors change at each step; each must change once every k
    steps at a fixed phase, and equal its own lerp recursion: first update at step j with d^(j+1)
    (the steps since the start), then d^k (0.5: every power exact)."""
    student, g = make_student(), torch.Generator().manual_seed(2)
    ema = EMATeacher(student, decay=0.5, placement=placement, update_stages=k, host_threads=2)
    reference = [p.detach().float().clone() for p in student]
    phase: dict[int, int] = {}
    for n in range(4 * k):
        move(student, g)
        before = [s.clone() for s in ema.shadow]
        assert ema.current_decay() == 0.5 ** (k if n >= k else n + 1)  # what this update applies
        ema.update(student)
        changed = [i for i, (b, s) in enumerate(zip(before, ema.shadow)) if not torch.equal(b, s)]
        assert changed, f"step {n}: nothing changed"
        for i in changed:
            assert phase.setdefault(i, n % k) == n % k, f"tensor {i} moved off its phase at step {n}"
            r = reference[i]
            r.lerp_(student[i].detach().float(), 1.0 - 0.5 ** (k if n >= k else n + 1))
        assert all(torch.equal(ema.shadow[i], reference[i]) for i in range(len(SIZES))), f"step {n}"
    assert sorted(phase) == list(range(len(SIZES))) and set(phase.values()) == set(range(k))


def test_restart_mid_cycle_starts_a_new_first_cycle_from_the_student():
    """restart_from (the curriculum's switch) mid-cycle: the shadow is the student, and the next
    k updates are a first cycle again (shard j's first update applies d^(j+1)), with the log's
    terms measured afresh."""
    student, g = make_student(), torch.Generator().manual_seed(11)
    k = 3
    ema = EMATeacher(student, decay=0.5, placement="cpu", update_stages=k)
    for _ in range(k + 1):
        move(student, g)
        ema.update(student)
    ema.log_distance(student)
    move(student, g)
    ema.restart_from(student)
    assert all(torch.equal(s, p.detach().float()) for s, p in zip(ema.shadow, student))
    assert ema.num_updates == 0 and ema.updated_at == [-1] * len(SIZES) and ema.log_distance(student) == 0.0
    reference = [p.detach().float().clone() for p in student]
    for n in range(2 * k):
        move(student, g)
        before = [s.clone() for s in ema.shadow]
        ema.update(student)
        changed = [i for i, (b, s) in enumerate(zip(before, ema.shadow)) if not torch.equal(b, s)]
        assert changed, f"step {n}: nothing changed"
        for i in changed:
            reference[i].lerp_(student[i].detach().float(), 1.0 - 0.5 ** (k if n >= k else n + 1))
        assert all(torch.equal(s, r) for s, r in zip(ema.shadow, reference)), f"step {n}"


@pytest.mark.parametrize("warmup", [False, True])
def test_stages_keep_the_time_constant_of_the_every_step_ema(warmup):
    """With a student held constant after its first step, a tensor's staged shadow at the step
    its shard updates equals the every-step EMA's closed form x + (s0 - x) * prod of the decays
    of steps 0..n (warm-up included): staging changes when a tensor is written, not where to."""
    student = make_student(dtype=torch.float32)
    start = [p.detach().clone() for p in student]
    d, k = 0.9, 4
    ema = EMATeacher(student, decay=d, placement="cpu", update_stages=k, warmup=warmup)
    move(student, torch.Generator().manual_seed(3))
    target = [p.detach().clone() for p in student]
    for n in range(3 * k + 1):
        ema.update(student)
        factor = 1.0
        for m in range(n + 1):
            factor *= warm_decay(d, m) if warmup else d
        fresh = [i for i in range(len(SIZES)) if ema.updated_at[i] == n]
        assert fresh, f"step {n}"
        for i in fresh:
            torch.testing.assert_close(ema.shadow[i], target[i] + (start[i] - target[i]) * factor, rtol=1e-5, atol=1e-6)


def test_stages_with_warmup_compound_each_steps_decay():
    """Warm-up under stages: the update at step n applies prod(min(d, (1+m)/(10+m))) over the
    steps since the tensor's last update, bitwise (the product taken in step order)."""
    student, g = make_student(), torch.Generator().manual_seed(4)
    d, k = 0.999, 3
    ema = EMATeacher(student, decay=d, placement="cpu", update_stages=k, warmup=True)
    reference = [p.detach().float().clone() for p in student]
    last = [-1] * len(SIZES)
    for n in range(3 * k):
        move(student, g)
        before = [s.clone() for s in ema.shadow]
        ema.update(student)
        for i, (b, s) in enumerate(zip(before, ema.shadow)):
            if torch.equal(b, s):
                continue
            decay = 1.0
            for m in range(last[i] + 1, n + 1):
                decay *= warm_decay(d, m)
            reference[i].lerp_(student[i].detach().float(), 1.0 - decay)
            last[i] = n
        assert all(torch.equal(s, r) for s, r in zip(ema.shadow, reference)), f"step {n}"
    assert 0.1 * 0.1818 < ema.current_decay() < 1.0  # after the first steps: a product of k warm decays


@pytest.mark.parametrize("placement", ["same", "cpu"])
def test_resume_mid_cycle_continues_bitwise(placement):
    k = 3
    student, g = make_student(), torch.Generator().manual_seed(5)
    ema = EMATeacher(student, decay=0.99, placement=placement, update_stages=k, warmup=True)
    for _ in range(k + 1):  # mid-cycle: the next update is shard 1's
        move(student, g)
        ema.update(student)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    resumed = EMATeacher(student, decay=0.5, placement=placement, update_stages=k)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for _ in range(2 * k):
        move(student, g)
        ema.update(student)
        resumed.update(student)
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow, resumed.shadow))
        assert resumed.log_distance(student) == ema.log_distance(student)
    assert resumed.num_updates == ema.num_updates == 3 * k + 1


def test_a_checkpoint_without_updated_at_loads_as_every_tensor_written_by_the_last_update():
    student = make_student()
    ema = EMATeacher(student, decay=0.5, update_stages=2)
    move(student, torch.Generator().manual_seed(6))
    ema.update(student)
    ema.update(student)
    state = ema.state_dict()
    del state["updated_at"]  # written before staged updates existed
    fresh = EMATeacher(student, decay=0.5, update_stages=2)
    fresh.load_state_dict(state)
    assert fresh.updated_at == [1] * len(SIZES) and fresh.num_updates == 2
    bad = ema.state_dict()
    bad["updated_at"][ema.names[0]] = 2  # not before num_updates
    with pytest.raises(CheckpointError, match="updated_at"):
        fresh.load_state_dict(bad)
    assert fresh.updated_at == [1] * len(SIZES)  # refused: nothing loaded


@pytest.mark.parametrize("k", [1, 2])
def test_cpu_swap_backup_follows_optimizer_steps_that_do_not_bump_versions(k):
    """DeepSpeed's flat buffers and bitsandbytes' kernels write the student without moving its
    version counters (as `.data` does here): a staging filled before such a step must not be
    taken for the student's values after it."""
    student, g = make_student(), torch.Generator().manual_seed(10)
    ema = EMATeacher(student, decay=0.9, placement="cpu", update_stages=k)
    with ema.as_teacher(student):
        pass  # the staging now holds the student's values
    versions = [p._version for p in student]
    with torch.no_grad():
        for p in student:
            p.data.add_(torch.randn(p.shape, generator=g).to(p.dtype))  # an optimizer step, unseen
    assert [p._version for p in student] == versions
    stepped = [p.detach().clone() for p in student]
    ema.update(student)
    with ema.as_teacher(student):
        pass
    assert all(torch.equal(p.detach(), b) for p, b in zip(student, stepped))


def test_full_teacher_copies_only_what_changed_and_is_always_the_shadows_rounding():
    student, g = make_student(), torch.Generator().manual_seed(9)
    ema = EMATeacher(student, decay=0.8, placement="full:cpu", update_stages=3)
    for n in range(7):
        move(student, g)
        ema.update(student)
        if n in (1, 2, 5):  # skipped syncs: the next one catches up on every shard written since
            continue
        teacher = ema.synced_copy()
        for p, s in zip(teacher.parameters(), ema.shadow):
            assert torch.equal(p, s.to(p.dtype)), f"step {n}"
    state = ema.state_dict()
    state["shadow"] = [s + 1 for s in state["shadow"]]
    ema.load_state_dict(state)  # a load rewrites every tensor: all copied
    assert all(torch.equal(p, s.to(p.dtype)) for p, s in zip(ema.synced_copy().parameters(), ema.shadow))


@pytest.mark.parametrize("value, message", [("0", "must be an integer >= 1"), ("1.5", "expected an integer")])
def test_update_stages_config_is_validated_naming_the_key(value, message):
    with pytest.raises(ConfigError, match=rf"^ema.update_stages: {message}"):
        load_config(overrides=[f"ema.update_stages={value}"])
    assert load_config(overrides=["ema.update_stages=4"]).ema.update_stages == 4
    assert load_config().ema.update_stages == 1


def test_a_bad_update_stages_exits_2_before_anything_is_built(tmp_path, capsys):
    from pg_train.cli import main

    assert main(["--output-dir", str(tmp_path / "run"), "ema.update_stages=0"]) == 2
    assert "ema.update_stages" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_log_distance_is_exact_with_one_stage_and_each_shards_own_with_k():
    def distance(indices, student, shadow) -> float:
        return math.sqrt(sum(float(((student[i].detach().double() - shadow[i].double()) ** 2).sum()) for i in indices))

    student, g = make_student(), torch.Generator().manual_seed(7)
    one = EMATeacher(student, decay=0.9, placement="cpu")
    two = EMATeacher(student, decay=0.9, placement="cpu", update_stages=2)
    terms = {}
    for n in range(4):
        move(student, g)
        one.update(student)
        two.update(student)
        assert one.log_distance(student) == one.distance_to(student)
        assert one.distance_to(student) == pytest.approx(distance(range(len(SIZES)), student, one.shadow), rel=1e-5)
        fresh = [i for i in range(len(SIZES)) if two.updated_at[i] == n]
        terms[n % 2] = distance(fresh, student, two.shadow) ** 2
        if n == 0:  # shard 1 not updated yet: measured now
            terms[1] = distance([i for i in range(len(SIZES)) if i not in fresh], student, two.shadow) ** 2
        assert two.log_distance(student) == pytest.approx(math.sqrt(terms[0] + terms[1]), rel=1e-5)
    assert two.log_distance(student) != pytest.approx(two.distance_to(student), rel=1e-3)  # a term is a step old


@pytest.mark.parametrize("k", [1, 2])
def test_cpu_swap_restores_bitwise_rounds_the_shadow_and_allocates_nothing_after_the_first(k, monkeypatch):
    student, g = make_student(), torch.Generator().manual_seed(8)
    ema = EMATeacher(student, decay=0.9, placement="cpu", update_stages=k, host_threads=2)
    for _ in range(3):
        move(student, g)
        ema.update(student)
    copied = []
    real_copy = ema_module.host_copy_
    monkeypatch.setattr(
        ema_module, "host_copy_", lambda dst, src, pool: (copied.append(len(dst)), real_copy(dst, src, pool))
    )

    def swap_and_check():
        before = [p.detach().clone() for p in student]
        with ema.as_teacher(student) as teacher:
            for p, s in zip(teacher.parameters(), ema.shadow):
                assert torch.equal(p.detach(), s.to(p.dtype))  # exactly the shadow's rounding
        assert all(torch.equal(p.detach(), b) for p, b in zip(student, before))  # restored bitwise
        return [t.data_ptr() for t in ema._staging + [m for m in ema._mirror if m is not None]]

    buffers = swap_and_check()
    assert copied[:2] == [len(SIZES), len(SIZES)]  # the student into the staging, the teacher in
    copied.clear()

    def refuse(*args, **kwargs):
        raise AssertionError("allocated during the swap")

    with monkeypatch.context() as patch:  # the second swap: no buffer made, none copied twice
        for name in ("empty", "empty_like", "zeros_like"):
            patch.setattr(torch, name, refuse)
        for name in ("clone", "to", "pin_memory", "contiguous"):
            patch.setattr(torch.Tensor, name, refuse)
        with ema.as_teacher(student):
            pass
    assert copied[:2] == [0, len(SIZES)]  # the staging still held the student: not copied again
    assert swap_and_check() == buffers
    with torch.no_grad():
        student[3].mul_(2.0)  # one tensor changes: only it is copied, and it is what comes back
    copied.clear()
    assert swap_and_check() == buffers and copied[:2] == [1, len(SIZES)]
    with pytest.raises(RuntimeError, match="boom"):
        with ema.as_teacher(student):
            raise RuntimeError("boom")
    move(student, g)
    ema.update(student)
    assert swap_and_check() == buffers  # the mirror follows the staged update's chunks


@pytest.mark.slow
def test_a_staged_cpu_ema_run_resumed_mid_cycle_equals_the_uninterrupted_run(tmp_path):
    """The training loop end to end (tiny, pseudo-Gumbel, placement cpu, k=3): stopped after
    step 2 (the next update is shard 2's) and resumed, the teacher and the logged distance equal
    the run that never stopped."""
    from test_train import FAST, metrics

    from pg_train.train import train

    args = [*FAST, "objective_kind=pseudo_gumbel", "ema.placement=cpu", "ema.update_stages=3", "ema.decay=0.5"]
    whole = train(load_config([], [*args, f"output_dir={tmp_path / 'whole'}", "max_steps=3", "save_every=100"]))
    split = [*args, f"output_dir={tmp_path / 'split'}", "save_every=2"]
    train(load_config([], [*split, "max_steps=2"]))
    resumed = train(load_config([], [*split, "max_steps=3", "resume=auto"]))
    assert resumed.ema.num_updates == whole.ema.num_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(whole.ema.shadow, resumed.ema.shadow))
    logged = [[r["ema_distance"] for r in metrics(tmp_path / name)] for name in ("whole", "split")]
    assert logged[0] == logged[1] and logged[0][0] > 0
