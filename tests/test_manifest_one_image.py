"""A manifest with one image per line (image, mask, caption: the usual referring layout) and
lines missing a field named without data.strict (issue 29)."""

import json

import numpy as np
import pytest
from PIL import Image

from pg_train.data import DataConfig, ManifestPairs, Preprocess, build_loader, build_source

SMALL = Preprocess(mllm_size=112, sam_size=128)


def write_scene(directory, name: str, box=(16, 16, 48, 40), size=(64, 56)):
    """A blue image with a red rectangle at `box` and the rectangle's mask; their file names."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 2] = 200
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (220, 20, 20)
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(pixels).save(directory / f"{name}.png")
    Image.fromarray(mask).save(directory / f"{name}_mask.png")
    return f"{name}.png", f"{name}_mask.png"


def one_image_manifest(directory, count: int = 6, extra_lines=()) -> "Path":  # noqa: F821
    lines = []
    for i in range(count):
        image, mask = write_scene(directory, f"scene{i}", box=(8 + 4 * i, 10, 40 + 2 * i, 44))
        lines.append(json.dumps({"image": image, "mask": mask, "caption": f"the red box {i}"}))
    path = directory / "refs.jsonl"
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


@pytest.mark.parametrize("pairing", ["same", "augment"])
def test_a_one_image_line_pairs_the_image_with_itself_or_an_augmented_view(tmp_path, pairing):
    """Image 2 is image 1 (same) or a view of it (augment) whose mask still covers the red box:
    the pixels under mask 2 are red and the rest blue, whatever flip, affine and jitter drew."""
    source = ManifestPairs(one_image_manifest(tmp_path), min_pixels=1, pairing=pairing, seed=3)
    for index in range(len(source)):
        pair = source.load(index)
        assert pair.caption == f"the red box {index}" and np.array_equal(
            pair.mask1, np.asarray(Image.open(tmp_path / f"scene{index}_mask.png")) > 127
        )
        image2 = np.asarray(pair.image2.convert("RGB")).astype(int)
        if pairing == "same":
            assert pair.image2 is pair.image1 and pair.mask2 is pair.mask1
            continue
        assert not np.array_equal(image2, np.asarray(pair.image1).astype(int))
        inside = image2[pair.mask2]
        assert pair.mask2.sum() > 0.5 * pair.mask1.sum()
        assert (inside[:, 0] > inside[:, 2]).mean() > 0.95  # red under the mask
        visible = image2.sum(-1) > 60  # the affine's black border is neither
        outside = image2[~pair.mask2 & visible]
        assert (outside[:, 2] > outside[:, 0]).mean() > 0.95  # blue outside
        again = source.load(index)  # the same view every time (seed, line)
        assert np.array_equal(np.asarray(again.image2), np.asarray(pair.image2))


def test_a_line_missing_a_field_is_named_on_stderr_and_counted_without_strict(tmp_path, capsys):
    """Lines without a mask or without image 2's mask: skipped, counted as malformed_record, the
    first one named (file:line, the fields it lacks) without data.strict. A batch of nothing
    but bad lines (more in a row than a sample's refills) is not handed to the model (it was:
    KeyError 'pixel_values1'); a manifest of nothing but bad lines stops with the reason."""
    from pg_train.data import NoValidSamplesError

    good = one_image_manifest(tmp_path, count=2).read_text()
    bad = [json.dumps({"image": "scene0.png", "caption": "no mask"})] * 20
    bad.append(json.dumps({"image1": "scene0.png", "mask1": "scene0_mask.png", "image2": "scene0.png"}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(bad) + "\n" + good)
    cfg = DataConfig(source="manifest", manifest=str(path), min_pixels=1, shuffle=False)
    loader = build_loader(cfg, SMALL, batch_size=2)
    batches = []
    for batch in loader:
        batches.append(batch)
        if loader.epoch == 1:
            break
    assert batches and all(len(b["indices"]) > 0 and "pixel_values1" in b for b in batches)
    assert list(loader.skip_counts) == ["malformed_record"]
    assert len([b for b in batches if b["epoch"] == 0]) < len(loader.shard(0)) // 2  # empty batches not yielded
    err = capsys.readouterr().err
    assert f"{path}:1: " in err and "missing field(s) ['mask']" in err and "(malformed_record)" in err
    assert err.count("[pg_train] skipped a sample") == 1  # the first of each reason
    with pytest.raises(Exception, match=r"mixed.jsonl:21: .*missing field\(s\) \['mask2'\]"):
        ManifestPairs(path).load(20)
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
    cfg = DataConfig(source="manifest", manifest=str(tmp_path / "bad.jsonl"), min_pixels=1)
    with pytest.raises(NoValidSamplesError, match="malformed_record"):
        next(iter(build_loader(cfg, SMALL, batch_size=2)))


def test_a_one_image_manifest_trains_and_evaluates(tmp_path):
    """Two steps on a one-image manifest with held-out evaluation from its own lines (carved out
    by image), through the CLI; finite losses and held-out numbers in metrics.jsonl."""
    from pg_train.cli import main

    path = one_image_manifest(tmp_path, count=8)
    run = tmp_path / "run"
    args = ["--output-dir", str(run), "--max-steps", "2", "data.source=manifest", f"data.manifest={path}"]
    args += ["data.min_pixels=1", "eval_every=2", "eval_samples=2", "batch_size=2", "objective.max_caption_len=6"]
    args += ["report=false", "progress=false"]
    assert main(args) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in lines if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2] and all(np.isfinite(r["loss"]) for r in trained)
    evaluated = [r for r in lines if "eval/cycle_gIoU" in r]
    assert [r["step"] for r in evaluated] == [0, 2] and all(0 <= r["eval/referring_gIoU"] <= 1 for r in evaluated)
    assert build_source(DataConfig(source="manifest", manifest=str(path))).load(0).image2 is not None
