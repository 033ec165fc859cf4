"""Resume validates everything it loads before loading any of it; checkpoints are written only
from finite state; `--resume auto` falls back to the newest checkpoint that validates (issue 27)."""

import json
import shutil

import pytest
import torch
from test_checkpoint_hardening import FAST, edit_tensors, set_value

from pg_train.config import load_config
from pg_train.model import CheckpointError, build_model, from_pretrained, save_pretrained
from pg_train.model.io.state_check import check_state_dict
from pg_train.train import NonFiniteStateError, train


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A real 4-step tiny run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "a"
    result = train(load_config([], [*FAST, f"output_dir={out}", "max_steps=4", "save_every=2", "keep_last=2"]))
    assert result.exit_code == 0
    return out


@pytest.fixture
def run(two_checkpoints, tmp_path):
    return shutil.copytree(two_checkpoints, tmp_path / "run")


@pytest.fixture
def load_calls(monkeypatch):
    """Every call of Accelerate's load_state (nothing may load from a refused checkpoint)."""
    from accelerate import Accelerator

    calls = []
    original = Accelerator.load_state
    monkeypatch.setattr(
        Accelerator, "load_state", lambda self, path, **kw: calls.append(path) or original(self, path, **kw)
    )
    return calls


def resume(out, target="auto", max_steps=6):
    return train(
        load_config([], [*FAST, f"output_dir={out}", f"max_steps={max_steps}", "save_every=2", f"resume={target}"])
    )


def step_dir(out, step):
    return out / "checkpoints" / f"step-{step:08d}"


def edit_optimizer(path, edit):
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)


def first_moment(state, key="exp_avg"):
    index = sorted(state["state"])[-1]  # the last trainable tensor's moments
    return state["state"][index], key


OPTIMIZER_DAMAGE = {
    "moment_nan": (lambda s: first_moment(s)[0]["exp_avg"].view(-1).__setitem__(0, float("nan")), r"exp_avg.*1 NaN"),
    "moment_inf": (
        lambda s: first_moment(s)[0]["exp_avg_sq"].view(-1).__setitem__(0, float("inf")),
        r"exp_avg_sq.*1 Inf",
    ),
    "moment_wrong_shape": (
        lambda s: first_moment(s)[0].update(exp_avg=torch.zeros(7)),
        r"text_hidden_fcs\.2\.bias \(exp_avg\): torch\.float32 \[7\], parameter torch\.float32 \[",
    ),
    "moment_float64": (
        lambda s: first_moment(s)[0].update(exp_avg=first_moment(s)[0]["exp_avg"].double()),
        r"\(exp_avg\): torch\.float64 .*parameter torch\.float32",
    ),
    "group_lost_a_tensor": (lambda s: s["param_groups"][0]["params"].pop(), r"parameter groups of \[\d+\] tensors"),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_DAMAGE))
def test_tampered_optimizer_state_is_refused_named_and_nothing_loads(run, load_calls, case):
    edit, message = OPTIMIZER_DAMAGE[case]
    edit_optimizer(step_dir(run, 4) / "optimizer.bin", edit)
    with pytest.raises(CheckpointError, match=message) as err:
        resume(run, step_dir(run, 4))
    assert "optimizer.bin" in str(err.value) and load_calls == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_optimizer_file_is_refused_naming_it(run, load_calls, damage):
    path = step_dir(run, 4) / "optimizer.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 100)
    with pytest.raises(CheckpointError, match=r"step-00000004/optimizer\.bin: unreadable"):
        resume(run, step_dir(run, 4))
    assert load_calls == []


def tamper_rng(path):
    state = torch.load(path, weights_only=True)
    state["torch"] = state["torch"][:100]
    torch.save(state, path)


def tamper_trainer_state(key, value):
    def edit(path):
        state = json.loads(path.read_text())
        state["data"][key] = value
        path.write_text(json.dumps(state))

    return edit


RANK_FILE_DAMAGE = {
    "rng_state_rank0.pt": (tamper_rng, "random state does not load"),
    "trainer_state_rank0.json": (tamper_trainer_state("batches_done", -1), r"batches_done=-1"),
    "random_states_0.pkl": (lambda p: p.write_bytes(b"not a pickle"), "unreadable"),
    "custom_checkpoint_0.pkl": (lambda p: p.write_bytes(b"not a pickle"), "unreadable EMA state"),
}


@pytest.mark.parametrize("name", sorted(RANK_FILE_DAMAGE))
def test_every_file_resume_reads_is_validated_first(run, load_calls, name):
    edit, message = RANK_FILE_DAMAGE[name]
    edit(step_dir(run, 4) / name)
    with pytest.raises(CheckpointError, match=message) as err:
        resume(run, step_dir(run, 4))
    assert name in str(err.value) and load_calls == []


def test_data_position_from_another_seed_is_refused(run, load_calls):
    tamper_trainer_state("seed", 12345)(step_dir(run, 4) / "trainer_state_rank0.json")
    with pytest.raises(CheckpointError, match=r"trainer_state_rank0\.json: data state: seed=12345"):
        resume(run, step_dir(run, 4))
    assert load_calls == []


def test_resume_auto_falls_back_to_the_newest_checkpoint_that_validates(run, capsys):
    edit_optimizer(step_dir(run, 4) / "optimizer.bin", OPTIMIZER_DAMAGE["moment_nan"][0])
    result = resume(run, "auto", max_steps=5)
    out = capsys.readouterr().out
    assert "--resume auto: skipping step-00000004:" in out and "optimizer.bin" in out
    assert f"resumed from {step_dir(run, 2)} at step 2" in out
    assert result.exit_code == 0 and result.step == 5


