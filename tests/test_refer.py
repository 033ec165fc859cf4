"""RefCOCO-family data in the refer toolkit's layout: refs pickles, splits, sentences, safety."""

import collections
import io
import pickle

import numpy as np
import pytest
import torch
from formats import MASKS, POLYGON_ANN, REFS, write_refer
from pycocotools import mask as mask_utils

from pg_train.data import BadSample, DataConfig, Preprocess, build_loader, build_source
from pg_train.data.refer import ReferFormatError, ReferPairs, RestrictedUnpickler, load_refs_pickle

SMALL = Preprocess(mllm_size=448, sam_size=128)


def test_refs_pickle_every_sentence_is_a_pair_with_its_annotation_mask(tmp_path):
    refer_dir, images = write_refer(tmp_path)
    train = ReferPairs(refer_dir, images, split="train", pairing="same", min_pixels=1)
    # ref 1: two sentences -> two pairs; ref 4 points at a missing annotation -> one bad entry
    assert len(train) == 3
    first, second = train.load(0), train.load(1)
    assert (first.caption, second.caption) == ("the big square", "square on the left")
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(POLYGON_ANN[2], 64, 64))).astype(bool)
    assert np.array_equal(first.mask1, expected) and first.image2 is first.image1 and first.mask1.shape == (64, 64)
    assert train.sentences(0) == train.sentences(1) == ["the big square", "square on the left"]
    with pytest.raises(BadSample) as err:
        train.load(2)
    assert (
        err.value.reason == "malformed_record"
        and "refs(unc).p ref_id 4" in str(err.value)
        and "ann_id 999" in str(err.value)
    )


def test_refs_pickle_one_pair_per_ref_draws_one_of_its_sentences(tmp_path):
    refer_dir, images = write_refer(tmp_path)
    per_ref = ReferPairs(refer_dir, images, split="testA", per="ref", pairing="same", min_pixels=1, seed=3)
    assert len(per_ref) == 1
    pair = per_ref.load(0)
    assert pair.caption in REFS[2]["sentences"] and per_ref.sentences(0) == REFS[2]["sentences"]
    assert pair.caption == per_ref.load(0).caption  # deterministic for (seed, index)
    drawn = {
        ReferPairs(refer_dir, images, split="testA", per="ref", pairing="same", min_pixels=1, seed=s).load(0).caption
        for s in range(12)
    }
    assert len(drawn) > 1  # another seed can draw another sentence


def test_refs_pickle_split_selection_and_rle_masks(tmp_path):
    refer_dir, images = write_refer(tmp_path)
    val = ReferPairs(refer_dir, images, split="val", pairing="same", min_pixels=1)
    test_a = ReferPairs(refer_dir, images, split="testA", pairing="augment", min_pixels=1)
    assert len(val) == 1 and len(test_a) == 3 and len(ReferPairs(refer_dir, images, split=None, min_pixels=1)) == 7
    assert np.array_equal(val.load(0).mask1, MASKS[102][1])  # compressed RLE, exact
    pair = test_a.load(1)
    assert np.array_equal(pair.mask1, MASKS[103][1]) and pair.caption == "box in the middle"  # uncompressed RLE
    assert pair.mask2.shape == (48, 64) and pair.mask2.any()  # an augmented view of the same object
    assert val.splits == ["testA", "train", "val"]
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p.*no ref has split 'testB'.*\['testA', 'train', 'val'\]"):
        ReferPairs(refer_dir, images, split="testB")
    everything = ReferPairs(refer_dir, images, split=None, pairing="same", min_pixels=1)
    assert [everything.subset(s).load(0).caption for s in ("val", "testA")] == ["the bar at the bottom", "the box"]


class WritesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restricted_unpickler_refuses_code_and_runs_none_of_it(tmp_path):
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "refs(unc).p"
    crafted.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": [WritesAFile(marker)]}], protocol=2))
    with pytest.raises(ReferFormatError, match=r"refs\(unc\)\.p.*refused global \S*open"):
        load_refs_pickle(crafted)
    assert not marker.exists()
    pickle.loads(crafted.read_bytes())  # the payload is real: the standard unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda: pickle.dumps([torch.zeros(2)]), id="tensor"),
        pytest.param(lambda: pickle.dumps([np.int64(3)]), id="numpy scalar"),
        pytest.param(lambda: pickle.dumps([collections.OrderedDict(a=1)]), id="OrderedDict"),
    ],
)
def test_restricted_unpickler_refuses_any_non_builtin_object(tmp_path, payload):
    path = tmp_path / "refs(umd).p"
    path.write_bytes(payload())
    with pytest.raises(ReferFormatError, match=r"refs\(umd\)\.p.*refused global"):
        load_refs_pickle(path)


def test_restricted_unpickler_reads_python2_byte_strings_and_reports_broken_files(tmp_path):
    # [{"sent": "box"}] as Python 2's pickle.dump(protocol=2) writes it (SHORT_BINSTRING str)
    python2 = b"\x80\x02]q\x00}q\x01U\x04sentq\x02U\x03boxq\x03sa."
    assert RestrictedUnpickler(io.BytesIO(python2), encoding="utf-8").load() == [{"sent": "box"}]
    truncated = tmp_path / "refs(google).p"
    truncated.write_bytes(pickle.dumps([{"a": 1}] * 50)[:40])
    with pytest.raises(ReferFormatError, match=r"refs\(google\)\.p: not a refer-toolkit refs pickle"):
        load_refs_pickle(truncated)
    not_a_list = tmp_path / "dict" / "refs(unc).p"
    not_a_list.parent.mkdir()
    not_a_list.write_bytes(pickle.dumps({"refs": []}))
    with pytest.raises(ReferFormatError, match="expected a list of refs, got dict"):
        load_refs_pickle(not_a_list)


def test_refs_pickle_through_the_config_and_the_training_loader(tmp_path):
    from pg_train.config import ConfigError, load_config

    refer_dir, images = write_refer(tmp_path)
    with pytest.raises(ConfigError, match="data.refer_dir"):
        load_config([], ["data.source=refer"])
    cfg = load_config(
        [], ["data.source=refer", f"data.refer_dir={refer_dir}", f"data.coco_images={images}", "data.min_pixels=1"]
    ).data
    assert isinstance(build_source(cfg), ReferPairs)
    loader = build_loader(DataConfig(**{**cfg.__dict__, "shuffle": False}), SMALL, batch_size=3)
    batch = next(iter(loader))
    # the bad ref (index 2) is refilled by the next good sample (index 0, wrapping) and counted
    assert batch["captions"] == ["the big square", "square on the left", "the big square"]
    assert loader.skip_counts == {"malformed_record": 1} and batch["masks2"].shape == (3, 128, 128)
