"""Video frame pairs: the same object id in two frames (DAVIS palette PNGs, SA-V masklet JSON)."""

from collections import Counter

import numpy as np
import pytest
from formats import DAVIS_PALETTE, DAVIS_VIDEOS, davis_object, sav_object, write_davis, write_sav
from PIL import Image

from pg_train.data import BadSample, DataConfig, Preprocess, build_loader
from pg_train.data.video import VideoPairs

SMALL = Preprocess(mllm_size=448, sam_size=128)


def expected_davis_pairs(distance):
    """(video, t, object) of every pair, from the fixture's definition; and the absent count."""
    pairs, absent = [], 0
    for video, (count, objects) in sorted(DAVIS_VIDEOS.items()):
        for t in range(count - distance):
            for obj, present in sorted(objects.items()):
                if t in present and t + distance in present:
                    pairs.append((video, t, obj))
                elif t in present:
                    absent += 1
    return pairs, absent


@pytest.mark.parametrize("distance", [1, 2])
def test_other_frame_pairs_are_the_same_object_id_in_frames_distance_apart(tmp_path, distance):
    source = VideoPairs(write_davis(tmp_path), frame_distance=distance, min_pixels=1)
    want, absent = expected_davis_pairs(distance)
    assert source.frames_dir.name == "480p" and source.layout == "davis"
    assert [(p.video, int(p.frame1), p.object_id) for p in source.pairs] == want
    assert all(int(p.frame2) == int(p.frame1) + distance for p in source.pairs)
    assert source.absent_in_other_frame == absent == 1  # bear's object 2 is gone from frame 3
    for index, (video, t, obj) in enumerate(want):
        pair = source.load(index)
        assert np.array_equal(pair.mask1, davis_object(video, obj, t)) and np.array_equal(
            pair.mask2, davis_object(video, obj, t + distance)
        )
        assert (
            pair.image1.size == pair.image2.size == (56, 40) and pair.caption is None and f"object {obj}" in pair.where
        )


def test_other_frame_sav_masklets_pair_by_masklet_id_and_skip_the_absent(tmp_path):
    root = write_sav(tmp_path)
    source = VideoPairs(root, annotations=root, frame_distance=1, sav_ann_every=4, min_pixels=1)
    assert source.layout == "sa-v"
    # frames 0->4: masklets 0 and 1; 4->8: masklet 0 only (1 is empty in frame 8)
    assert [(p.frame1, p.frame2, p.object_id) for p in source.pairs] == [
        ("00000", "00004", 0),
        ("00000", "00004", 1),
        ("00004", "00008", 0),
    ]
    assert source.absent_in_other_frame == 1
    for index, (k, obj) in enumerate([(0, 0), (0, 1), (1, 0)]):
        pair = source.load(index)
        assert np.array_equal(pair.mask1, sav_object(obj, k)) and np.array_equal(pair.mask2, sav_object(obj, k + 1))
    far = VideoPairs(root, annotations=root, frame_distance=2, min_pixels=1)
    assert [(p.frame1, p.frame2, p.object_id) for p in far.pairs] == [
        ("00000", "00008", 0)
    ] and far.absent_in_other_frame == 1


def test_other_frame_bad_annotations_and_frames_are_skipped_and_counted(tmp_path):
    root = write_davis(tmp_path / "davis")
    (root / "Annotations" / "480p" / "car" / "00001.png").write_bytes(b"not a png")
    (root / "JPEGImages" / "480p" / "bear" / "00002.jpg").unlink()
    source = VideoPairs(root, frame_distance=1, min_pixels=1)
    loader = build_loader(
        DataConfig(
            source="video",
            video_dir=str(root),
            video_frame_distance=1,
            pairing="other_frame",
            min_pixels=1,
            shuffle=False,
        ),
        SMALL,
        batch_size=len(source),
    )
    reasons = Counter()
    for index in range(len(source)):
        try:
            source.load(index)
        except BadSample as err:
            reasons[err.reason] += 1
    # car 0->1 and 1->2 read the broken PNG (unreadable_image); bear 1->2 (two objects) and 2->3 miss frame 2
    assert reasons == {"unreadable_image": 2, "missing_file": 3}
    batch = next(iter(loader))  # a bad pair is refilled by the next good one (each try counted), never fatal
    assert len(batch["indices"]) == len(source) and batch["masks2"].shape[-1] == 128
    assert set(loader.skip_counts) == set(reasons)
    with pytest.raises(BadSample, match="car frames 00000->00001"):
        source.load(next(i for i, p in enumerate(source.pairs) if p.video == "car"))


def test_other_frame_config_and_palette_colour_masks(tmp_path):
    from pg_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.pairing: other_frame"):
        load_config([], ["data.source=video", f"data.video_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="data.pairing: other_frame"):
        load_config([], ["data.pairing=other_frame"])
    with pytest.raises(ConfigError, match="data.video_dir"):
        load_config([], ["data.source=video", "data.pairing=other_frame"])
    # an annotation saved as RGB (each colour an object) pairs by colour
    root = write_davis(tmp_path / "rgb", resolution="480p")
    for png in (root / "Annotations" / "480p").rglob("*.png"):
        with Image.open(png) as image:
            image.convert("RGB").save(png)
    source = VideoPairs(root, frame_distance=1, min_pixels=1)
    palette_id = {
        (DAVIS_PALETTE[3 * i] << 16) | (DAVIS_PALETTE[3 * i + 1] << 8) | DAVIS_PALETTE[3 * i + 2]: i for i in (1, 2, 5)
    }
    got = sorted((p.video, int(p.frame1), palette_id[p.object_id]) for p in source.pairs)
    assert got == sorted(expected_davis_pairs(1)[0])
    for index, pair in enumerate(source.pairs):
        loaded, obj = source.load(index), palette_id[pair.object_id]
        assert np.array_equal(loaded.mask1, davis_object(pair.video, obj, int(pair.frame1)))
        assert np.array_equal(loaded.mask2, davis_object(pair.video, obj, int(pair.frame2)))
