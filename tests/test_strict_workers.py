"""Strict mode with DataLoader workers: a bad sample keeps its reason, file and line (issue 27)."""

import pickle

import pytest
from test_data_hardening import SMALL, files, line, write_manifest  # noqa: F401 (files: a fixture)

from pg_train.data import BadSample, ManifestPairs, PairDataset, PairLoader


def test_bad_sample_pickles_with_reason_file_and_line():
    err = BadSample("missing_file", "data/manifest.jsonl:7", "image 'x.png'")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.where, back.detail, str(back)) == (err.reason, err.where, err.detail, str(err))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_bad_sample_names_file_and_line_whatever_the_workers(files, num_workers):  # noqa: F811
    path = write_manifest(files, line(caption=5))
    strict = PairLoader(
        PairDataset(ManifestPairs(path), SMALL, strict=True), batch_size=4, shuffle=False, num_workers=num_workers
    )
    with pytest.raises(BadSample) as err:
        next(iter(strict))
    assert err.value.reason == "malformed_record" and err.value.where.startswith(f"{path}:2")
    assert type(err.value) is BadSample and "caption" in str(err.value)
