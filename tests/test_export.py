"""Taking a model out of a run: checkpoint reading (Accelerate and DeepSpeed ZeRO-2 layouts), the
EMA shadow as safetensors, `pg-train-export` and `pg-train-predict`.

References are independent of the code under test: DeepSpeed's own consolidation
(`get_fp32_state_dict_from_zero_checkpoint`), peft's `merge_and_unload`, Accelerate's pickle of
the EMA, transformers' dynamic-module loader, and the image files read back with PIL."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from PIL import Image
from safetensors.torch import load_file, save_file

from pg_train.config import load_config
from pg_train.export import export
from pg_train.export import main as export_main
from pg_train.model import CheckpointError, from_pretrained
from pg_train.train import train

DATA = Path(__file__).parent / "data"
FAST = [
    "batch_size=2",
    "objective.max_caption_len=6",
    "objective.topk=16",
    "data.num_samples=8",
    "tensorboard=false",
    "progress=false",
    "report=false",
    "eval_every=0",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 2-step tiny run, one process (Accelerate's layout), checkpoint at step 2."""
    out = tmp_path_factory.mktemp("run") / "a"
    result = train(load_config([], [*FAST, f"output_dir={out}", "max_steps=2", "save_every=2"]))
    assert result.exit_code == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = shutil.copytree(trained_run, tmp_path / "run")
    return out, out / "checkpoints" / "step-00000002"


