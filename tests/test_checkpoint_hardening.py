"""Every checkpoint pg_train reads (released format, `model.init_from`, resume, the EMA state),
tampered with: a refused load is a CheckpointError naming the file and the tensors, and the
model's weights are bitwise unchanged after it; NaN/Inf load only when asked for."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pg_train.config import load_config
from pg_train.ema import EMATeacher
from pg_train.model import CheckpointError, build_model, from_pretrained, save_pretrained
from pg_train.train import build_student, load_training_weights, train

FAST = [
    "batch_size=2",
    "objective.max_caption_len=6",
    "objective.topk=16",
    "data.num_samples=8",
    "tensorboard=false",
    "progress=false",
    "report=false",
]
PROBE = "mlp1.1.weight"  # a trainable tensor every tiny model has
LAST = "text_hidden_fcs.2.bias"


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_tensors(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    after = module.state_dict()
    return [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]


# ---- released-format checkpoints (from_pretrained) ------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A single-file and a sharded released checkpoint of one tiny model."""
    root = tmp_path_factory.mktemp("released")
    model = build_model("tiny", seed=3)
    save_pretrained(model, root / "single")
    save_pretrained(model, root / "sharded", max_shard_bytes=200_000)
    return root


@pytest.fixture
def single(released, tmp_path):
    return shutil.copytree(released / "single", tmp_path / "single")


