"""What every data source produces, and how a bad sample is described."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class RawPair:
    """One training pair before preprocessing: the same object in two images.

    Masks are boolean arrays [H, W] matching their image's size. `where` names the origin
    (file and line, or generator seed and index) for error messages.
    """

    image1: Image.Image
    mask1: np.ndarray
    image2: Image.Image
    mask2: np.ndarray
    caption: str | None
    where: str


class BadSample(ValueError):
    """A sample that cannot be used. `reason` is one of REASONS (the key it is counted under)."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}")
        self.reason = reason
        self.where = where
        self.detail = detail
        super().__init__(f"{where}: {REASONS[reason]}" + (f" ({detail})" if detail else ""))


REASONS = {
    "missing_file": "file not found",
    "unreadable_image": "image cannot be read (corrupt, truncated or not an image)",
    "size_mismatch": "mask size differs from its image's size",
    "empty_mask": "mask has no (or too few) foreground pixels",
    "non_binary_mask": "mask has values other than 0 and one foreground value",
    "malformed_record": "record is not valid (JSON syntax, missing or wrong-typed field)",
}
