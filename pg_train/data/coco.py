"""COCO / RefCOCO-style annotations: instances JSON (polygons or RLE), optional refs file.

Each usable annotation is one pair: the object in its image, and either the same image
(`pairing="same"`) or an augmented view (`pairing="augment"`). With a refs file (RefCOCO's
list of {"ann_id", "sentences": [{"sent": ...}]}, as JSON), the first expression is the caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .augment import second_view
from .images import DEFAULT_MAX_IMAGE_PIXELS, check_pair, decode_rle, is_int_value, open_image
from .types import BadSample, RawPair, unforeseen_errors_as_bad_sample


def _check_polygons(segmentation: list, where: str) -> list[list[float]]:
    """Each polygon a flat list of >= 3 finite (x, y) points. pycocotools reads a first entry of
    exactly 4 numbers as a box, and raises a bare Exception for shorter ones."""
    import math

    polygons = []
    for i, polygon in enumerate(segmentation):
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
            raise BadSample("malformed_record", where, f"polygon {i} must be a flat list of >= 3 (x, y) pairs")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in polygon):
            raise BadSample("malformed_record", where, f"polygon {i} holds a value that is not a finite number")
        polygons.append([float(v) for v in polygon])
    if not polygons:
        raise BadSample("malformed_record", where, "segmentation has no polygon")
    return polygons


def annotation_mask(
    segmentation, height: int, width: int, where: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Polygons (list of [x0, y0, x1, y1, ...]) or RLE (compressed or not) -> bool [H, W],
    validated before pycocotools sees it (see images.validate_rle)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, dict):
        return decode_rle(segmentation, where, max_pixels)
    if not isinstance(segmentation, list):
        raise BadSample("malformed_record", where, f"segmentation of type {type(segmentation).__name__}")
    if not (is_int_value(height) and is_int_value(width) and height >= 1 and width >= 1):
        raise BadSample("malformed_record", where, f"image size {height!r}x{width!r} is not two positive integers")
    if height * width > max_pixels:
        raise BadSample(
            "image_too_large",
            where,
            f"{height}x{width} = {height * width:,} pixels > data.max_image_pixels = {max_pixels:,}",
        )
    rles = mask_utils.frPyObjects(_check_polygons(segmentation, where), height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


class CocoPairs:
    def __init__(
        self,
        instances: str | Path,
        image_root: str | Path,
        refs: str | Path | None = None,
        pairing: str = "augment",
        seed: int = 0,
        min_pixels: int = 16,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if pairing not in ("same", "augment"):
            raise ValueError(f"pairing must be 'same' or 'augment', got {pairing!r}")
        self.instances_path = Path(instances)
        data = json.loads(self.instances_path.read_text())
        self.images = {img["id"]: img for img in data["images"]}
        self.annotations = [
            a for a in data["annotations"] if not a.get("iscrowd", 0) or isinstance(a.get("segmentation"), dict)
        ]
        self.image_root = Path(image_root)
        self.pairing = pairing
        self.seed = seed
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.expressions: dict[int, str] = {}
        if refs is not None:
            for ref in json.loads(Path(refs).read_text()):
                sentences = ref.get("sentences") or []
                if sentences and ref.get("ann_id") not in self.expressions:
                    self.expressions[ref["ann_id"]] = sentences[0].get("sent") or sentences[0].get("raw")
            self.annotations = [a for a in self.annotations if a["id"] in self.expressions]

    def __len__(self) -> int:
        return len(self.annotations)

    def load(self, index: int) -> RawPair:
        """The pair of annotation `index`, or BadSample naming the annotation (anything else
        that goes wrong reading it becomes `load_error`: one annotation never ends a run)."""
        ann = self.annotations[index]
        where = f"{self.instances_path} annotation {ann.get('id')}"
        with unforeseen_errors_as_bad_sample(where):
            return self._load(index, ann, where)

    def _load(self, index: int, ann: dict, where: str) -> RawPair:
        info = self.images.get(ann.get("image_id"))
        if info is None:
            raise BadSample("malformed_record", where, f"image_id {ann.get('image_id')} not in images")
        missing = [k for k in ("file_name", "height", "width") if k not in info]
        if missing:
            raise BadSample("malformed_record", where, f"image {ann.get('image_id')} lacks {missing}")
        image = open_image(self.image_root / info["file_name"], where, self.max_pixels)
        mask = annotation_mask(ann.get("segmentation"), info["height"], info["width"], where, self.max_pixels)
        check_pair(image, mask, where, self.min_pixels)
        image2, mask2 = second_view(image, mask, self.pairing, self.seed, index, self.min_pixels)
        return RawPair(image, mask, image2, mask2, self.expressions.get(ann["id"]), where)