@pytest.fixture
def sharded(released, tmp_path):
    path = shutil.copytree(released / "sharded", tmp_path / "sharded")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def edit_tensors(path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def shard_holding(directory, name: str):
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    return directory / weight_map[name]


def set_value(name: str, index: tuple, value: float):
    def edit(state):
        state[name] = state[name].clone()
        state[name][index] = value

    return edit


def test_nonfinite_checkpoint_from_pretrained_is_refused_naming_the_tensors(single):
    edit_tensors(
        single / "model.safetensors",
        lambda s: (set_value(PROBE, (0, 0), float("nan"))(s), set_value(LAST, (1,), float("inf"))(s)),
    )
    with pytest.raises(CheckpointError, match=r"2 tensors hold NaN or Inf") as err:
        from_pretrained(single)
    assert (
        f"{PROBE}: 1 NaN, 0 Inf" in str(err.value)
        and f"{LAST}: 0 NaN, 1 Inf" in str(err.value)
        and str(single) in str(err.value)
    )
    # The opt-in loads them as stored.
    model = from_pretrained(single, allow_nonfinite=True)
    assert torch.isnan(model.state_dict()[PROBE][0, 0]) and torch.isinf(model.state_dict()[LAST][1])


def test_nonfinite_checkpoint_after_the_dtype_cast_is_refused(single):
    """1e6 is finite in float32 and Inf in float16: what would load is what is checked."""
    edit_tensors(single / "model.safetensors", set_value(PROBE, (0, 1), 1e6))
    assert from_pretrained(single, dtype=torch.float32).state_dict()[PROBE][0, 1] == 1e6
    with pytest.raises(CheckpointError, match=rf"{PROBE}: 0 NaN, 1 Inf"):
        from_pretrained(single, dtype=torch.float16)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zero_bytes"])
def test_shard_error_names_file(sharded, damage):
    """The library's own message names no file; ours names the shard."""
    shard = shard_holding(sharded, LAST)
    data = shard.read_bytes()
    shard.write_bytes({"garbage": b"\x00\xff" * 64, "truncated": data[: len(data) // 2], "zero_bytes": b""}[damage])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: unreadable safetensors file"):
        from_pretrained(sharded)


def test_shard_error_names_file_for_a_single_file_and_init_from(single, tmp_path):
    (single / "model.safetensors").write_bytes(b"{not a header")
    with pytest.raises(CheckpointError, match=r"single/model\.safetensors: unreadable safetensors file"):
        from_pretrained(single)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match=r"run/model\.safetensors: unreadable safetensors file"):
        load_training_weights(build_model("tiny", seed=0), tmp_path / "run")


@pytest.mark.parametrize(
    "section, key, ours, value",
    [
        ("llm_config", "vocab_size", "language.vocab_size", 500),
        ("llm_config", "num_hidden_layers", "language.num_layers", 7),
        ("llm_config", "hidden_size", "language.hidden_size", 4096),
        ("vision_config", "hidden_size", "vision.hidden_size", 1024),
        (None, "downsample_ratio", "vision.downsample_ratio", 0.25),
    ],
)
def test_config_sections_disagree(single, section, key, ours, value):
    path = single / "config.json"
    config = json.loads(path.read_text())
    target = config if section is None else config[section]
    section_name, attribute = ours.split(".")
    mine = config["pg_train"]["preset"][section_name][attribute]
    assert target[key] == mine != value  # the file was consistent before the edit
    target[key] = value
    path.write_text(json.dumps(config))
    released_name = f"{section}.{key}" if section else key
    with pytest.raises(CheckpointError, match="disagree") as err:
        from_pretrained(single)
    assert f"{released_name} = {value!r} but pg_train.preset.{ours} = {mine!r}" in str(
        err.value
    ) and "config.json" in str(err.value)


def test_consistent_config_json_sections_load(single):
    assert (
        from_pretrained(single).preset.language.vocab_size
        == json.loads((single / "config.json").read_text())["llm_config"]["vocab_size"]
    )


def _drop(name):
    return lambda state: state.pop(name)


# (case id, how the checkpoint directory is damaged, what the error must say)
RELEASED_CORPUS = [
    (
        "weights_garbage",
        lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10),
        "model.safetensors: unreadable",
    ),
    (
        "weights_truncated",
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors: unreadable",
    ),
    ("weights_zero_bytes", lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors: unreadable"),
    ("weights_missing", lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    ("tensor_missing", lambda d: edit_tensors(d / "model.safetensors", _drop(LAST)), "1 missing tensors"),
    (
        "tensor_extra",
        lambda d: edit_tensors(d / "model.safetensors", lambda s: s.update({"extra.weight": torch.zeros(2)})),
        "1 unexpected tensors",
    ),
    (
        "tensor_wrong_shape",
        lambda d: edit_tensors(d / "model.safetensors", lambda s: s.update({LAST: torch.zeros(3)})),
        "wrong shape",
    ),
    (
        "tensor_integer_dtype",
        lambda d: edit_tensors(d / "model.safetensors", lambda s: s.update({LAST: s[LAST].to(torch.int32)})),
        "wrong dtype kind",
    ),
    ("tensor_nan", lambda d: edit_tensors(d / "model.safetensors", set_value(LAST, (0,), float("nan"))), "NaN or Inf"),
    (
        "tensor_minus_inf",
        lambda d: edit_tensors(d / "model.safetensors", set_value(PROBE, (2, 2), float("-inf"))),
        "NaN or Inf",
    ),
    ("config_garbage", lambda d: (d / "config.json").write_text("{ nope"), "config.json: not valid JSON"),
    ("config_a_list", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: must be a JSON object"),
    (
        "config_preset_incomplete",
        lambda d: (d / "config.json").write_text(json.dumps({"pg_train": {"preset": {"name": "x"}}})),
        "pg_train.preset is incomplete",
    ),
    ("config_missing", lambda d: (d / "config.json").unlink(), "config.json: missing"),
]
SHARDED_CORPUS = [
    ("index_garbage", lambda d: (d / "model.safetensors.index.json").write_text("]["), "unreadable index"),
    (
        "index_map_is_a_list",
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]})),
        "weight_map must map",
    ),
    ("shard_missing", lambda d: shard_holding(d, LAST).unlink(), "lists shard files that do not exist"),
    ("shard_lacks_a_mapped_tensor", lambda d: edit_tensors(shard_holding(d, LAST), _drop(LAST)), "does not hold them"),
    ("shard_garbage", lambda d: shard_holding(d, PROBE).write_bytes(b"\xff" * 100), "unreadable safetensors file"),
]


@pytest.mark.parametrize("case, damage, message", RELEASED_CORPUS, ids=[c[0] for c in RELEASED_CORPUS])
def test_adversarial_released_checkpoint_is_a_checkpoint_error(single, case, damage, message):
    damage(single)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")) as err:
        from_pretrained(single)
    assert str(single) in str(err.value)


@pytest.mark.parametrize("case, damage, message", SHARDED_CORPUS, ids=[c[0] for c in SHARDED_CORPUS])
def test_adversarial_sharded_checkpoint_is_a_checkpoint_error(sharded, case, damage, message):
    damage(sharded)
    with pytest.raises(CheckpointError, match=message) as err:
        from_pretrained(sharded)
    assert str(sharded) in str(err.value)


# ---- training checkpoints: init_from and resume ---------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 2-step tiny run with its checkpoint at step 2 (Accelerate's layout)."""
    out = tmp_path_factory.mktemp("run") / "a"
    result = train(load_config([], [*FAST, f"output_dir={out}", "max_steps=2", "save_every=2"]))
    assert result.exit_code == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = shutil.copytree(trained_run, tmp_path / "run")
    return out, out / "checkpoints" / "step-00000002"


INIT_FROM_DAMAGE = {
    "tensor_missing": _drop(LAST),
    "tensor_extra": lambda s: s.update({"language_model.extra.weight": torch.zeros(3)}),
    "tensor_wrong_shape": lambda s: s.update({LAST: torch.zeros(5)}),
    "tensor_integer_dtype": lambda s: s.update({LAST: s[LAST].to(torch.int64)}),
    "tensor_nan": set_value(LAST, (0,), float("nan")),
    "tensor_inf": set_value(PROBE, (0, 0), float("inf")),
}


@pytest.mark.parametrize("case", sorted(INIT_FROM_DAMAGE))
def test_init_from_no_partial_load(run_copy, case):
    """torch's load_state_dict(strict=True) copies every matching tensor before it raises:
    after a refused init_from the model must be bitwise what it was."""
    _, checkpoint = run_copy
    edit_tensors(checkpoint / "model.safetensors", INIT_FROM_DAMAGE[case])
    model = build_student(load_config([], []))
    before = snapshot(model)
    assert any(
        not torch.equal(before[n], t)
        for n, t in load_file(str(checkpoint / "model.safetensors")).items()
        if n in before and before[n].shape == t.shape
    )
    with pytest.raises(Exception) as err:
        load_training_weights(model, checkpoint)
    assert changed_tensors(model, before) == []
    assert isinstance(err.value, CheckpointError) and "model.safetensors" in str(err.value), repr(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zero_bytes"])
def test_init_from_no_partial_load_of_an_unreadable_file(run_copy, damage):
    _, checkpoint = run_copy
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x01" * 300, "truncated": data[: len(data) * 2 // 3], "zero_bytes": b""}[damage])
    model = build_student(load_config([], []))
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"step-00000002/model\.safetensors: unreadable safetensors file"):
        load_training_weights(model, checkpoint)
    assert changed_tensors(model, before) == []


def test_nonfinite_checkpoint_init_from_loads_only_with_the_opt_in(run_copy):
    _, checkpoint = run_copy
    edit_tensors(checkpoint / "model.safetensors", set_value(PROBE, (0, 0), float("nan")))
    with pytest.raises(CheckpointError, match=rf"{PROBE}: 1 NaN"):
        build_student(load_config([], [f"model.init_from={checkpoint}"]))
    model = build_student(load_config([], [f"model.init_from={checkpoint}", "model.allow_nonfinite_weights=true"]))
    assert torch.isnan(model.state_dict()[PROBE][0, 0])


@pytest.mark.parametrize(
    "case", ["weights_nan", "weights_wrong_shape", "weights_garbage", "ema_nan", "ema_wrong_shape", "ema_garbage"]
)
def test_resume_refuses_a_damaged_checkpoint_before_loading_anything(run_copy, case):
    """Accelerate loads the model, then the EMA: each is checked before either is touched."""
    out, checkpoint = run_copy
    weights, ema_file = checkpoint / "model.safetensors", checkpoint / "custom_checkpoint_0.pkl"
    if case == "weights_nan":
        edit_tensors(weights, set_value(PROBE, (0, 0), float("nan")))
    elif case == "weights_wrong_shape":
        edit_tensors(weights, lambda s: s.update({LAST: torch.zeros(7)}))
    elif case == "weights_garbage":
        weights.write_bytes(b"\x00" * 50)
    elif case == "ema_garbage":
        ema_file.write_bytes(b"not a pickle")
    else:
        state = torch.load(ema_file, weights_only=False)
        if case == "ema_nan":
            state["shadow"][-1] = torch.full_like(state["shadow"][-1], float("nan"))
        else:
            state["shadow"][0] = torch.zeros(3)
        torch.save(state, ema_file)
    named = ema_file.name if case.startswith("ema") else weights.name
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        train(load_config([], [*FAST, f"output_dir={out}", "max_steps=3", "save_every=3", "resume=auto"]))


# ---- the EMA state ------------------------------------------------------------------------------
@pytest.fixture
def ema_pair():
    """An EMA and a saved state of another EMA of the same model whose shadow differs."""
    ema = EMATeacher(build_model("tiny", seed=0), decay=0.9)
    other = EMATeacher(build_model("tiny", seed=1), decay=0.9)
    return ema, other.state_dict()


@pytest.mark.parametrize(
    "case", ["last_wrong_shape", "last_nan", "names_reordered_one_missing", "decay_out_of_range", "shadow_not_tensor"]
)
def test_ema_state_no_partial_load(ema_pair, case):
    ema, state = ema_pair
    before = [s.clone() for s in ema.shadow]
    if case == "last_wrong_shape":
        state["shadow"][-1] = torch.zeros(3)
    elif case == "last_nan":
        state["shadow"][-1] = torch.full_like(state["shadow"][-1], float("nan"))
    elif case == "names_reordered_one_missing":
        state["names"], state["shadow"] = state["names"][1:][::-1], state["shadow"][1:][::-1]
    elif case == "decay_out_of_range":
        state["decay"] = 1.5
    else:
        state["shadow"][-1] = [0.0]
    with pytest.raises(Exception) as err:
        ema.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, before))
    assert isinstance(err.value, CheckpointError) and "EMA state" in str(err.value)