def exported_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_ema_safetensors_equals_accelerates_pickle_of_the_ema(trained_run):
    checkpoint = trained_run / "checkpoints" / "step-00000002"
    pickled = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    stored = load_file(str(checkpoint / "ema.safetensors"))
    assert list(stored) == sorted(pickled["names"]) or set(stored) == set(pickled["names"])
    for name, shadow in zip(pickled["names"], pickled["shadow"]):
        assert stored[name].dtype == torch.float32 and torch.equal(stored[name], shadow), name
    from safetensors import safe_open

    with safe_open(str(checkpoint / "ema.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["num_updates"]) == pickled["num_updates"] == 2
    assert json.loads(meta["decay"]) == pickled["decay"]


def test_export_student_and_ema_load_strictly_and_equal_the_checkpoint_with_lora_merged(trained_run, tmp_path):
    checkpoint = trained_run / "checkpoints" / "step-00000002"
    for weights in ("student", "ema"):
        out = export(trained_run, tmp_path / weights, weights=weights, dtype="fp32", max_shard_bytes=300_000)
        assert len(list(out.glob("model-*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").is_file()
        for name in ("config.json", "generation_config.json", "tokenizer.json", "training_config.yaml"):
            assert (out / name).is_file(), name
        from_pretrained(out)  # strict: every name, shape, dtype kind, finiteness
        reference = merged_reference(checkpoint, weights)
        tensors = exported_tensors(out)
        assert set(tensors) == set(reference)
        for name, tensor in reference.items():
            assert torch.equal(tensors[name], tensor), name
    student, ema = exported_tensors(tmp_path / "student"), exported_tensors(tmp_path / "ema")
    assert not torch.equal(student["mlp1.1.weight"], ema["mlp1.1.weight"])  # the EMA really is another set
    bf16 = export(trained_run, tmp_path / "bf16", weights="student")
    assert all(t.dtype == torch.bfloat16 for t in exported_tensors(bf16).values() if t.is_floating_point())
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def merged_reference(checkpoint: Path, weights: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (`state`, default its model.safetensors; its EMA shadow over
    them for `ema`, from Accelerate's pickle), LoRA merged by peft's merge_and_unload on a fresh
    peft model, under the released names."""
    from peft import LoraConfig, get_peft_model

    from pg_train.model import build_model

    state = dict(state) if state is not None else load_file(str(checkpoint / "model.safetensors"))
    if weights == "ema":
        pickled = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
        state.update(dict(zip(pickled["names"], pickled["shadow"])))
    cfg = load_config([checkpoint.parent.parent / "config.yaml"], [])
    plain = build_model(cfg.model.preset, lora=False)
    lora = plain.preset.lora
    peft_lm = get_peft_model(
        plain.language_model,
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=0.0),
    )
    prefix = "language_model."
    # the same module names under both wrappers: language_model.X <-> base_model.model.X
    lm_state = {"base_model.model." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    peft_lm.load_state_dict(lm_state, strict=True)
    merged_lm = peft_lm.merge_and_unload()
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in merged_lm.state_dict().items()})
    return {k.replace(".gamma", ".g_weight"): v for k, v in out.items()}


def test_code_from_copies_the_released_code_and_auto_map_and_the_official_loader_resolves_it(trained_run, tmp_path):
    released = DATA / "released_code"
    out = export(trained_run, tmp_path / "out", code_from=released)
    for source in released.glob("*.py"):
        assert (out / source.name).read_bytes() == source.read_bytes()
    config = json.loads((out / "config.json").read_text())
    theirs = json.loads((released / "config.json").read_text())
    assert config["auto_map"] == theirs["auto_map"]
    assert config["vision_config"]["use_flash_attn"] is True  # a key only their code reads survives
    assert config["llm_config"]["hidden_size"] != theirs["llm_config"]["hidden_size"]  # the dims are ours
    from_pretrained(out)
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    hf_config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert type(hf_config).__name__ == "Sa2VAChatConfig"
    assert hf_config.llm_config["hidden_size"] == config["llm_config"]["hidden_size"]
    model_class = get_class_from_dynamic_module(config["auto_map"]["AutoModel"], str(out))
    assert model_class.__name__ == "Sa2VAChatModel" and model_class.config_class.__name__ == "Sa2VAChatConfig"


def no_partial_output(tmp_path: Path, name: str) -> bool:
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.partial*"))


def test_export_refuses_nonfinite_weights_writing_nothing(run_copy, tmp_path, capsys):
    run, checkpoint = run_copy
    weights = checkpoint / "model.safetensors"
    state = load_file(str(weights))
    state["mlp1.1.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    assert export_main([str(run), str(tmp_path / "out"), "--weights", "student"]) == 2
    err = capsys.readouterr().err
    assert "pg-train-export" in err and "mlp1.1.weight: 1 NaN" in err
    assert no_partial_output(tmp_path, "out")


def test_export_refuses_an_inf_ema_and_a_missing_ema(run_copy, tmp_path, capsys):
    run, checkpoint = run_copy
    ema = load_file(str(checkpoint / "ema.safetensors"))
    ema["mlp1.1.weight"][0, 0] = float("inf")
    save_file(ema, str(checkpoint / "ema.safetensors"))
    assert export_main([str(run), str(tmp_path / "out")]) == 2
    assert "mlp1.1.weight: 0 NaN, 1 Inf" in capsys.readouterr().err and no_partial_output(tmp_path, "out")
    (checkpoint / "ema.safetensors").unlink()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    assert export_main([str(checkpoint), str(tmp_path / "out"), "--weights", "ema"]) == 2
    assert "holds no EMA teacher" in capsys.readouterr().err and no_partial_output(tmp_path, "out")
    assert export_main([str(checkpoint), str(tmp_path / "out"), "--weights", "student"]) == 0


def test_export_refuses_an_unknown_layout_and_an_existing_output(run_copy, tmp_path, capsys):
    run, _ = run_copy
    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "is no checkpoint pg_train can read" in capsys.readouterr().err and no_partial_output(tmp_path, "out")
    (tmp_path / "taken").mkdir()
    assert export_main([str(run), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and list((tmp_path / "taken").iterdir()) == []
    assert export_main([str(run), str(tmp_path / "out"), "--code-from", str(tmp_path / "empty")]) == 2
    assert "--code-from" in capsys.readouterr().err and no_partial_output(tmp_path, "out")


def test_errors_name_the_command_the_user_ran(tmp_path):
    from pg_train.builders import load_checkpoint, load_training_weights
    from pg_train.model import build_model

    (tmp_path / "nothing").mkdir()
    with pytest.raises(CheckpointError, match="^pg-train-evaluate: .*nothing is no checkpoint"):
        load_checkpoint(tmp_path / "nothing", command="pg-train-evaluate")
    with pytest.raises(CheckpointError, match="^model.init_from: .*nothing is no checkpoint"):
        load_training_weights(build_model("tiny", seed=0), tmp_path / "nothing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="^pg-train-predict: .*run directory without a complete checkpoint"):
        load_checkpoint(tmp_path / "run", command="pg-train-predict")


# ---- predict ----------------------------------------------------------------------------------
def scene_files(tmp_path: Path, count: int) -> list[tuple[Path, Path, str]]:
    """Synthetic scenes written as PNG files: (image, mask of its object, its description)."""
    from pg_train.data import DataConfig, build_source

    source = build_source(DataConfig(num_samples=count), seed=123)
    files = []
    for i in range(count):
        raw = source.load(i)
        image, mask = tmp_path / f"scene{i}.png", tmp_path / f"scene{i}_mask.png"
        raw.image1.save(image)
        Image.fromarray(raw.mask1.astype(np.uint8) * 255).save(mask)
        files.append((image, mask, raw.caption or "the object"))
    return files


def test_predict_writes_masks_overlays_and_json_lines_and_skips_bad_inputs_naming_them(trained_run, tmp_path, capsys):
    from pg_train.builders import load_checkpoint
    from pg_train.inference import segment, segment_from_own_caption
    from pg_train.predict import main as predict_main

    scenes = scene_files(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.full((5, 5), 128, np.uint8)).save(tmp_path / "grey_mask.png")
    manifest = tmp_path / "inputs.jsonl"
    lines = [
        {"image": scenes[0][0].name, "text": scenes[0][2]},
        {"image": scenes[1][0].name, "region": scenes[1][1].name},
        {"image": "missing.png", "text": "x"},
        "{not json",
        {"image": "broken.png", "text": "x"},
        {"image": scenes[2][0].name, "region": "grey_mask.png"},
        {"image": scenes[2][0].name, "caption": scenes[2][2]},
        {"image": scenes[0][0].name, "caption": scenes[0][2], "mask": scenes[0][1].name},  # a training line
    ]
    manifest.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert predict_main([str(trained_run), "--manifest", str(manifest), "--out", str(out), "--weights", "student"]) == 0
    err = capsys.readouterr().err
    for where, reason in ((3, "file not found"), (4, "JSON"), (5, "cannot be read"), (6, "size differs")):
        assert f"inputs.jsonl:{where}" in err and reason in err, (where, err)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in records] == [
        None,
        None,
        "missing_file",
        "malformed_record",
        "unreadable_image",
        "size_mismatch",
        None,
        None,
    ]

    model, cfg = load_checkpoint(trained_run, command="test", weights="student")
    images = [Image.open(scenes[i][0]).convert("RGB") for i in range(3)]
    expected = {
        0: segment(model, [images[0]], [scenes[0][2]], cfg.objective)[0],
        1: segment_from_own_caption(model, [images[1]], [np.asarray(Image.open(scenes[1][1])) > 0], cfg.objective)[0],
        6: segment(model, [images[2]], [scenes[2][2]], cfg.objective)[0],
    }
    for number, prediction in expected.items():
        record = records[number]
        mask = np.asarray(Image.open(out / record["mask"])) > 127
        assert mask.shape == (images[0].height, images[0].width)
        assert np.array_equal(mask, prediction.mask) and record["mask_area"] == int(mask.sum())
        assert record["caption"] == prediction.caption and record["score"] == pytest.approx(prediction.score)
        overlay = Image.open(out / record["overlay"])
        assert overlay.width == 512 and overlay.height > 512 * images[0].height / images[0].width
    assert records[0]["caption"] == scenes[0][2]  # a text query's caption is the text itself
    # text and mask: segmented from the text (as line 1), scored against the mask
    assert records[7]["mask_area"] == records[0]["mask_area"] and "region" in records[7]
    predicted = np.asarray(Image.open(out / records[7]["mask"])) > 127
    truth = np.asarray(Image.open(scenes[0][1])) > 0
    assert records[7]["iou_with_region"] == pytest.approx((predicted & truth).sum() / (predicted | truth).sum())

    # a folder: every image with the same text; the masks are those of the one-image path
    folder = tmp_path / "folder"
    folder.mkdir()
    for image, _, _ in scenes[:2]:
        shutil.copy(image, folder / image.name)
    (folder / "notes.txt").write_text("not an image")
    args = [str(trained_run), "--images", str(folder), "--text", scenes[0][2], "--weights", "student"]
    assert predict_main([*args, "--out", str(tmp_path / "out_folder"), "--batch-size", "1"]) == 0
    listed = [json.loads(line) for line in (tmp_path / "out_folder" / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in listed] == [scenes[0][0].name, scenes[1][0].name]
    first = np.asarray(Image.open(tmp_path / "out_folder" / listed[0]["mask"])) > 127
    assert np.array_equal(first, expected[0].mask)


# ---- the whole loop under DeepSpeed ZeRO-2 ---------------------------------------------------------
@pytest.mark.slow
def test_zero2_run_exports_loads_strictly_predicts_and_scores_what_training_scored(tmp_path):
    """Tiny model, 2 steps under 2-process ZeRO-2 on CPU, held-out evaluation at step 2 ->
    pg-train-export (student and EMA, fp32) -> strict from_pretrained -> pg-train-evaluate and
    pg-train-predict on the export. The exported tensors equal DeepSpeed's own consolidation of
    the shards with LoRA merged by peft; the held-out numbers equal the in-training ones."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pg_train.evaluate import main as evaluate_main
    from pg_train.predict import main as predict_main

    run = tmp_path / "run"
    overrides = [*FAST, "data.num_samples=24", "eval_every=2", "eval_samples=4", "max_steps=2", "save_every=2"]
    accelerate_launch("tests/dist/train_probe.py", str(tmp_path / "probe"), f"output_dir={run}", *overrides)
    checkpoint = run / "checkpoints" / "step-00000002"
    assert len(list((checkpoint / "pytorch_model").glob("*optim_states.pt"))) == 2  # really sharded
    assert not (checkpoint / "model.safetensors").exists()
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))  # DeepSpeed's API, tag from `latest`

    for weights in ("student", "ema"):
        assert export_main([str(run), str(tmp_path / weights), "--weights", weights, "--dtype", "fp32"]) == 0
        from_pretrained(tmp_path / weights)  # strict
        reference = merged_reference(checkpoint, weights, consolidated)
        tensors = exported_tensors(tmp_path / weights)
        assert set(tensors) == set(reference)
        for name, tensor in reference.items():
            assert torch.equal(tensors[name], tensor), name

    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    in_training = next(r for r in trained if r["step"] == 2 and "eval/cycle_gIoU" in r)
    at_start = next(r for r in trained if r["step"] == 0 and "eval/cycle_gIoU" in r)
    assert in_training["eval/referring_gIoU"] != at_start["eval/referring_gIoU"]  # the steps changed the numbers
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(tmp_path / "student"),
                "--samples",
                "4",
                "--batch-size",
                "2",
                "--output",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    # the ZeRO-2 checkpoint itself, read by pg-train-evaluate without any manual step, scores the same
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(checkpoint),
                "--samples",
                "4",
                "--batch-size",
                "2",
                "--output",
                str(tmp_path / "eval_ckpt"),
            ]
        )
        == 0
    )
    for where in ("eval", "eval_ckpt"):
        numbers = json.loads((tmp_path / where / "eval.json").read_text())
        for kind in ("referring", "cycle", "shuffled", "empty"):
            for metric in ("cIoU", "gIoU"):
                assert abs(numbers[kind][metric] - in_training[f"eval/{kind}_{metric}"]) <= 1e-6, (where, kind, metric)
        assert abs(numbers["captions"]["mean_length"] - in_training["eval/caption_len"]) <= 1e-6
        assert numbers["language_embedding"]["ratio"] == pytest.approx(
            in_training["eval/caption_sensitivity"], rel=1e-5
        )

    # model.init_from takes the ZeRO-2 checkpoint too: the consolidated weights, bitwise
    from pg_train.builders import build_student

    started = build_student(load_config([run / "config.yaml"], [f"model.init_from={checkpoint}", "resume=null"]))
    assert all(torch.equal(t, consolidated[n]) for n, t in started.state_dict().items())

    ((image, mask, text),) = scene_files(tmp_path, 1)
    for query in (["--text", text], ["--region", str(mask)]):
        out = tmp_path / f"predict{query[0]}"
        assert predict_main([str(tmp_path / "ema"), "--image", str(image), *query, "--out", str(out)]) == 0
        (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        predicted = np.asarray(Image.open(out / record["mask"])) > 127
        assert predicted.shape == np.asarray(Image.open(image)).shape[:2] and record["mask_area"] == int(
            predicted.sum()
        )
        assert Image.open(out / record["overlay"]).width == 512 and 0.0 <= record["score"] <= 1.0
        assert record["caption"] == text if query[0] == "--text" else isinstance(record["caption"], str)
