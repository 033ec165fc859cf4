"""A run's held-out set (pg_train/data/heldout.py): every source gets one, disjoint from what the
run trains on, the same on every rank; read from real-format fixtures (tests/formats.py)."""

import hashlib
import json

import numpy as np
import pytest
from formats import hf_dataset, rle_of, write_davis, write_pairs, write_refer

from pg_train.data import DataConfig
from pg_train.data.heldout import EvalConfig, carve, split_run_data


def fingerprint(raw) -> str:
    """A sample's identity: its image 1's pixels (every fixture image is distinct noise)."""
    return hashlib.sha1(np.asarray(raw.image1).tobytes()).hexdigest()


def loaded(source) -> list:
    return [source.load(i) for i in range(len(source))]


def held_images(heldout) -> set[str]:
    if heldout.protocol == "refcoco":  # a refer set: ReferPairs read as RefCOCO is evaluated
        return {
            hashlib.sha1(np.asarray(heldout.source.load_target(i)[0]).tobytes()).hexdigest()
            for i in range(len(heldout.source))
        }
    return {fingerprint(raw) for raw in loaded(heldout.source)}


@pytest.fixture
def pairs(tmp_path):
    manifest, rows = write_pairs(tmp_path / "pairs", count=12, bad_row=-1)
    return manifest, rows


def write_coco(root, manifest_dir, count=12):
    """COCO instances.json over the manifest's images: one box annotation each, two on image 0."""
    from PIL import Image

    images, annotations = [], []
    for i in range(count):
        with Image.open(manifest_dir / f"img{i}.png") as image:
            width, height = image.size
        images.append({"id": i + 1, "file_name": f"img{i}.png", "height": height, "width": width})
        mask = np.zeros((height, width), bool)
        mask[4 + i : 20 + i, 6 + i : 26 + i] = True
        annotations.append({"id": 100 + i, "image_id": i + 1, "segmentation": rle_of(mask), "iscrowd": 0})
    second = np.zeros((images[0]["height"], images[0]["width"]), bool)
    second[25:35, 30:44] = True
    annotations.append({"id": 99, "image_id": 1, "segmentation": rle_of(second), "iscrowd": 0})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": []}))
    return path


def check_disjoint(data: DataConfig, ev: EvalConfig = EvalConfig(), samples: int = 16, minimum: int = 2):
    train, heldout = split_run_data(data, ev, seed=0, samples=samples, carve_out=True)
    trained = {fingerprint(raw) for raw in loaded(train)}
    held = held_images(heldout)
    assert len(held) >= 1 and heldout.description["n"] >= minimum and len(trained) >= 1
    assert not trained & held, f"{data.source}: {len(trained & held)} held-out images are trained on"
    # another rank computes the same split; a carve-out does not depend on the seed either (synthetic: seed + 10,000)
    other_seed = 0 if data.source == "synthetic" else 5
    again_train, again = split_run_data(data, ev, seed=other_seed, samples=samples, carve_out=True)
    assert held_images(again) == held and {fingerprint(raw) for raw in loaded(again_train)} == trained
    return train, heldout


def test_heldout_manifest_and_coco_carve_whole_images_out_of_training(tmp_path, pairs):
    manifest, _ = pairs
    data = DataConfig(source="manifest", manifest=str(manifest), min_pixels=1)
    train, heldout = check_disjoint(data)
    assert len(train) + len(heldout.source) == 12 and heldout.description["chosen"] == "carved"
    assert heldout.description["source"] == "manifest" and heldout.description["n"] == 2  # max(2, 12 // 5)
    # not carving (eval_every=0): training keeps every line, and the description says so
    everything, same = split_run_data(data, EvalConfig(), seed=0, samples=16, carve_out=False)
    assert len(everything) == 12 and same.description["trained_on"] and held_images(same) == held_images(heldout)

    instances = write_coco(tmp_path, manifest.parent)
    coco = DataConfig(
        source="coco", coco_instances=str(instances), coco_images=str(manifest.parent), pairing="same", min_pixels=1
    )
    train, heldout = check_disjoint(coco)
    assert len(train) + len(heldout.source) == 13  # image 0's two annotations fall on one side together


