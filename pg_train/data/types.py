"""What every data source produces, and how a bad sample is described."""

from __future__ import annotations

import contextlib
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

    def __reduce__(self):
        """Pickles with its reason, file and line (the default would rebuild it from the message alone)."""
        return (BadSample, (self.reason, self.where, self.detail))


REASONS = {
    "missing_file": "file not found",
    "unreadable_image": "image cannot be read (corrupt, truncated or not an image)",
    "size_mismatch": "mask size differs from its image's size",
    "empty_mask": "mask has no (or too few) foreground pixels",
    "non_binary_mask": "mask has values other than 0 and one foreground value",
    "malformed_record": "record is not valid (JSON syntax, missing or wrong-typed field, malformed RLE or polygon)",
    "image_too_large": "image or mask has more pixels than data.max_image_pixels",
    "lossy_mask": "mask stored in a lossy format (JPEG): its pixels are not the annotation's",
    "load_error": "reading the sample failed in an unforeseen way (the detail names the exception)",
}


@contextlib.contextmanager
def unforeseen_errors_as_bad_sample(where: str):
    """Any exception other than BadSample raised inside becomes BadSample("load_error") naming
    `where`: a decoder or parser failing in a way nobody listed is still one sample's problem
    (skipped and counted, or in strict mode an error naming the file and line), not the run's."""
    try:
        yield
    except BadSample:
        raise
    except Exception as err:
        raise BadSample("load_error", where, f"{type(err).__name__}: {err}"[:300]) from err