def test_nonfinite_checkpoint_ema_state_loads_only_with_the_opt_in(ema_pair):
    ema, state = ema_pair
    state["shadow"][0] = state["shadow"][0].clone().fill_(float("inf"))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        ema.load_state_dict(state)
    ema.load_state_dict(state, allow_nonfinite=True)
    assert torch.isinf(ema.shadow[0]).all()
    permissive = EMATeacher(build_model("tiny", seed=0), decay=0.9, allow_nonfinite_state=True)
    permissive.load_state_dict(state)  # as Accelerate's resume calls it: the state alone
    assert torch.isinf(permissive.shadow[0]).all()


def test_ema_state_loads_by_name_whatever_the_order(ema_pair):
    ema, state = ema_pair
    expected = dict(zip(state["names"], state["shadow"]))
    ema.load_state_dict({**state, "names": state["names"][::-1], "shadow": state["shadow"][::-1]})
    assert all(torch.equal(s, expected[n]) for n, s in zip(ema.names, ema.shadow))


def test_nonfinite_checkpoint_check_is_exact_when_a_finite_sum_overflows():
    """The fast path sums each tensor; a float16 tensor of finite values whose sum overflows
    must not be reported, and one NaN among them must."""
    from pg_train.model.io.state_check import nonfinite_report

    large = torch.full((1000,), 60000.0, dtype=torch.float16)
    assert torch.isinf(large.sum()) and nonfinite_report({"large": large}) == []
    large[10] = float("nan")
    large[11] = float("-inf")
    assert nonfinite_report({"large": large}) == ["large: 1 NaN, 1 Inf of 1000"]


@pytest.mark.parametrize("case", ["nan", "missing_tensor", "garbage"])
def test_resume_under_deepspeed_checks_its_module_file(run_copy, case):
    """Under DeepSpeed the weights are `pytorch_model/mp_rank_00_model_states.pt` ("module"):
    the same check before DeepSpeed's load_checkpoint copies anything."""
    from pg_train.checkpointing import check_resume_weights

    _, checkpoint = run_copy
    state = load_file(str(checkpoint / "model.safetensors"))
    (checkpoint / "model.safetensors").unlink()
    deepspeed = checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt"
    deepspeed.parent.mkdir()
    model = build_student(load_config([], []))
    ema = EMATeacher(model)
    torch.save({"module": state}, deepspeed)
    check_resume_weights(checkpoint, model, ema)  # intact: passes
    if case == "garbage":
        deepspeed.write_bytes(b"\x00" * 64)
    else:
        if case == "nan":
            set_value(PROBE, (0, 0), float("nan"))(state)
        else:
            state.pop(LAST)
        torch.save({"module": state}, deepspeed)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt"):
        check_resume_weights(checkpoint, model, ema)
