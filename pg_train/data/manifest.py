"""JSONL manifest: one pair per line.

    {"image1": "a.jpg", "mask1": "a_mask.png", "image2": "b.jpg", "mask2": {"size": [h, w], "counts": "..."},
     "caption": "optional text", "video": "optional id", "frame": 12}

Paths are relative to the manifest's folder; a mask is a PNG path or a COCO RLE. Lines are
parsed one by one so a malformed line is reported with its number and skipped, never fatal
for the rest of the file.
"""
from __future__ import annotations

import json
from pathlib import Path

from .images import check_pair, decode_rle, open_image, open_mask
from .types import BadSample, RawPair

REQUIRED = ("image1", "mask1", "image2", "mask2")


class ManifestPairs:
    def __init__(self, path: str | Path, min_pixels: int = 16):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} does not exist")
        self.root = self.path.parent
        self.min_pixels = min_pixels
        # (line number, raw text) of every non-blank line; parsing happens per sample.
        self.lines = [(n, text) for n, text in enumerate(self.path.read_text().splitlines(), 1) if text.strip()]

    def __len__(self) -> int:
        return len(self.lines)

    def _record(self, index: int) -> tuple[dict, str]:
        number, text = self.lines[index]
        where = f"{self.path}:{number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadSample("malformed_record", where, f"invalid JSON: {err}") from err
        if not isinstance(record, dict):
            raise BadSample("malformed_record", where, "a line must be a JSON object")
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise BadSample("malformed_record", where, f"missing field(s) {missing}")
        for key in ("image1", "image2"):
            if not isinstance(record[key], str):
                raise BadSample("malformed_record", where, f"{key} must be a path string")
        if "caption" in record and record["caption"] is not None and not isinstance(record["caption"], str):
            raise BadSample("malformed_record", where, "caption must be a string")
        return record, where

    def _mask(self, value, where: str):
        if isinstance(value, dict):
            return decode_rle(value, where)
        if isinstance(value, str):
            return open_mask(self.root / value, where)
        raise BadSample("malformed_record", where, "a mask must be a PNG path or an RLE object")

    def load(self, index: int) -> RawPair:
        record, where = self._record(index)
        image1 = open_image(self.root / record["image1"], where)
        image2 = open_image(self.root / record["image2"], where)
        mask1 = self._mask(record["mask1"], f"{where} mask1")
        mask2 = self._mask(record["mask2"], f"{where} mask2")
        check_pair(image1, mask1, f"{where} image1/mask1", self.min_pixels)
        check_pair(image2, mask2, f"{where} image2/mask2", self.min_pixels)
        return RawPair(image1, mask1, image2, mask2, record.get("caption"), where)