def test_heldout_named_manifest_leaves_the_training_data_whole(tmp_path, pairs):
    manifest, _ = pairs
    other, _ = write_pairs(tmp_path / "other", count=4, bad_row=-1)
    data = DataConfig(source="manifest", manifest=str(manifest), min_pixels=1)
    train, heldout = split_run_data(data, EvalConfig(manifest=str(other)), seed=0, samples=16, carve_out=True)
    assert len(train) == 12 and heldout.description == {
        "source": "manifest",
        "split": str(other),
        "n": 4,
        "chosen": "named",
        "available": 4,
    }


def test_heldout_refer_carved_by_image_or_named_split_scored_as_refcoco(tmp_path):
    refer_dir, images = write_refer(tmp_path)
    data = DataConfig(source="refer", refer_dir=str(refer_dir), coco_images=str(images), refer_split=None, min_pixels=1)
    train, heldout = split_run_data(data, EvalConfig(), seed=0, samples=16, carve_out=True)
    assert heldout.protocol == "refcoco"
    train_images = {train.refs[e.ref_index].get("image_id") for e in train.entries}
    held_images_ = {heldout.source.refs[e.ref_index].get("image_id") for e in heldout.source.entries}
    assert train_images and held_images_ and not train_images & held_images_  # the fixture's 2 images, one each side
    # a named split: the train split trains, val is held out (no ref on both sides)
    data = DataConfig(source="refer", refer_dir=str(refer_dir), coco_images=str(images), min_pixels=1)
    train, heldout = split_run_data(data, EvalConfig(split="val"), seed=0, samples=16, carve_out=True)
    assert {train.refs[e.ref_index]["split"] for e in train.entries} == {"train"}
    assert [heldout.source.refs[e.ref_index]["ref_id"] for e in heldout.source.entries] == [2]
    assert heldout.description["split"] == "refs(unc).p val" and heldout.description["n"] == 1


@pytest.mark.parametrize("streaming", [False, True])
def test_heldout_hf_rows_map_style_and_streaming(tmp_path, monkeypatch, pairs, streaming):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _, rows = pairs
    hf_dataset(rows).save_to_disk(str(tmp_path / "saved"))
    data = DataConfig(
        source="hf", hf_path=str(tmp_path / "saved"), pairing="same", min_pixels=1, hf_streaming=streaming
    )
    train, heldout = check_disjoint(data)
    held = {raw.caption for raw in loaded(heldout.source)}
    if streaming:  # the stream's first rows in file order; the training stream (shuffled) skips them
        assert held == {"object number 0", "object number 1"} and len(train) == 10
        for epoch in (0, 1):
            train.set_epoch(epoch)
            assert {raw.caption for raw in loaded(train)} == {f"object number {i}" for i in range(2, 12)}
    else:
        assert len(held) == 2 and len(train) == 10


def test_heldout_video_carves_whole_videos(tmp_path):
    root = write_davis(tmp_path / "davis")
    data = DataConfig(source="video", video_dir=str(root), pairing="other_frame", video_frame_distance=1, min_pixels=1)
    train, heldout = check_disjoint(data)
    videos = lambda source: {source.source.pairs[i].video for i in source.indices}  # noqa: E731
    assert videos(train).isdisjoint(videos(heldout.source)) and len(videos(train) | videos(heldout.source)) == 2


def test_heldout_synthetic_scenes_are_another_seed_never_trained_on():
    data = DataConfig(num_samples=24, image_size=64)
    train, heldout = check_disjoint(data, samples=8, minimum=8)
    assert heldout.description["split"] == "seed 10000" and len(train) == 24  # training scenes untouched
    _, named = split_run_data(data, EvalConfig(seed=77), seed=0, samples=8, carve_out=True)
    assert named.description["split"] == "seed 77"


def test_carve_refuses_data_too_small_to_hold_anything_out():
    with pytest.raises(ValueError, match="too few to carve a held-out set"):
        carve(["image:a", "image:a", "image:a"], 16, "data.source=manifest")  # one image: nothing can be left
    train, held = carve([f"image:{i}" for i in range(10)], 16, "x")
    assert len(held) == 2 and sorted(train + held) == list(range(10))


