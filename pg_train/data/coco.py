"""COCO / RefCOCO-style annotations: instances JSON (polygons or RLE), optional refs file.

Each usable annotation is one pair: the object in its image, and either the same image
(`pairing="same"`) or an augmented view (`pairing="augment"`). With a refs file (RefCOCO's
list of {"ann_id", "sentences": [{"sent": ...}]}, as JSON), the first expression is the caption.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .augment import augmented_view
from .images import check_pair, open_image
from .types import BadSample, RawPair


def annotation_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
    """Polygons (list of [x0, y0, x1, y1, ...]) or RLE (compressed or not) -> bool [H, W]."""
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):
            rles = mask_utils.frPyObjects(segmentation, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        elif isinstance(segmentation, dict):
            counts = segmentation["counts"]
            rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
        else:
            raise TypeError(f"segmentation of type {type(segmentation).__name__}")
        return mask_utils.decode(rle).astype(bool)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise BadSample("malformed_record", where, f"bad segmentation: {err}") from err


class CocoPairs:
    def __init__(self, instances: str | Path, image_root: str | Path, refs: str | Path | None = None, pairing: str = "augment", seed: int = 0, min_pixels: int = 16):
        if pairing not in ("same", "augment"):
            raise ValueError(f"pairing must be 'same' or 'augment', got {pairing!r}")
        self.instances_path = Path(instances)
        data = json.loads(self.instances_path.read_text())
        self.images = {img["id"]: img for img in data["images"]}
        self.annotations = [a for a in data["annotations"] if not a.get("iscrowd", 0) or isinstance(a.get("segmentation"), dict)]
        self.image_root = Path(image_root)
        self.pairing = pairing
        self.seed = seed
        self.min_pixels = min_pixels
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
        ann = self.annotations[index]
        where = f"{self.instances_path} annotation {ann.get('id')}"
        info = self.images.get(ann.get("image_id"))
        if info is None:
            raise BadSample("malformed_record", where, f"image_id {ann.get('image_id')} not in images")
        image = open_image(self.image_root / info["file_name"], where)
        mask = annotation_mask(ann.get("segmentation"), info["height"], info["width"], where)
        check_pair(image, mask, where, self.min_pixels)
        if self.pairing == "same":
            image2, mask2 = image, mask
        else:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, index, 1]))
            image2, mask2 = augmented_view(image, mask, rng, min_pixels=self.min_pixels)
        return RawPair(image, mask, image2, mask2, self.expressions.get(ann["id"]), where)
