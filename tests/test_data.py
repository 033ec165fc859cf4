"""Data sources, preprocessing, bad input, sharding and exact resume."""

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pg_train.data import (
    BadSample,
    CocoPairs,
    DataConfig,
    ManifestPairs,
    NoValidSamplesError,
    PairDataset,
    PairLoader,
    Preprocess,
    SyntheticPairs,
    build_loader,
)
from pg_train.data.images import open_image

SMALL = Preprocess(mllm_size=448, sam_size=128)


def write_pair(directory, name, size=(64, 48), box=(10, 10, 30, 30)):
    """An image and its binary mask as PNG files; returns their file names."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    image.save(directory / f"{name}.png")
    Image.fromarray(mask).save(directory / f"{name}_mask.png")
    return f"{name}.png", f"{name}_mask.png"


def manifest_with(tmp_path, bad_line: str | None, good: int = 3):
    lines = []
    for i in range(good):
        image, mask = write_pair(tmp_path, f"good{i}")
        lines.append(
            json.dumps({"image1": image, "mask1": mask, "image2": image, "mask2": mask, "caption": f"object {i}"})
        )
    if bad_line is not None:
        lines.insert(1, bad_line)
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bad_cases(tmp_path):
    """Each kind of bad input as one manifest line (reason, line)."""
    image, mask = write_pair(tmp_path, "base")
    (tmp_path / "truncated.png").write_bytes((tmp_path / image).read_bytes()[:200])
    (tmp_path / "notanimage.png").write_text("hello")
    write_pair(tmp_path, "other_size", size=(32, 32), box=(1, 1, 10, 10))
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(tmp_path / "empty_mask.png")
    grey = np.zeros((48, 64), dtype=np.uint8)
    grey[5:20, 5:20] = 128
    grey[20:30, 20:30] = 255
    Image.fromarray(grey).save(tmp_path / "soft_mask.png")

    def line(**over):
        record = {"image1": image, "mask1": mask, "image2": image, "mask2": mask}
        record.update(over)
        return json.dumps(record)

    return {
        "missing_file": line(image2="nowhere.png"),
        "unreadable_image_truncated": line(image1="truncated.png"),
        "unreadable_image_garbage": line(image1="notanimage.png"),
        "size_mismatch": line(mask1="other_size_mask.png"),
        "empty_mask": line(mask2="empty_mask.png"),
        "non_binary_mask": line(mask1="soft_mask.png"),
        "malformed_record_json": '{"image1": "base.png", "mask1": ',
        "malformed_record_field": json.dumps({"image1": image, "mask1": mask}),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "unreadable_image_truncated",
        "unreadable_image_garbage",
        "size_mismatch",
        "empty_mask",
        "non_binary_mask",
        "malformed_record_json",
        "malformed_record_field",
    ],
)
def test_bad_input_is_skipped_and_counted_or_raises_in_strict_mode(tmp_path, case):
    bad = _bad_cases(tmp_path)[case]
    reason = case.rsplit("_", 1)[0] if case.startswith(("unreadable", "malformed")) else case
    path = manifest_with(tmp_path, bad)
    source = ManifestPairs(path)
    with pytest.raises(BadSample) as err:
        source.load(1)
    assert err.value.reason == reason and f"{path}:2" in str(err.value)

    # Lenient: the bad line is replaced by the next good sample and counted under its reason.
    loader = PairLoader(PairDataset(source, SMALL), batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert len(batch["indices"]) == 4 and all(torch.isfinite(batch[k]).all() for k in ("pixel_values1", "masks2"))
    assert loader.skip_counts == {reason: 1}

    # Strict: the error names the file and line.
    strict = PairLoader(PairDataset(source, SMALL, strict=True), batch_size=4, shuffle=False)
    with pytest.raises(BadSample, match="manifest.jsonl:2"):
        next(iter(strict))


def test_bad_input_everywhere_fails_clearly_instead_of_looping(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(
        "\n".join(
            json.dumps({"image1": f"missing{i}.png", "mask1": "m.png", "image2": "x.png", "mask2": "m.png"})
            for i in range(5)
        )
    )
    loader = PairLoader(
        PairDataset(ManifestPairs(tmp_path / "manifest.jsonl"), SMALL, max_refill=2), batch_size=2, shuffle=False
    )
    with pytest.raises(NoValidSamplesError, match="no valid sample.*missing_file"):
        list(itertools.islice(iter(loader), 10))


def test_bad_input_summary_per_epoch(tmp_path):
    cases = _bad_cases(tmp_path)
    path = manifest_with(tmp_path, cases["missing_file"], good=3)
    loader = PairLoader(PairDataset(ManifestPairs(path), SMALL), batch_size=2, shuffle=False)
    list(itertools.islice(iter(loader), 3))  # the epoch has 2 batches; the third starts epoch 1
    assert loader.epoch_summaries[0] == {"epoch": 0, "valid": 4, "skipped": {"missing_file": 1}}


def test_shard_two_ranks_are_disjoint_and_cover_the_data():
    source = SyntheticPairs(10, seed=1)
    seen = []
    for rank in (0, 1):
        loader = PairLoader(PairDataset(source, SMALL), batch_size=2, rank=rank, world_size=2, seed=5)
        seen.append(loader.shard(epoch=0))
        assert loader.shard(epoch=0) == loader.shard(epoch=0)  # deterministic per (seed, epoch)
        assert loader.shard(epoch=1) != loader.shard(epoch=0)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))
    # Odd size: equal shard lengths (same step count on every rank), still disjoint.
    odd = [PairLoader(PairDataset(SyntheticPairs(11), SMALL), 2, rank=r, world_size=2).shard(0) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 5 and not set(odd[0]) & set(odd[1])


def test_resume_gives_the_identical_next_batches():
    cfg = DataConfig(num_samples=9, num_workers=2)
    reference = build_loader(cfg, SMALL, batch_size=2, seed=3)
    expected = list(itertools.islice(iter(reference), 8))  # crosses an epoch boundary (5 batches/epoch)
    first = build_loader(cfg, SMALL, batch_size=2, seed=3)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    resumed = build_loader(cfg, SMALL, batch_size=2, seed=3)
    resumed.load_state_dict(state)
    for got, want in zip(itertools.islice(iter(resumed), 5), expected[3:]):
        assert torch.equal(got["indices"], want["indices"]) and got["epoch"] == want["epoch"]
        assert torch.equal(got["sample_seeds"], want["sample_seeds"])
        assert torch.equal(got["pixel_values2"], want["pixel_values2"])


def _coco_fixture(tmp_path):
    width, height = 40, 30
    Image.fromarray(np.full((height, width, 3), 100, dtype=np.uint8)).save(tmp_path / "img.png")
    polygon_mask = np.zeros((height, width), dtype=bool)
    polygon_mask[5:15, 10:20] = True  # the square the polygon below traces (pixel-exact for an axis-aligned box)
    rle_mask = np.zeros((height, width), dtype=bool)
    rle_mask[20:28, 2:9] = True
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    instances = {
        "images": [{"id": 7, "file_name": "img.png", "width": width, "height": height}],
        "annotations": [
            {"id": 1, "image_id": 7, "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]], "iscrowd": 0},
            {"id": 2, "image_id": 7, "segmentation": rle, "iscrowd": 1},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    refs = [{"ann_id": 2, "image_id": 7, "sentences": [{"sent": "the small box bottom left"}]}]
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    return polygon_mask, rle_mask


def test_coco_polygon_and_rle_load_with_exact_masks(tmp_path):
    polygon_mask, rle_mask = _coco_fixture(tmp_path)
    same = CocoPairs(tmp_path / "instances.json", tmp_path, pairing="same", min_pixels=1)
    assert len(same) == 2
    poly_pair, rle_pair = same.load(0), same.load(1)
    assert np.array_equal(rle_pair.mask1, rle_mask) and np.array_equal(rle_pair.mask2, rle_mask)
    # pycocotools rasterises polygon edges: the box's interior is exact, the boundary within a pixel.
    assert poly_pair.mask1[6:14, 11:19].all() and not poly_pair.mask1[:4].any() and not poly_pair.mask1[:, 22:].any()
    assert abs(int(poly_pair.mask1.sum()) - int(polygon_mask.sum())) <= 2 * (10 + 10) + 1
    with_refs = CocoPairs(
        tmp_path / "instances.json", tmp_path, refs=tmp_path / "refs.json", pairing="augment", min_pixels=1
    )
    assert len(with_refs) == 1
    pair = with_refs.load(0)
    assert pair.caption == "the small box bottom left" and pair.mask2.any() and pair.mask2.shape == (30, 40)


def test_deterministic_synthetic_generator():
    a, b, c = SyntheticPairs(4, seed=11), SyntheticPairs(4, seed=11), SyntheticPairs(4, seed=12)
    for i in range(4):
        pa, pb = a.load(i), b.load(i)
        assert np.array_equal(np.asarray(pa.image1), np.asarray(pb.image1))
        assert np.array_equal(np.asarray(pa.image2), np.asarray(pb.image2))
        assert np.array_equal(pa.mask2, pb.mask2) and pa.caption == pb.caption
    assert not np.array_equal(np.asarray(a.load(0).image1), np.asarray(c.load(0).image1))


def test_synthetic_scenes_have_exact_masks_small_objects_and_descriptions():
    source = SyntheticPairs(40, seed=0)
    sizes = set()
    for i in range(40):
        image, objects, masks = source.scene(i)
        for obj, mask in zip(objects, masks):
            sizes.add(obj.size)
        union = np.zeros_like(masks[0])
        for mask in masks:
            assert not (union & mask).any()  # visible masks never overlap
            union |= mask
        pair = source.load(i)
        assert pair.caption.startswith("the ") and pair.mask1.sum() > 0 and pair.mask2.sum() > 0
    assert "tiny" in sizes  # objects smaller than one 28-px grid cell occur


def test_synthetic_exports_a_manifest_that_loads_identically(tmp_path):
    source = SyntheticPairs(3, seed=2)
    path = source.export_manifest(tmp_path)
    manifest = ManifestPairs(path)
    for i in range(3):
        ours, theirs = source.load(i), manifest.load(i)
        assert np.array_equal(np.asarray(ours.image2), np.asarray(theirs.image2))
        assert np.array_equal(ours.mask1, theirs.mask1) and ours.caption == theirs.caption


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "exif"])
def test_image_modes_are_converted_to_rgb(tmp_path, mode):
    base = np.zeros((20, 30, 3), dtype=np.uint8)
    base[:, :10] = 200
    if mode == "L":
        image = Image.fromarray(base[..., 0], "L")
    elif mode == "P":
        image = Image.fromarray(base).convert("P")
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([base, np.full((20, 30), 255, np.uint8)]), "RGBA")
    elif mode == "I;16":
        image = Image.fromarray((base[..., 0].astype(np.uint16) * 257))
    else:
        image = Image.fromarray(base)
        exif = image.getexif()
        exif[0x0112] = 6  # rotate 90
        image.save(tmp_path / "img.jpg", exif=exif)
        loaded = open_image(tmp_path / "img.jpg", "test")
        assert loaded.size == (20, 30) and loaded.mode == "RGB"
        return
    image.save(tmp_path / "img.png")
    loaded = open_image(tmp_path / "img.png", "test")
    assert loaded.mode == "RGB" and loaded.size == (30, 20)
    array = np.asarray(loaded)
    assert abs(int(array[0, 0, 0]) - 200) <= 6 and array[0, 20, 0] == 0  # the web palette maps 200 to 204


def test_preprocessed_shapes_and_normalisation():
    item = PairDataset(SyntheticPairs(2), Preprocess(448, 128))[0]
    assert item["pixel_values1"].shape == (1, 3, 448, 448) and item["num_views1"] == 1  # one view: no tiling
    assert item["sam_pixel_values2"].shape == (3, 128, 128)
    assert item["region_masks1"].shape == (448, 448) and item["masks2"].shape == (128, 128)
    assert 0 <= float(item["masks2"].min()) and float(item["masks2"].max()) <= 1
    assert -2.2 < float(item["pixel_values1"].min()) and float(item["pixel_values1"].max()) < 2.7


def test_synthetic_attribute_subsets_and_distinct_colours():
    source = SyntheticPairs(
        30,
        seed=3,
        colours=("red", "blue", "green"),
        textures=("plain",),
        distinct_colours=True,
        min_objects=2,
        max_objects=3,
        sizes=("large",),
    )
    for i in range(30):
        _, objects, _ = source.scene(i)
        colours = [o.colour for o in objects]
        assert set(colours) <= {"red", "blue", "green"} and len(set(colours)) == len(colours)
        assert {o.texture for o in objects} == {"plain"} and {o.size for o in objects} == {"large"}
    repeats = SyntheticPairs(30, seed=3, colours=("red", "blue", "green"), min_objects=3, max_objects=3)
    assert any(len({o.colour for o in repeats.scene(i)[1]}) < 3 for i in range(30))  # without the option colours repeat
    with pytest.raises(ValueError, match="colours"):
        SyntheticPairs(4, colours=("red", "mauve"))
    with pytest.raises(ValueError, match="distinct_colours needs at least max_objects=5"):
        SyntheticPairs(4, colours=("red", "blue"), distinct_colours=True)


def test_same_image_pairing_keeps_one_pixel_tensor_through_collate_and_the_device_move():
    from pg_train.data import collate_pairs
    from pg_train.data.loader import to_device

    same = PairDataset(SyntheticPairs(3, pairing="same"), SMALL)
    batch = collate_pairs([same[i] for i in range(3)])
    assert batch["pixel_values2"] is batch["pixel_values1"]
    pair = SyntheticPairs(3, pairing="same").load(0)
    assert pair.image2 is pair.image1 and pair.mask2 is pair.mask1
    moved = to_device(batch, ("pixel_values1", "pixel_values2", "masks2"), "cpu", torch.bfloat16)
    assert moved["pixel_values2"] is moved["pixel_values1"] and moved["pixel_values1"].dtype == torch.bfloat16
    assert moved["masks2"].dtype == torch.bfloat16
    augmented = PairDataset(SyntheticPairs(3, pairing="augment"), SMALL)
    batch = collate_pairs([augmented[i] for i in range(3)])
    assert batch["pixel_values2"] is not batch["pixel_values1"] and not torch.equal(
        batch["pixel_values2"], batch["pixel_values1"]
    )
    with pytest.raises(ValueError, match="pairing must be 'same' or 'augment'"):
        SyntheticPairs(3, pairing="shuffled")


def _synthetic_fingerprint(source) -> str:
    import hashlib

    digest = hashlib.sha256()
    for i in range(len(source)):
        pair = source.load(i)
        for array in (pair.image1, pair.mask1, pair.image2, pair.mask2):
            digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        digest.update(pair.caption.encode())
    return digest.hexdigest()


def test_synthetic_sample_offset_gives_disjoint_scenes_and_offset_0_is_unchanged():
    # offset 0 is the data as it was before the knob (sha256 of the generator at commit 831da69)
    assert _synthetic_fingerprint(SyntheticPairs(6, seed=5, image_size=96)) == (
        "88508cf607741b477d8b422515c3afece8833632665c493cebcd9384286c69a1"
    )
    assert _synthetic_fingerprint(SyntheticPairs(6, seed=5, image_size=96, sample_offset=0)) == (
        _synthetic_fingerprint(SyntheticPairs(6, seed=5, image_size=96))
    )
    # scenes [offset, offset + n) of the seed: the same bits as the tail of a longer source
    whole = SyntheticPairs(10, seed=5, image_size=96)
    labelled = SyntheticPairs(4, seed=5, image_size=96)
    rest = SyntheticPairs(6, seed=5, image_size=96, sample_offset=4)
    for i in range(6):
        a, b = rest.load(i), whole.load(4 + i)
        assert np.array_equal(np.asarray(a.image1), np.asarray(b.image1)) and a.caption == b.caption
        assert np.array_equal(np.asarray(a.image2), np.asarray(b.image2)) and np.array_equal(a.mask2, b.mask2)
        assert a.where == b.where == f"synthetic(seed=5, index={4 + i})"
    # disjoint ranges share no scene
    seen = {np.asarray(labelled.load(i).image1).tobytes() for i in range(4)}
    assert not seen & {np.asarray(rest.load(i).image1).tobytes() for i in range(6)}
    with pytest.raises(ValueError, match="sample_offset"):
        SyntheticPairs(4, sample_offset=-1)


def test_synthetic_caption_styles():
    from pg_train.data.synthetic import CAPTION_STYLES

    full, short, colour = (
        SyntheticPairs(3, seed=2, image_size=96, textures=("plain",), caption_style=s) for s in CAPTION_STYLES
    )
    for i in range(3):
        words = full.load(i).caption.split()  # the <size> <colour> <shape> at the <where>
        assert short.load(i).caption == f"the {words[2]} {words[3]}"
        assert colour.load(i).caption == f"the {words[2]} one"
        # only the text differs
        assert np.array_equal(np.asarray(full.load(i).image2), np.asarray(colour.load(i).image2))
    with pytest.raises(ValueError, match="caption_style"):
        SyntheticPairs(2, caption_style="long")
