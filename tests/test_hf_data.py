"""Hugging Face datasets as a source: formats, column mapping, and the manifest's sharding,
resume and skip-and-count behaviour, map-style and streaming."""

import itertools
import json

import numpy as np
import pytest
import torch
from formats import hf_dataset, write_pairs

from pg_train.data import BadSample, DataConfig, ManifestPairs, Preprocess, build_loader, build_source
from pg_train.data.hf import HFPairs, HFStreamPairs

SMALL = Preprocess(mllm_size=448, sam_size=128)


@pytest.fixture
def data(tmp_path, monkeypatch):
    """The same 7 pairs (row 1's image truncated) as a manifest, a parquet folder in the hub
    layout, and a save_to_disk folder; datasets' cache inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    manifest, rows = write_pairs(tmp_path / "pairs")
    ds = hf_dataset(rows)
    (tmp_path / "parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "parquet" / "data" / "train-00000-of-00001.parquet"))
    ds.select(range(2)).to_parquet(str(tmp_path / "parquet" / "data" / "test-00000-of-00001.parquet"))  # another split
    ds.save_to_disk(str(tmp_path / "saved"))
    return {"manifest": manifest, "parquet": tmp_path / "parquet", "saved": tmp_path / "saved"}


def config(data, source, **over):
    if source == "manifest":
        return DataConfig(source="manifest", manifest=str(data["manifest"]), min_pixels=1, **over)
    return DataConfig(source="hf", hf_path=str(data[source]), min_pixels=1, pairing="same", **over)


def assert_same_batches(got, want):
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["indices"], b["indices"]) and a["captions"] == b["captions"] and a["epoch"] == b["epoch"]
        assert [r for r, _ in a["skipped"]] == [r for r, _ in b["skipped"]]
        assert torch.equal(a["pixel_values1"], b["pixel_values1"]) and torch.equal(a["masks2"], b["masks2"])
        assert torch.equal(a["sample_seeds"], b["sample_seeds"])


@pytest.mark.parametrize("where", ["parquet", "saved"])
@pytest.mark.parametrize("mask_column", ["mask", "mask_rle", "mask_polygon", "mask_json"])
def test_hf_dataset_rows_read_as_the_manifest_pairs(data, where, mask_column):
    source = build_source(config(data, where, hf_mask=mask_column))
    manifest = ManifestPairs(data["manifest"], min_pixels=1)
    assert isinstance(source, HFPairs) and len(source) == len(manifest) == 7  # the train split only
    for i in (0, 2, 6):
        got, want = source.load(i), manifest.load(i)
        assert got.caption == want.caption and np.array_equal(np.asarray(got.image1), np.asarray(want.image1))
        if (
            mask_column == "mask_polygon"
        ):  # rasterised by pycocotools: the box's interior exactly, its edge within a pixel
            rows, cols = np.nonzero(want.mask1)
            assert got.mask1[rows.min() + 1 : rows.max(), cols.min() + 1 : cols.max()].all()
            assert abs(int(got.mask1.sum()) - int(want.mask1.sum())) <= 2 * (16 + 20) + 1
        else:
            assert np.array_equal(got.mask1, want.mask1) and np.array_equal(got.mask2, want.mask2)
    with pytest.raises(BadSample) as err:
        source.load(1)
    assert err.value.reason == "unreadable_image" and "row 1 image" in str(err.value)


def test_hf_dataset_cells_get_the_file_readers_checks(data):
    small = build_source(config(data, "parquet", max_image_pixels=48 * 40 - 1))  # row 0's image is 48x40
    with pytest.raises(BadSample) as err:
        small.load(0)
    assert err.value.reason == "image_too_large" and "row 0 image" in str(err.value)
    assert (
        build_source(config(data, "parquet", max_image_pixels=48 * 40)).load(0).caption == "object number 0"
    )  # at the limit: read


def test_hf_dataset_split_and_column_errors_name_what_is_missing(data):
    assert len(build_source(config(data, "parquet", hf_split="test"))) == 2
    for streaming in (False, True):
        with pytest.raises(ValueError, match=r"column\(s\) \['segmentation'\] not in the dataset.*mask_rle"):
            build_source(config(data, "parquet", hf_mask="segmentation", hf_streaming=streaming))
    with pytest.raises(ValueError, match="no split 'validation'"):
        import datasets

        dict_path = data["saved"].parent / "dict"
        datasets.DatasetDict({"train": datasets.load_from_disk(str(data["saved"]))}).save_to_disk(str(dict_path))
        build_source(DataConfig(source="hf", hf_path=str(dict_path), hf_split="validation"))
    from pg_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.hf_path"):
        load_config([], ["data.source=hf"])
    with pytest.raises(ConfigError, match="data.hf_image2"):
        load_config([], ["data.source=hf", "data.hf_path=x", "data.hf_image2=other"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_hf_dataset_shards_resume_and_skips_exactly_like_the_manifest(data, world_size):
    for rank in range(world_size):
        loaders = {
            s: build_loader(config(data, s), SMALL, batch_size=2, rank=rank, world_size=world_size, seed=4)
            for s in ("manifest", "parquet")
        }
        assert loaders["manifest"].shard(0) == loaders["parquet"].shard(0)
        runs = {s: list(itertools.islice(iter(loader), 6)) for s, loader in loaders.items()}  # crosses epochs
        assert_same_batches(runs["parquet"], runs["manifest"])
        assert loaders["parquet"].skip_counts == loaders["manifest"].skip_counts
        # resume after 2 batches: the same next batches
        first = build_loader(config(data, "parquet"), SMALL, batch_size=2, rank=rank, world_size=world_size, seed=4)
        it = iter(first)
        next(it), next(it)
        resumed = build_loader(config(data, "parquet"), SMALL, batch_size=2, rank=rank, world_size=world_size, seed=4)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert_same_batches(list(itertools.islice(iter(resumed), 4)), runs["manifest"][2:6])
    assert any(reason == "unreadable_image" for b in runs["manifest"] for reason, _ in b["skipped"])


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (2, 2)])
def test_hf_streaming_shards_resume_and_skips_like_the_manifest_in_stream_order(data, world_size, workers):
    for rank in range(world_size):
        manifest = build_loader(
            config(data, "manifest", shuffle=False), SMALL, 2, rank=rank, world_size=world_size, seed=4
        )
        stream_cfg = config(data, "parquet", shuffle=False, hf_streaming=True, num_workers=workers)
        streaming = build_loader(stream_cfg, SMALL, 2, rank=rank, world_size=world_size, seed=4)
        assert (
            isinstance(streaming.dataset.source, HFStreamPairs) and len(streaming.dataset) == 7
        )  # length from the parquet footer
        want = list(itertools.islice(iter(manifest), 5))
        assert_same_batches(list(itertools.islice(iter(streaming), 5)), want)
        assert streaming.skip_counts == manifest.skip_counts
        first = build_loader(stream_cfg, SMALL, 2, rank=rank, world_size=world_size, seed=4)
        it = iter(first)
        next(it)
        resumed = build_loader(stream_cfg, SMALL, 2, rank=rank, world_size=world_size, seed=4)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert_same_batches(list(itertools.islice(iter(resumed), 4)), want[1:5])


def test_hf_streaming_shuffle_is_seeded_per_epoch_and_covers_the_rows(data):
    cfg = config(data, "saved", hf_streaming=True)  # shuffle on: datasets' seeded buffer

    def captions_per_epoch(seed):
        by_epoch = {}
        for batch in itertools.islice(
            iter(build_loader(cfg, SMALL, batch_size=4, seed=seed)), 6
        ):  # 2 batches per epoch
            by_epoch.setdefault(batch["epoch"], []).extend(batch["captions"])
        return list(by_epoch.values())

    first = captions_per_epoch(seed=1)
    assert first == captions_per_epoch(seed=1)  # deterministic for (seed, epoch): a resumed run reads the same stream
    assert len(set(map(tuple, first))) == 3  # reshuffled every epoch
    for captions in first:  # 7 positions; the bad row is refilled by the next one: 6 distinct good rows
        assert len(captions) == 7 and len(set(captions)) == 6 and "object number 1" not in captions