def test_resume_auto_refuses_when_no_checkpoint_validates(run, load_calls):
    for step in (2, 4):
        edit_tensors(step_dir(run, step) / "model.safetensors", set_value("mlp1.1.weight", (0, 0), float("nan")))
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* validates"):
        resume(run, "auto")
    assert load_calls == []


# ---- only finite state is saved ------------------------------------------------------------------
def poison_after_step(monkeypatch, target: str, at_step: int):
    """After optimizer step `at_step` (1-based), put a NaN into the weights, the EMA shadow or an
    Adam moment, as a bad update would."""
    import pg_train.train as train_module

    original = train_module.optimizer_window

    def window(*args, **kwargs):
        result = original(*args, **kwargs)
        if kwargs["step"] + 1 == at_step:
            optimizer, ema = kwargs["optimizer"], kwargs["ema"]
            with torch.no_grad():
                if target == "weights":
                    next(p for p in kwargs["model"].parameters() if p.requires_grad).view(-1)[0] = float("nan")
                elif target == "ema":
                    ema.shadow[-1].view(-1)[0] = float("inf")
                else:
                    next(iter(optimizer.optimizer.state.values()))[target].view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(train_module, "optimizer_window", window)


@pytest.mark.parametrize("target", ["weights", "ema", "exp_avg", "exp_avg_sq"])
def test_nonfinite_state_is_never_checkpointed_and_the_last_good_one_survives(tmp_path, monkeypatch, target):
    poison_after_step(monkeypatch, target, at_step=3)
    cfg = load_config([], [*FAST, f"output_dir={tmp_path}", "max_steps=6", "save_every=2", "keep_last=1"])
    with pytest.raises(NonFiniteStateError, match=r"step 4: the training state holds NaN or Inf") as err:
        train(cfg)
    kinds = {
        "weights": "weights: ",
        "ema": "EMA shadow: ",
        "exp_avg": "optimizer state: ",
        "exp_avg_sq": "optimizer state: ",
    }
    assert kinds[target] in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_fp32_master_partitions_are_checked_before_a_save():
    """ZeRO-2 keeps the fp32 master weights in the optimizer (`single_partition_of_fp32_groups`)."""
    from pg_train.checkpoint_check import nonfinite_training_state

    class Zero:
        def __init__(self):
            self.single_partition_of_fp32_groups = [torch.zeros(10), torch.zeros(4)]
            self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])

    class Wrapper:
        def __init__(self):
            self.optimizer = Zero()

    wrapper, model = Wrapper(), torch.nn.Linear(2, 2)
    assert nonfinite_training_state(model, None, wrapper) == []
    wrapper.optimizer.single_partition_of_fp32_groups[1][2] = float("nan")
    assert nonfinite_training_state(model, None, wrapper) == ["fp32 master copy: [1]: 1 NaN, 0 Inf of 4"]


# ---- dtypes: what the layout declares; finiteness after the cast -------------------------------------
def test_float64_beyond_float32_range_is_refused_after_the_cast():
    expected = {"w": torch.zeros(3)}
    huge = {"w": torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64)}
    assert torch.isfinite(huge["w"]).all()
    with pytest.raises(CheckpointError, match=r"w: 0 NaN, 1 Inf of 3"):
        check_state_dict(expected, huge, "f", exact_dtype=False)  # a kind-only layout: caught after the cast
    with pytest.raises(CheckpointError, match=r"w: checkpoint torch\.float64, model torch\.float32"):
        check_state_dict(expected, huge, "f", exact_dtype=True)


def test_init_from_float64_tensor_is_refused_by_dtype(run):
    from test_checkpoint_hardening import PROBE, changed_tensors, snapshot

    from pg_train.train import build_student, load_training_weights

    edit_tensors(step_dir(run, 4) / "model.safetensors", lambda s: s.update({PROBE: s[PROBE].double() * 1e300}))
    model = build_student(load_config([], []))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=rf"{PROBE}: checkpoint torch\.float64, model torch\.float32"):
        load_training_weights(model, step_dir(run, 4))
    assert changed_tensors(model, before) == []


def test_training_checkpoint_weight_in_another_dtype_is_refused_on_resume(run, load_calls):
    edit_tensors(
        step_dir(run, 4) / "model.safetensors", lambda s: s.update({"mlp1.1.weight": s["mlp1.1.weight"].half()})
    )
    with pytest.raises(CheckpointError, match=r"mlp1\.1\.weight: checkpoint torch\.float16, model torch\.float32"):
        resume(run, step_dir(run, 4))
    assert load_calls == []


@pytest.mark.parametrize(
    "declared, stored, refused",
    [
        ("bfloat16", torch.float64, True),
        ("bfloat16", torch.float16, True),
        ("bfloat16", torch.float32, False),
        (None, torch.float64, True),
    ],
)
def test_released_checkpoint_dtypes_follow_config_torch_dtype(tmp_path, declared, stored, refused):
    directory = save_pretrained(build_model("tiny", seed=0), tmp_path / "m", dtype=torch.bfloat16)
    config = json.loads((directory / "config.json").read_text())
    if declared is None:
        del config["torch_dtype"]
    (directory / "config.json").write_text(json.dumps(config))
    edit_tensors(directory / "model.safetensors", lambda s: s.update({"mlp1.1.weight": s["mlp1.1.weight"].to(stored)}))
    if refused:
        with pytest.raises(CheckpointError, match=rf"mlp1\.1\.weight: {stored}"):
            from_pretrained(directory)
    else:
        from_pretrained(directory)