# ---- a run on a manifest: its held-out set in training, the gallery, and pg-train-evaluate -----------
def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


@pytest.mark.slow  # a training run and four evaluations: 184 s measured at load average 12 on 2 shared cores
def test_manifest_run_evaluates_and_draws_its_own_held_out_images_and_evaluate_agrees(tmp_path, pairs, capsys):
    """One short manifest run: the in-training evaluation, the gallery (heldout_samples.npz) and
    the report use the manifest's own held-out lines; pg-train-evaluate gives the same numbers
    (fp32, <= 1e-6) from the training checkpoint, from a save_pretrained directory given the run's
    config, and warns (stderr and eval.json) when the data differs from the run's."""
    from PIL import Image

    from pg_train.config import load_config
    from pg_train.evaluate import load_checkpoint
    from pg_train.evaluate import main as evaluate_main
    from pg_train.model import save_pretrained
    from pg_train.report import load_samples
    from pg_train.train import train

    manifest, _ = pairs
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        "model.preset=tiny-112",
        "data.source=manifest",
        f"data.manifest={manifest}",
        "data.min_pixels=1",
        "max_steps=1",
        "eval_every=1",
        "eval_samples=4",
        "batch_size=2",
        "objective_kind=supervised",
        "objective.max_caption_len=6",
        "tensorboard=false",
        "progress=false",
    ]
    train(load_config([], overrides))
    description = json.loads((run / "heldout.json").read_text())
    assert description["source"] == "manifest" and description["chosen"] == "carved" and description["n"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "eval/cycle_gIoU" in r][-1]
    assert last["step"] == 1 and last["eval/set"].startswith("manifest carved") and last["eval/samples"] == 2
    assert "on manifest carved" in capsys.readouterr().out  # the summary names the set

    # the gallery shows the manifest's held-out images, not synthetic scenes
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    reference = {
        line["image1"]: np.asarray(Image.open(manifest.parent / line["image1"]).convert("RGB").resize((224, 224)))
        for line in lines
    }
    samples = load_samples(run / "heldout_samples.npz")
    assert len(samples) == 2
    train_source, _ = __import__("pg_train.data.heldout", fromlist=["x"]).split_run_data(
        load_config([], overrides).data, EvalConfig(), 0, 4, carve_out=True
    )
    trained = {lines[i]["image1"] for i in train_source.indices}
    for s in samples:
        distances = sorted((mean_difference(s["image1"], image), name) for name, image in reference.items())
        (best, name), (second, _) = distances[:2]
        assert name not in trained and best < 0.25 * second, (name, best, second)

    # pg-train-evaluate: the same numbers from the checkpoint, and from save_pretrained + the run's config
    checkpoint = run / "checkpoints" / "step-00000001"
    numbers = lambda out: json.loads((out / "eval.json").read_text())  # noqa: E731
    assert evaluate_main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "e1")]) == 0
    model, _ = load_checkpoint(checkpoint)
    save_pretrained(model, tmp_path / "released")
    config = str(run / "config.yaml")
    assert (
        evaluate_main(
            ["--checkpoint", str(tmp_path / "released"), "--config", config, "--output", str(tmp_path / "e2")]
        )
        == 0
    )
    capsys.readouterr()
    for out in ("e1", "e2"):
        got = numbers(tmp_path / out)
        assert got["data"]["source"] == "manifest" and got["data"]["n"] == 2 and not got["warnings"]
        for kind in ("referring", "cycle", "shuffled", "empty"):
            for m in ("cIoU", "gIoU"):
                assert abs(got[kind][m] - last[f"eval/{kind}_{m}"]) <= 1e-6, (out, kind, m)

    # other data than the run's: said loudly, on stderr and in eval.json
    other, _ = write_pairs(tmp_path / "other", count=4, bad_row=-1)
    argv = ["--checkpoint", str(checkpoint), "--manifest", str(other), "--output", str(tmp_path / "e3")]
    assert evaluate_main(argv) == 0
    err = capsys.readouterr().err
    got = numbers(tmp_path / "e3")
    assert "WARNING" in err and "not comparable" in err and got["data_mismatch"] is True
    assert got["data"]["split"] == str(other) and got["data"]["n"] == 4
    # a released directory without its run's config: default synthetic scenes, never silently
    assert (
        evaluate_main(["--checkpoint", str(tmp_path / "released"), "--samples", "2", "--output", str(tmp_path / "e4")])
        == 0
    )
    got = numbers(tmp_path / "e4")
    assert got["data"]["source"] == "synthetic" and "without its run's config" in capsys.readouterr().err
    assert got["warnings"] and "without its run's config" in got["warnings"][0]


