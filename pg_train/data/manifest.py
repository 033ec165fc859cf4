"""JSONL manifest: one sample per line, a pair of images or one image.

    {"image1": "a.jpg", "mask1": "a_mask.png", "image2": "b.jpg", "mask2": {"size": [h, w], "counts": "..."},
     "caption": "optional text", "video": "optional id", "frame": 12}
    {"image": "a.jpg", "mask": "a_mask.png", "caption": "optional text"}

A one-image line (the usual referring-segmentation layout) gets image 2 as the other sources do:
an augmented view of image 1 (`data.pairing=augment`, drawn from the seed and the line) or image
1 itself (`same`). Paths are relative to the manifest's folder; a mask is a PNG path or a COCO RLE. Lines are
parsed one by one so a malformed line is reported with its number and skipped, never fatal
for the rest of the file. Lines end at "\n" (or "\r\n") only: U+2028, U+2029, U+0085 and the
other characters `str.splitlines()` also breaks on are legal inside JSON strings. A leading
UTF-8 byte-order mark is accepted; a line that is not UTF-8 is that line's problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from .augment import second_view
from .images import DEFAULT_MAX_IMAGE_PIXELS, check_pair, decode_rle, open_image, open_mask
from .types import BadSample, RawPair, unforeseen_errors_as_bad_sample

PAIR = ("image1", "mask1", "image2", "mask2")
ONE_IMAGE = ("image", "mask")


UTF8_BOM = b"\xef\xbb\xbf"


def manifest_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(line number, raw bytes) of every non-blank line, split on b"\n" only (a trailing
    b"\r" dropped), after a leading UTF-8 BOM. Decoding waits for the line's own sample."""
    data = data.removeprefix(UTF8_BOM)
    lines = (line.removesuffix(b"\r") for line in data.split(b"\n"))
    return [(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def missing_fields(record: dict) -> list[str]:
    """The fields a line lacks: of a pair's four when it has any of image1/mask1/image2/mask2,
    else of a one-image line's image and mask."""
    layout = PAIR if any(k in record for k in PAIR) else ONE_IMAGE
    return [k for k in layout if k not in record]


class ManifestPairs:
    def __init__(
        self,
        path: str | Path,
        min_pixels: int = 16,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        pairing: str = "augment",
        seed: int = 0,
    ):
        if pairing not in ("same", "augment"):
            raise ValueError(f"data.pairing must be 'same' or 'augment' for data.source=manifest, got {pairing!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest {self.path} does not exist")
        self.root = self.path.parent
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.pairing, self.seed = pairing, seed  # image 2 of a one-image line
        # (line number, raw bytes) of every non-blank line; parsing happens per sample.
        self.lines = manifest_lines(self.path.read_bytes())

    def __len__(self) -> int:
        return len(self.lines)

    def _record(self, index: int) -> tuple[dict, str]:
        number, raw = self.lines[index]
        where = f"{self.path}:{number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise BadSample("malformed_record", where, f"not UTF-8: {err}") from err
        except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
            raise BadSample("malformed_record", where, f"invalid JSON: {type(err).__name__}: {err}"[:300]) from err
        if not isinstance(record, dict):
            raise BadSample("malformed_record", where, "a line must be a JSON object")
        missing = missing_fields(record)
        if missing:
            raise BadSample(
                "malformed_record",
                where,
                f"missing field(s) {missing}; a line has image, mask (one image) or image1, mask1, image2, mask2, "
                f"and optionally caption; this one has {sorted(record)}",
            )
        for key in ("image1", "image2") if "image1" in record else ("image",):
            if not isinstance(record[key], str) or not record[key]:
                raise BadSample("malformed_record", where, f"{key} must be a non-empty path string")
        if "caption" in record and record["caption"] is not None and not isinstance(record["caption"], str):
            raise BadSample("malformed_record", where, "caption must be a string")
        return record, where

    def _mask(self, value, where: str):
        if isinstance(value, dict):
            return decode_rle(value, where, self.max_pixels)
        if isinstance(value, str) and value:
            return open_mask(self.root / value, where, self.max_pixels)
        raise BadSample("malformed_record", where, "a mask must be a PNG path or an RLE object")

    def load(self, index: int) -> RawPair:
        """The pair on line `index`, or BadSample naming the manifest and line (anything else
        that goes wrong reading it becomes `load_error`: one line never ends a run)."""
        with unforeseen_errors_as_bad_sample(f"{self.path}:{self.lines[index][0]}"):
            return self._load(index)

    def _load(self, index: int) -> RawPair:
        record, where = self._record(index)
        if "image" in record:  # one image: image 2 is a view of it
            image1 = open_image(self.root / record["image"], f"{where} image", self.max_pixels)
            mask1 = self._mask(record["mask"], f"{where} mask")
            check_pair(image1, mask1, f"{where} image/mask", self.min_pixels)
            image2, mask2 = second_view(image1, mask1, self.pairing, self.seed, index, self.min_pixels)
            return RawPair(image1, mask1, image2, mask2, record.get("caption"), where)
        image1 = open_image(self.root / record["image1"], f"{where} image1", self.max_pixels)
        image2 = open_image(self.root / record["image2"], f"{where} image2", self.max_pixels)
        mask1 = self._mask(record["mask1"], f"{where} mask1")
        mask2 = self._mask(record["mask2"], f"{where} mask2")
        check_pair(image1, mask1, f"{where} image1/mask1", self.min_pixels)
        check_pair(image2, mask2, f"{where} image2/mask2", self.min_pixels)
        return RawPair(image1, mask1, image2, mask2, record.get("caption"), where)