def test_refer_heldout_is_scored_in_training_as_the_refcoco_evaluator_scores_it(tmp_path):
    """A refer run's held-out numbers (the trainer's evaluate on batches_of) are the RefCOCO
    evaluator's (eval_refcoco.evaluate_split: masks upsampled to each image's resolution)."""
    import torch
    from conftest import with_lora_weights

    from pg_train.data.loader import preprocess_for
    from pg_train.eval_refcoco import evaluate_split, model_predictor
    from pg_train.evaluate import batches_of, evaluate
    from pg_train.model import build_model
    from pg_train.objectives.settings import PseudoGumbelConfig

    refer_dir, images = write_refer(tmp_path)
    data = DataConfig(source="refer", refer_dir=str(refer_dir), coco_images=str(images), min_pixels=1)
    _, heldout = split_run_data(data, EvalConfig(split="testA"), seed=0, samples=16, carve_out=True)
    model = with_lora_weights(build_model("tiny", seed=0), seed=1, scale=0.2).eval()
    cfg = PseudoGumbelConfig(max_caption_len=6)
    (batch,) = batches_of(model, heldout, 3, "cpu")
    assert [tuple(t.shape) for t in batch["truths"]] == [(48, 64)] * 3  # the annotation at the image's size
    ours = evaluate(model, [batch], cfg)
    theirs = evaluate_split(
        heldout.source,
        model_predictor(model, cfg, "cpu", torch.float32),
        preprocess_for(model.preset),
        3,
        progress=False,
    )
    assert theirs["expressions"] == ours["samples"] == 3
    for kind in ("referring", "cycle"):
        assert ours[kind] == pytest.approx(theirs[kind], abs=1e-9)


def test_evaluate_config_of_another_run_than_the_checkpoint_s_is_a_warning(tmp_path, pairs):
    """--config naming other data settings than the run that wrote the checkpoint is said."""
    import yaml

    from pg_train.config import load_config, to_dict
    from pg_train.evaluate import config_warnings

    manifest, _ = pairs
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    own = load_config([], ["data.source=manifest", f"data.manifest={manifest}"])
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(to_dict(own)))
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(to_dict(own)))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(to_dict(load_config([], ["eval_samples=4"]))))  # synthetic scenes
    assert config_warnings(checkpoint, None, own) == []
    assert config_warnings(checkpoint, str(same), load_config([same])) == []
    (warning,) = config_warnings(checkpoint, str(other), load_config([other]))
    assert "other data settings" in warning and str(checkpoint) in warning


def test_heldout_hf_named_split_reads_its_own_files_and_refuses_a_folder_without_them(tmp_path, monkeypatch, pairs):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    _, rows = pairs
    ds = hf_dataset(rows)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.select(range(9)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(9, 12)).to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))
    data = DataConfig(source="hf", hf_path=str(tmp_path / "hub"), pairing="same", min_pixels=1)
    train, heldout = split_run_data(data, EvalConfig(split="validation"), seed=0, samples=16, carve_out=True)
    assert len(train) == 9 and heldout.description["n"] == 3
    assert not {fingerprint(r) for r in loaded(train)} & held_images(heldout)
    with pytest.raises(ValueError, match="has no files of that split apart from"):
        split_run_data(data, EvalConfig(split="test"), seed=0, samples=16, carve_out=True)
